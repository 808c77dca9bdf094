"""The copy plan: a planned head skips its attention and outputs the first token's value instead.

A head whose attention is all on the first token outputs that token's value vector, whatever the query. The copy
plan turns that into a shortcut (`allowed`: a planned head's query sees the row's first non-padding token only): its
attention writes V[first] (through the GQA mapping) for the planned heads and runs SDPA on the other heads only, so
a copied head computes no scores at all. A hybrid plan copies only in forward passes whose sequence, cache included,
is at most `max_tokens` long, and/or only in the first `decode_steps` decode steps (the prefill is then exact).

With `new_cache` (or `generate`), each layer keeps the first token's values, and a KV group all of whose query heads
are copied is not cached beyond them: its keys and values are never read again. That is the KV memory the plan
saves. A conditional (hybrid) plan keeps the whole cache, since the exact attention resumes once its condition ends.

`rows_patched(model, [plan_0, plan_1, ...])` gives each batch row its own (unconditional) plan, as per-prompt
policies need when their requests are scored in batches: every head is computed and each row's copied heads are
then overwritten with that row's V[first]. The outputs are those of each row run alone under its plan; the speed is
not the patch's (nothing is skipped).
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass

import torch
from transformers.cache_utils import Cache, DynamicLayer, DynamicSlidingWindowLayer

from sink_eval.core.errors import SinkEvalError
from sink_eval.core.shape import Shape
from sink_eval.patches.base import AttentionCall, PatchState, Plan, PlanCache, attend_heads, running


@dataclass(frozen=True)
class CopyPlan(Plan):
    """Which query heads to copy, per layer (0-based), and when.

    `max_tokens` (hybrid): copy only in forward passes whose sequence, cache included, is at most that long.
    `decode_steps` (hybrid): copy only in the first k decode steps (the prefill is exact).
    """

    kind = "copy"
    max_tokens: int | None = None
    decode_steps: int | None = None

    def allowed(self, query_pos: torch.Tensor, key_pos: torch.Tensor, first: torch.Tensor) -> torch.Tensor:
        return key_pos == first

    @property
    def conditional(self) -> bool:
        return self.max_tokens is not None or self.decode_steps is not None

    def applies(self, seq_len: int, decode_step: int) -> bool:
        if not self.heads or (self.max_tokens is not None and seq_len > self.max_tokens):
            return False
        return self.decode_steps is None or 1 <= decode_step <= self.decode_steps

    def work_removed(self, shape: Shape, seq_len: int, decode_step: int) -> float:
        """f = the fraction of (layer, head) pairs copied, in a forward pass where the plan applies (else 0)."""
        return self.fraction(shape.layers, shape.heads) if self.applies(seq_len, decode_step) else 0.0

    def kv_groups_removed(self, shape: Shape) -> int:
        """The KV groups all of whose heads are copied (not cached beyond V[first]); none for a hybrid plan."""
        return 0 if self.conditional else self.n_whole_groups(shape)

    def check(self, model: torch.nn.Module) -> Shape:
        shape = super().check(model)
        for name in ("max_tokens", "decode_steps"):
            value = getattr(self, name)
            if value is not None and value < 1:
                raise SinkEvalError(f"a hybrid plan's {name} must be at least 1, not {value}")
        return shape

    def state(self, model: torch.nn.Module, cache: Cache | None) -> CopyState:
        return CopyState(self, self.check(model), cache)

    def new_cache(self, model: torch.nn.Module, attention_mask: torch.Tensor) -> PlanCache:
        """Every layer keeps V[first]; an unconditional plan drops the KV groups whose query heads are all copied."""
        shape = self.check(model)
        cache = PlanCache(model, attention_mask)
        state = CopyState(self, shape, None)
        for index, layer in enumerate(cache.layers):
            heads = state.layers.get(index)
            dropped = set() if self.conditional or heads is None else heads.dropped_groups
            kept = [group for group in range(shape.kv_heads) if group not in dropped]
            if type(layer) is DynamicSlidingWindowLayer:
                replacement: CopyCacheLayer = CopySlidingLayer(sliding_window=layer.sliding_window)
            elif type(layer) is DynamicLayer:
                replacement = CopyLayer()
            else:
                raise SinkEvalError(f"the copy patch does not support {type(layer).__name__} cache layers")
            replacement.setup(cache.first, kept)
            cache.layers[index] = replacement
        return cache


class CopyState(PatchState):
    """A copy plan running: planned heads get V[first], the others SDPA; or, with `row_heads`, one plan per row."""

    plan: CopyPlan

    def __init__(self, plan: CopyPlan, shape: Shape, cache: Cache | None, row_heads: dict | None = None):
        super().__init__(plan, shape, cache)
        g = shape.group_size
        self.copied = {i: torch.tensor(layer.planned, dtype=torch.long) for i, layer in self.layers.items()}
        self.copied_groups = {i: heads // g for i, heads in self.copied.items()}
        self.row_heads: dict[int, torch.Tensor] | None = row_heads  # layer -> (rows, heads) bool (`rows_patched`)

    def output(self, call: AttentionCall) -> torch.Tensor | None:
        if self.row_heads is not None:
            return self._rows_output(call)
        layer = self.layers.get(call.layer)
        cache_layer = None if self.cache is None else self.cache.layers[call.layer]
        batch, heads, t_len, dim = call.query.shape
        if isinstance(cache_layer, CopyCacheLayer):
            seq_len, decode_step = cache_layer.seen, cache_layer.updates - 1
        else:
            seq_len, decode_step = call.key.shape[2], 0
            if not call.full_pass:
                raise SinkEvalError("generation with a copy plan needs the plan's cache: use CopyPlan.generate()")
        if layer is None or not self.plan.applies(seq_len, decode_step):
            return None
        if isinstance(cache_layer, CopyCacheLayer):
            first_values, kv_index = cache_layer.first_values, cache_layer.kv_index
            assert first_values is not None, "the cache layer's update, which sets V[first], runs before attention"
        else:
            first_values = self.first_values(call)
            kv_index = {group: group for group in range(self.shape.kv_heads)}
        out = call.query.new_empty(batch, t_len, heads, dim)
        if layer.attending:
            attend, result = attend_heads(layer, self.shape.group_size, call, call.key, call.value, kv_index)
            out[:, :, attend] = result.transpose(1, 2)
        out[:, :, self.copied[call.layer]] = first_values[:, self.copied_groups[call.layer]].unsqueeze(1).to(out.dtype)
        return out

    def first_values(self, call: AttentionCall) -> torch.Tensor:
        """V[first] of each row and KV group: (B, H_kv, D)."""
        value = call.value
        return value[torch.arange(value.shape[0], device=value.device), :, self.first(call)]

    def _rows_output(self, call: AttentionCall) -> torch.Tensor:
        """Per-row plans: every head's exact attention, then each row's copied heads overwritten with its V[first]."""
        assert self.row_heads is not None, "called for per-row plans only"
        exact = call.exact()
        copied = self.row_heads.get(call.layer)
        if copied is None:
            return exact
        batch = call.query.shape[0]
        if copied.shape[0] != batch:
            raise SinkEvalError(f"{copied.shape[0]} per-row plans for a batch of {batch} rows")
        first_values = self.first_values(call).repeat_interleave(self.shape.group_size, dim=1).unsqueeze(1)  # (B,1,H,D)
        return torch.where(copied[:, None, :, None], first_values.to(exact.dtype), exact)


@contextmanager
def rows_patched(model: torch.nn.Module, plans: Sequence[CopyPlan]) -> Iterator[None]:
    """Run `model` with batch row i under `plans[i]` inside the block (full forward passes only; module doc)."""
    for plan in plans:
        plan.check(model)
        if plan.conditional:
            raise SinkEvalError("per-row plans are unconditional: resolve a hybrid plan for each row first")
    empty = CopyPlan()
    shape = empty.check(model)
    device = next(model.parameters()).device
    heads = {}
    for layer in sorted({layer for plan in plans for layer in plan.heads}):
        mask = torch.zeros(len(plans), shape.heads, dtype=torch.bool)
        for row, plan in enumerate(plans):
            mask[row, sorted(plan.heads.get(layer, ()))] = True
        heads[layer] = mask.to(device)
    with running(model, CopyState(empty, shape, None, heads), empty.attention_name, patch=True):
        yield


class CopyCacheLayer(DynamicLayer):
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


class CopyLayer(CopyCacheLayer, DynamicLayer):
    pass


class CopySlidingLayer(CopyCacheLayer, DynamicSlidingWindowLayer):
    pass
