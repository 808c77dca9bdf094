"""The copy-pattern patch: skip the attention of planned heads and give them the first token's value instead.

A head whose attention is all on the first token outputs that token's value vector, whatever the query. The patch
turns that into a shortcut: for the heads of a `CopyPlan`, the registered attention implementation "sink_copy"
(transformers' `AttentionInterface`) writes V[first] (the first non-padding token's value, through the GQA mapping)
and runs SDPA only on the other heads, one call per KV group, so a copied head computes no scores at all. A layer
with nothing to copy runs transformers' own SDPA function: an empty plan is the unpatched model.

During generation with `new_cache` (or `generate` here), each layer keeps the first token's values, and a KV group
all of whose query heads are copied is not cached at all beyond them: its keys and values are never read again.
That is the KV memory the plan saves (`kv_cache_bytes`). A conditional (hybrid) plan keeps the whole cache, since
the exact attention resumes once its condition ends.

`patched(model, [plan_0, plan_1, ...])` gives each batch row its own (unconditional) plan, as per-prompt policies
need when their requests are scored in batches: every head is computed and each row's copied heads are then
overwritten with that row's V[first]. The outputs are those of each row run alone under its plan; the speed is not
the patch's (nothing is skipped).

This module knows no statistics: plans come from `sink_eval.policies.base`, or from anyone.
"""

from __future__ import annotations

import contextvars
from collections.abc import Iterable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field

import torch
from transformers import LogitsProcessorList
from transformers.cache_utils import DynamicCache, DynamicLayer, DynamicSlidingWindowLayer
from transformers.integrations.sdpa_attention import sdpa_attention_forward

from sink_eval.core.errors import SinkEvalError
from sink_eval.core.shape import Shape, model_shape
from sink_eval.patches import base as seam
from sink_eval.patches.base import first_positions, is_index

PATCH_ATTENTION = "sink_copy"
ERROR_ATTENTION = "sink_copy_error"  # layer_errors(): the exact attention, recording the patch's error per layer
SUPPORTED_MODEL_TYPES = ("llama", "gemma3_text", "qwen2")


@dataclass(frozen=True)
class CopyPlan:
    """Which query heads to copy, per layer (0-based), and when.

    `max_tokens` (hybrid): copy only in forward passes whose sequence, cache included, is at most that long.
    `decode_steps` (hybrid): copy only in the first k decode steps (the prefill is exact).
    """

    heads: Mapping[int, frozenset[int]] = field(default_factory=dict)
    max_tokens: int | None = None
    decode_steps: int | None = None

    def __post_init__(self) -> None:
        check_indices(self.heads.items(), "copy")

    @classmethod
    def of(cls, heads: Mapping[int, Iterable[int]], **conditions: int | None) -> CopyPlan:
        """A plan from layer -> heads; layers without heads are left out. Layers and heads must be ints."""
        items = [(layer, head_set(layer, h, "copy")) for layer, h in heads.items()]
        check_indices(items, "copy")
        return cls({layer: h for layer, h in sorted(items) if h}, **conditions)

    @property
    def conditional(self) -> bool:
        return self.max_tokens is not None or self.decode_steps is not None

    def n_copied(self) -> int:
        return sum(len(h) for h in self.heads.values())

    def fraction(self, layers: int, heads: int) -> float:
        """Fraction of all (layer, head) pairs the plan copies."""
        return self.n_copied() / (layers * heads)

    def per_layer(self, layers: int) -> list[int]:
        return [len(self.heads.get(layer, ())) for layer in range(layers)]

    def to_json(self) -> dict:
        return {
            "heads": {str(layer): sorted(h) for layer, h in self.heads.items()},
            "max_tokens": self.max_tokens,
            "decode_steps": self.decode_steps,
        }


def head_set(layer: object, heads: Iterable[int], kind: str) -> frozenset:
    """The heads of one layer of a `kind` ("copy", "streaming") plan as a set; a string or a non-collection is
    refused."""
    if isinstance(heads, str | bytes) or not isinstance(heads, Iterable):
        raise SinkEvalError(f"a {kind} plan maps each layer to a collection of head ints; layer {layer} has {heads!r}")
    return frozenset(heads)


