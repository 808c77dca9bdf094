"""One interface over the two plan kinds: copy (`sink_eval.patches.copy`) and streaming (`sink_eval.patches.streaming.patch`).

`patched`, `new_cache`, `generate` and `layer_errors` run a plan of either kind through its own patch; `applies` says
whether a plan changes a forward pass; `candidate_layers` and `with_heads` are what a random control of a plan needs
(`sink_eval.policies.controls`); `kv_groups_removed` counts the KV groups whose decode cache a plan shrinks; `work_removed`
is the fraction of the model's attention work a plan skips, the f of the speed ceilings (`sink_eval.evals.speed.ceiling`):
- copy plan: the fraction of (layer, head) pairs it copies, in a forward pass where it applies (else 0);
- streaming plan: the fraction of heads it streams times (1 − ρ), ρ the share of a head's attention work a streamed
  head still does (`streamed_share`).
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from contextlib import AbstractContextManager

import torch
from transformers import DynamicCache, LogitsProcessorList

from sink_eval.core.shape import Shape, model_shape
from sink_eval.patches import copy as patch
from sink_eval.patches.copy import CopyPlan
from sink_eval.patches.streaming import patch as streaming_patch
from sink_eval.patches.streaming.plan import StreamingPlan
from sink_eval.patches.streaming.plan import candidate_layers as streaming_layers

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
    logits_processor: LogitsProcessorList | None = None,
) -> tuple[torch.Tensor, DynamicCache]:
    if isinstance(plan, StreamingPlan):
        return streaming_patch.generate(model, plan, input_ids, attention_mask, max_new_tokens, logits_processor)
    return patch.generate(model, plan, input_ids, attention_mask, max_new_tokens, logits_processor)


def layer_errors(model: torch.nn.Module, plan: Plan, input_ids: torch.Tensor) -> dict[int, float]:
    if isinstance(plan, StreamingPlan):
        return streaming_patch.layer_errors(model, plan, input_ids)
    return patch.layer_errors(model, plan, input_ids)


def applies(plan: Plan, seq_len: int, decode_step: int) -> bool:
    """Whether the plan changes a forward pass over `seq_len` positions; decode step 0 is the prefill."""
    if isinstance(plan, StreamingPlan):
        return bool(plan.heads) and seq_len > plan.sink + plan.window
    return bool(plan.heads) and patch.plan_applies(plan, seq_len, decode_step)


def candidate_layers(model: torch.nn.Module, plan: Plan) -> list[int]:
    """The layers a plan of this kind may name: every layer for a copy plan, the full-attention layers for a
    streaming plan."""
    if isinstance(plan, StreamingPlan):
        return streaming_layers(model)
    return list(range(model_shape(model).layers))


def with_heads(plan: Plan, heads: Mapping[int, Iterable[int]]) -> Plan:
    """A plan of the same kind and conditions (s and w; L and k) as `plan`, planning `heads` instead."""
    if isinstance(plan, StreamingPlan):
        return StreamingPlan.of(heads, plan.sink, plan.window)
    return CopyPlan.of(heads, max_tokens=plan.max_tokens, decode_steps=plan.decode_steps)


def kv_groups_removed(plan: Plan, shape: Shape) -> int:
    """KV groups whose decode cache the plan shrinks: those all of whose query heads it plans (a copy plan does not
    cache them beyond V[first]; a streaming plan keeps s + w entries of them), none for a conditional (hybrid) plan,
    which keeps the whole cache."""
    return 0 if plan.conditional else shape.n_whole_groups(plan.heads)


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
