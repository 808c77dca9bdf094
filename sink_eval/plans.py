"""One interface over the two plan kinds: copy (`sink_eval.patch`) and streaming (`sink_eval.streaming_patch`).

`patched`, `new_cache`, `generate` and `layer_errors` run a plan of either kind through its own patch; `applies` says
whether a plan changes a forward pass; `work_removed` is the fraction of the model's attention work a plan skips,
the f of the speed ceilings (`sink_eval.speed.ceiling`):
- copy plan: the fraction of (layer, head) pairs it copies, in a forward pass where it applies (else 0);
- streaming plan: the fraction of heads it streams times (1 − ρ), ρ the share of a head's attention work a streamed
  head still does (`streamed_share`).
"""

from __future__ import annotations

from contextlib import AbstractContextManager

import torch
from transformers import DynamicCache

from sink_eval import patch, streaming_patch
from sink_eval.patch import CopyPlan
from sink_eval.shape import Shape
from sink_eval.streaming import StreamingPlan

Plan = CopyPlan | StreamingPlan


def patched(model: torch.nn.Module, plan: Plan, cache: DynamicCache | None = None) -> AbstractContextManager[None]:
    if isinstance(plan, StreamingPlan):
        return streaming_patch.patched(model, plan, cache)
    return patch.patched(model, plan, cache)


def new_cache(model: torch.nn.Module, plan: Plan, attention_mask: torch.Tensor) -> DynamicCache:
    """The plan's own decode cache (copy: V[first] kept, dropped groups; streaming: s + w entries per streamed
    group)."""
    if isinstance(plan, StreamingPlan):
        return streaming_patch.new_cache(model, plan, attention_mask)
    return patch.new_cache(model, plan, attention_mask)


def generate(
    model: torch.nn.Module,
    plan: Plan,
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor | None = None,
    max_new_tokens: int = 32,
) -> tuple[torch.Tensor, DynamicCache]:
    if isinstance(plan, StreamingPlan):
        return streaming_patch.generate(model, plan, input_ids, attention_mask, max_new_tokens)
    return patch.generate(model, plan, input_ids, attention_mask, max_new_tokens)


def layer_errors(model: torch.nn.Module, plan: Plan, input_ids: torch.Tensor) -> dict[int, float]:
    if isinstance(plan, StreamingPlan):
        return streaming_patch.layer_errors(model, plan, input_ids)
    return patch.layer_errors(model, plan, input_ids)


def applies(plan: Plan, seq_len: int, decode_step: int) -> bool:
    """Whether the plan changes a forward pass over `seq_len` positions; decode step 0 is the prefill."""
    if isinstance(plan, StreamingPlan):
        return bool(plan.heads) and seq_len > plan.sink + plan.window
    return bool(plan.heads) and patch.plan_applies(plan, seq_len, decode_step)


def streamed_share(n: int, sink: int, window: int, decode: bool) -> float:
    """ρ: the share of a causal head's attention work that a streamed head still does.

    Full pass over N tokens: scored (query, key) pairs, Σ_{i<N} min(i + 1, s + w) / Σ_{i<N} (i + 1) (causal
    attention scores i + 1 keys at query i; unpatched SDPA skips the blocks above the diagonal). Decode step with N
    positions in the cache (its own included): keys read, min(1, (s + w) / N).
    """
    span = sink + window
    if decode:
        return min(1.0, span / n)
    full = n * (n + 1) / 2
    inside = min(n, span)
    streamed = inside * (inside + 1) / 2 + (n - inside) * span
    return streamed / full


def work_removed(plan: Plan, shape: Shape, seq_len: int, decode_step: int) -> float:
    """The fraction f of the model's attention work the plan skips in a forward pass (see the module doc)."""
    if not applies(plan, seq_len, decode_step):
        return 0.0
    fraction = plan.fraction(shape.layers, shape.heads)
    if isinstance(plan, StreamingPlan):
        return fraction * (1 - streamed_share(seq_len, plan.sink, plan.window, decode=decode_step > 0))
    return fraction