def check_indices(items: Iterable[tuple[object, Iterable[object]]], kind: str) -> None:
    """Rule: a plan's layers and heads are ints (not bools, floats or strings), so that it does what it counts."""
    for layer, heads in items:
        if not is_index(layer):
            raise SinkEvalError(f"a {kind} plan's layers are ints, not {layer!r} ({type(layer).__name__})")
        bad = [h for h in heads if not is_index(h)]
        if bad:
            name = type(bad[0]).__name__
            raise SinkEvalError(f"a {kind} plan's heads are ints; layer {layer} names {bad[0]!r} ({name})")


def check_plan(model: torch.nn.Module, plan: CopyPlan) -> Shape:
    """The model's shape, after checking that the patch supports it and that the plan fits it."""
    shape = model_shape(model)
    if shape.model_type not in SUPPORTED_MODEL_TYPES:
        raise SinkEvalError(
            f"the copy patch supports {', '.join(SUPPORTED_MODEL_TYPES)} models, not {shape.model_type!r}"
        )
    for layer, heads in plan.heads.items():
        if not 0 <= layer < shape.layers:
            raise SinkEvalError(f"the plan names layer {layer}; the model has layers 0..{shape.layers - 1}")
        bad = sorted(h for h in heads if not 0 <= h < shape.heads)
        if bad:
            raise SinkEvalError(
                f"the plan names head(s) {bad} of layer {layer}; the model has heads 0..{shape.heads - 1}"
            )
    for name in ("max_tokens", "decode_steps"):
        value = getattr(plan, name)
        if value is not None and value < 1:
            raise SinkEvalError(f"a hybrid plan's {name} must be at least 1, not {value}")
    return shape


@dataclass(frozen=True)
class _LayerPlan:
    copied: torch.Tensor  # query heads copied
    copied_groups: torch.Tensor  # their KV groups
    attending: list[int]  # query heads that still attend
    kept_groups: list[int]  # KV groups with at least one attending head
    dropped_groups: frozenset[int]  # KV groups whose every query head is copied


