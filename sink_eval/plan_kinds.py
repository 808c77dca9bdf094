"""The one seam through which long-context evaluation runs a plan, whatever its kind (None: the unpatched model).

`apply_plan(model, plan)` is the context manager a full forward pass runs in; `generate_with(model, plan, ids, mask,
n)` is greedy generation with the plan's own KV cache; `kv_groups_removed(plan, shape)` counts the KV groups whose
decode cache the plan shrinks. Each dispatches on the plan's type; a new plan kind is wired here and nowhere else.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from contextlib import AbstractContextManager, nullcontext

import torch
from transformers import DynamicCache

from sink_eval import patch, plans
from sink_eval.controls import whole_groups
from sink_eval.patch import CopyPlan, kv_cache_bytes
from sink_eval.plans import Plan
from sink_eval.shape import Shape, model_shape
from sink_eval.streaming import StreamingPlan
from sink_eval.streaming import candidate_layers as streaming_layers


def apply_plan(model: torch.nn.Module, plan: Plan | None) -> AbstractContextManager[None]:
    """Run `model` under `plan` inside the block (None: unchanged)."""
    if plan is None:
        return nullcontext()
    return plans.patched(model, plan)


@torch.no_grad()
def generate_with(
    model: torch.nn.Module, plan: Plan | None, input_ids: torch.Tensor, attention_mask: torch.Tensor, new_tokens: int
) -> tuple[torch.Tensor, int]:
    """Greedy generation of exactly `new_tokens` tokens after input_ids (B, N): (the new ids (B, new_tokens), the KV
    bytes its cache holds at the end). None: the model's own `DynamicCache`."""
    if plan is not None:
        ids, cache = plans.generate(model, plan, input_ids, attention_mask, new_tokens)
        return ids[:, input_ids.shape[1] :], kv_cache_bytes(cache)
    cache = DynamicCache(config=model.config)
    ids = model.generate(
        input_ids=input_ids,
        attention_mask=attention_mask,
        past_key_values=cache,
        max_new_tokens=new_tokens,
        min_new_tokens=new_tokens,
        do_sample=False,
        pad_token_id=patch.pad_id(model),
    )
    return ids[:, input_ids.shape[1] :], kv_cache_bytes(cache)


def kv_groups_removed(plan: Plan | None, shape: Shape) -> int:
    """KV groups whose decode cache the plan shrinks: those all of whose query heads it plans (a copy plan does not
    cache them beyond V[first]; a streaming plan keeps s + w entries of them), none for a conditional (hybrid) plan,
    which keeps the whole cache."""
    if plan is None or plan.conditional:
        return 0
    return len(whole_groups(dict(plan.heads), shape))


def candidate_layers(model: torch.nn.Module, plan: Plan) -> list[int]:
    """The layers a plan of this kind may name: every layer for a copy plan, the full-attention layers for a
    streaming plan."""
    if isinstance(plan, StreamingPlan):
        return streaming_layers(model)
    return list(range(model_shape(model).layers))


def with_heads(plan: Plan, heads: Mapping[int, Iterable[int]]) -> Plan:
    """A plan of the same kind and conditions (s and w) as `plan`, planning `heads` instead."""
    if isinstance(plan, StreamingPlan):
        return StreamingPlan.of(heads, plan.sink, plan.window)
    return CopyPlan.of(heads, max_tokens=plan.max_tokens, decode_steps=plan.decode_steps)