def _layer_plan(heads: frozenset[int], shape: Shape) -> _LayerPlan:
    g = shape.group_size
    attending = [h for h in range(shape.heads) if h not in heads]
    kept_groups = sorted({h // g for h in attending})
    copied = torch.tensor(sorted(heads), dtype=torch.long)
    dropped = frozenset(range(shape.kv_heads)) - set(kept_groups)
    return _LayerPlan(copied, copied // g, attending, kept_groups, dropped)


class _State:
    def __init__(self, plan: CopyPlan, shape: Shape, row_heads: dict[int, torch.Tensor] | None = None):
        self.plan = plan
        self.shape = shape
        self.layers = {layer: _layer_plan(heads, shape) for layer, heads in plan.heads.items()}
        self.row_heads = row_heads  # per-row plans (`_row_heads`), or None
        self.first_of_mask: tuple[torch.Tensor | None, torch.Tensor] | None = None
        self.cache: DynamicCache | None = None
        self.errors: dict[int, float] = {}  # per layer, filled by error_attention (layer_errors)


_ACTIVE: contextvars.ContextVar[_State | None] = contextvars.ContextVar("sink_eval_patch", default=None)


def _row_heads(rows: Sequence[CopyPlan], shape: Shape, device: torch.device) -> dict[int, torch.Tensor]:
    """Per layer, a (rows, heads) boolean tensor on `device`: which query heads each row copies (layers copying none
    left out)."""
    heads = {}
    for layer in sorted({layer for plan in rows for layer in plan.heads}):
        mask = torch.zeros(len(rows), shape.heads, dtype=torch.bool)
        for row, plan in enumerate(rows):
            mask[row, sorted(plan.heads.get(layer, ()))] = True
        heads[layer] = mask.to(device)
    return heads


def _first_positions(state: _State, mask: torch.Tensor | None, batch: int, t_len: int, device) -> torch.Tensor:
    """First non-padding position per row, read off the diagonal of a full-pass boolean mask (a token sees itself)."""
    if mask is None:
        return torch.zeros(batch, dtype=torch.long, device=device)
    if state.first_of_mask is not None and state.first_of_mask[0] is mask:
        return state.first_of_mask[1]
    if mask.dtype != torch.bool:
        raise SinkEvalError("the copy patch expects SDPA's boolean masks")
    diagonal = torch.diagonal(mask[:, 0, :, mask.shape[-1] - t_len :], dim1=-2, dim2=-1)
    first = diagonal.long().argmax(dim=-1)
    state.first_of_mask = (mask, first)
    return first


def plan_applies(plan: CopyPlan, seq_len: int, decode_step: int) -> bool:
    """Whether a (hybrid) plan copies in a forward pass over `seq_len` positions; decode step 0 is the prefill."""
    if plan.max_tokens is not None and seq_len > plan.max_tokens:
        return False
    return plan.decode_steps is None or 1 <= decode_step <= plan.decode_steps


def copy_attention(
    module: torch.nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: torch.Tensor | None,
    dropout: float = 0.0,
    scaling: float | None = None,
    **kwargs,
) -> tuple[torch.Tensor, None]:
    """query (B, H, T, D), key/value (B, H_kv', S, D) -> (B, T, H, D): copied heads get V[first], others SDPA."""
    state = seam.active_state(_ACTIVE, module, kwargs, "copy")
    if state.row_heads is not None:
        rows = _copy_rows(state, state.row_heads, module, query, key, value, attention_mask, dropout, scaling, **kwargs)
        return rows, None
    out = _planned_output(state, module, query, key, value, attention_mask, scaling)
    if out is None:
        return sdpa_attention_forward(module, query, key, value, attention_mask, dropout, scaling, **kwargs)
    return out, None


def _planned_output(
    state: _State,
    module: torch.nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: torch.Tensor | None,
    scaling: float | None,
) -> torch.Tensor | None:
    """The patched attention output (B, T, H, D) of one layer under the state's single plan; None where the plan
    copies nothing in this layer and forward pass (the exact attention applies)."""
    layer = state.layers.get(module.layer_idx)
    cache_layer = None if state.cache is None else state.cache.layers[module.layer_idx]
    batch, heads, t_len, dim = query.shape
    if isinstance(cache_layer, _CopyCacheMixin):
        seq_len, decode_step = cache_layer.seen, cache_layer.updates - 1
    else:
        seq_len, decode_step = key.shape[2], 0
        if t_len != key.shape[2]:
            raise SinkEvalError(
                "generation with a copy plan needs the plan's cache: use sink_eval.patches.copy.generate()"
            )
    if layer is None or not plan_applies(state.plan, seq_len, decode_step):
        return None
    if isinstance(cache_layer, _CopyCacheMixin):
        first_values, kv_index = cache_layer.first_values, cache_layer.kv_index
        assert first_values is not None, "the cache layer's update, which sets V[first], runs before attention"
    else:
        first = _first_positions(state, attention_mask, batch, t_len, query.device)
        first_values = value[torch.arange(batch, device=value.device), :, first]  # (B, H_kv, D)
        kv_index = {group: group for group in range(state.shape.kv_heads)}

    out = query.new_empty(batch, t_len, heads, dim)
    if layer.attending:
        attend, result = attend_heads(
            layer.attending,
            layer.kept_groups,
            state.shape.group_size,
            query,
            key,
            value,
            attention_mask,
            kv_index,
            scaling,
        )
        out[:, :, attend] = result.transpose(1, 2)
    out[:, :, layer.copied] = first_values[:, layer.copied_groups].unsqueeze(1).to(out.dtype)
    return out


def _first_of(state: _State, mask: torch.Tensor | None, query: torch.Tensor) -> torch.Tensor:
    return _first_positions(state, mask, query.shape[0], query.shape[2], query.device)


error_attention = seam.error_attention(_ACTIVE, "copy", _planned_output, _first_of)


def _copy_rows(
    state: _State,
    row_heads: Mapping[int, torch.Tensor],
    module,
    query,
    key,
    value,
    attention_mask,
    dropout,
    scaling,
    **kwargs,
) -> torch.Tensor:
    """Per-row plans: every head's exact attention, then each row's copied heads overwritten with its V[first]."""
    exact, _ = sdpa_attention_forward(module, query, key, value, attention_mask, dropout, scaling, **kwargs)
    copied = row_heads.get(module.layer_idx)
    if copied is None:
        return exact
    batch, _, t_len, _ = query.shape
    if copied.shape[0] != batch:
        raise SinkEvalError(f"{copied.shape[0]} per-row plans for a batch of {batch} rows")
    first = _first_positions(state, attention_mask, batch, t_len, query.device)
    first_values = value[torch.arange(batch, device=value.device), :, first]  # (B, H_kv, D)
    first_values = first_values.repeat_interleave(state.shape.group_size, dim=1).unsqueeze(1)  # (B, 1, H, D)
    return torch.where(copied[:, None, :, None], first_values.to(exact.dtype), exact)


def select_heads(x: torch.Tensor, heads: list[int]) -> torch.Tensor:
    """x[:, heads] for x (B, H, ...): a view where the heads are a contiguous range, else a gathered copy."""
    if heads and heads == list(range(heads[0], heads[0] + len(heads))):
        return x[:, heads[0] : heads[0] + len(heads)]
    return x[:, heads]


def attend_heads(
    attending: list[int],
    kept_groups: list[int],
    group_size: int,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    mask: torch.Tensor | None,
    kv_index: dict[int, int],
    scaling: float | None,
) -> tuple[list[int], torch.Tensor]:
    """SDPA for the query heads `attending` (of the KV groups `kept_groups`; `kv_index`: group -> row of key/value), in
    one call: (the query heads computed, their output (B, h, T, D)).

    Prefill is compute-bound: exactly the attending heads are computed, each with its KV head gathered (a copy of
    O(S D) per head, small beside the O(T S D) attention). Decode is bound by the bytes of K/V read: every head of a
    kept KV group is computed against that group's K/V, read once (GQA), and no K/V is copied; the copied heads'
    rows are overwritten afterwards.
    """
    sdpa = torch.nn.functional.scaled_dot_product_attention
    t_len = query.shape[2]
    if t_len > 1:
        kv = torch.tensor([kv_index[h // group_size] for h in attending], device=key.device)
        result = sdpa(
            select_heads(query, attending),
            key.index_select(1, kv),
            value.index_select(1, kv),
            attn_mask=mask,
            scale=scaling,
            is_causal=mask is None,
        )
        return attending, result
    heads = [group * group_size + i for group in kept_groups for i in range(group_size)]
    rows = [kv_index[group] for group in kept_groups]
    if rows != list(range(key.shape[1])):
        index = torch.tensor(rows, device=key.device)
        key, value = key.index_select(1, index), value.index_select(1, index)
    result = sdpa(select_heads(query, heads), key, value, attn_mask=mask, scale=scaling, enable_gqa=group_size > 1)
    return heads, result


class _CopyCacheMixin(DynamicLayer):
    """A cache layer that keeps V[first] of every KV group and stores only the groups some head still attends with.

    Mixed in before `DynamicLayer` or a subclass of it (`DynamicSlidingWindowLayer`), whose `update` it wraps."""

    def setup(self, first: torch.Tensor, kept_groups: list[int]) -> None:
        self.first = first
        self.kept_groups = torch.tensor(kept_groups, dtype=torch.long)
        self.kv_index = {group: j for j, group in enumerate(kept_groups)}
        self.first_values: torch.Tensor | None = None
        self.seen = 0
        self.updates = 0

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args, **kwargs):
        if self.first_values is None:
            rows = torch.arange(value_states.shape[0], device=value_states.device)
            self.first_values = value_states[rows, :, self.first.to(value_states.device)]
        self.seen += key_states.shape[-2]
        self.updates += 1
        if len(self.kept_groups) != key_states.shape[1]:
            kept = self.kept_groups.to(key_states.device)
            key_states, value_states = key_states[:, kept], value_states[:, kept]
        return super().update(key_states, value_states, *args, **kwargs)

    def get_seq_length(self) -> int:
        return self.seen


class CopyLayer(_CopyCacheMixin, DynamicLayer):
    pass


class CopySlidingLayer(_CopyCacheMixin, DynamicSlidingWindowLayer):
    pass


@contextmanager
def patched(
    model: torch.nn.Module, plan: CopyPlan | Sequence[CopyPlan], cache: DynamicCache | None = None
) -> Iterator[None]:
    """Run `model` with the plan's heads copied inside the block; the previous attention is restored on exit,
    also after an exception. `cache` is the plan's own cache (`new_cache`), needed to decode token by token.
    A sequence of plans gives each batch row its own plan (full forward passes only; see the module docstring)."""
    if isinstance(plan, CopyPlan):
        state = _State(plan, check_plan(model, plan))
    else:
        rows = list(plan)
        for row in rows:
            check_plan(model, row)
            if row.conditional:
                raise SinkEvalError("per-row plans are unconditional: resolve a hybrid plan for each row first")
        if cache is not None:
            raise SinkEvalError("per-row plans score full forward passes; generate under one plan")
        shape = model_shape(model)
        state = _State(CopyPlan(), shape, _row_heads(rows, shape, next(model.parameters()).device))
    state.cache = cache
    with seam.running(model, _ACTIVE, state, PATCH_ATTENTION, copy_attention, patch=True):
        yield


def new_cache(model: torch.nn.Module, plan: CopyPlan, attention_mask: torch.Tensor) -> DynamicCache:
    """A KV cache for generating under `plan`: every layer keeps V[first]; an unconditional plan drops the KV groups
    whose query heads are all copied."""
    shape = check_plan(model, plan)
    cache = DynamicCache(config=model.config)
    first = first_positions(attention_mask)
    for index, layer in enumerate(cache.layers):
        dropped = set() if plan.conditional else _layer_plan(plan.heads.get(index, frozenset()), shape).dropped_groups
        kept = [group for group in range(shape.kv_heads) if group not in dropped]
        if type(layer) is DynamicSlidingWindowLayer:
            replacement = CopySlidingLayer(sliding_window=layer.sliding_window)
        elif type(layer) is DynamicLayer:
            replacement = CopyLayer()
        else:
            raise SinkEvalError(f"the copy patch does not support {type(layer).__name__} cache layers")
        replacement.setup(first, kept)
        cache.layers[index] = replacement
    return cache


def kv_cache_bytes(cache: DynamicCache) -> int:
    """KV bytes a cache holds: the nbytes of every floating-point tensor its layers hold (keys and values; a copy
    layer's first-token values; a streaming layer's sink and ring slots), each tensor once. Integer bookkeeping
    (positions, group indices) is not counted."""
    seen: set[int] = set()
    total = 0
    for layer in cache.layers:
        for tensor in vars(layer).values():
            if isinstance(tensor, torch.Tensor) and tensor.is_floating_point() and id(tensor) not in seen:
                seen.add(id(tensor))
                total += tensor.numel() * tensor.element_size()
    return total


def generate(
    model: torch.nn.Module,
    plan: CopyPlan,
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor | None = None,
    max_new_tokens: int = 32,
    logits_processor: LogitsProcessorList | None = None,
) -> tuple[torch.Tensor, DynamicCache]:
    """Greedy generation under `plan` with the plan's KV cache: (prompt + new token ids, the cache).
    `max_new_tokens` is at least 1; `logits_processor` as in `seam.greedy`."""
    return seam.generate(model, plan, new_cache, patched, input_ids, attention_mask, max_new_tokens, logits_processor)


def layer_errors(
    model: torch.nn.Module, plan: CopyPlan, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None
) -> dict[int, float]:
    """Per-layer relative error of the patched attention output against the exact one on the same input.

    error(l) = ||O_patched(l) - O_exact(l)|| / ||O_exact(l)|| (Frobenius norms over heads, features and non-padding
    queries), both computed from the exact model's hidden states: each layer's own error, not accumulated ones.
    Layers the plan does not touch have error 0 and are left out.
    """
    state = _State(plan, check_plan(model, plan))
    return seam.layer_errors(model, _ACTIVE, state, ERROR_ATTENTION, error_attention, input_ids, attention_mask)
