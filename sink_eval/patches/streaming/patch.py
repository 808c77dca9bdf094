"""The streaming patch: planned heads attend only to the s sink tokens and the last w keys, at that cost.

`StreamingState` is what the registered attention ("sink_streaming", `sink_eval.patches.base`) asks for each layer's
output while a `StreamingPlan` runs:
- a decode step (one new token after cached context, `StreamingState.decode_step`): one SDPA call over the keys the
  call holds (every KV group, or the plan cache's kept groups), query heads packed by KV group so that each group's
  keys are read once, with an additive mask whose row for a streamed head is open at its sinks and window only; and,
  with the plan's cache, one call over its streamed groups' s + w slots. A partly streamed group costs no second
  call and no gather;
- any other pass, in at most two calls: the heads that attend in full by SDPA with transformers' own mask, exactly
  as unpatched (`sink_eval.patches.base.attend_heads`, one call, each head with its KV group); the streamed heads in
  one call: in a full pass (no earlier context) `banded.banded_attention`, work O(N (s + w)); in a chunk of T > 1
  tokens after cached context `banded.keyed_attention` over the s sinks and the last w (+ T) keys only. Streamed
  heads that make up whole KV groups share their groups' keys (GQA); others get their group's keys gathered per head.
A layer without streamed heads runs transformers' own SDPA function, so an empty plan is the unpatched model.

Decoding: with the plan's `StreamingCache` (`plan.new_cache`, `plan.generate`), streamed groups keep s + w entries;
with transformers' own cache (plain `model.generate` inside `plan.patched(model)`) every entry is kept and the
streamed heads read their sinks and window from it: the same outputs, no memory saved. Positions count from each
row's first non-padding token: read off the attention mask in a pass without the plan's cache, held by the cache
otherwise.
"""

from __future__ import annotations

from contextlib import AbstractContextManager, nullcontext
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F

from sink_eval.core.shape import Shape
from sink_eval.patches.base import (
    AttentionCall,
    HeadIndex,
    LayerHeads,
    PatchState,
    attend_heads,
    head_index,
    select_heads,
    take,
)
from sink_eval.patches.streaming.banded import (
    BandLayout,
    additive,
    allowed,
    band_layout,
    banded_attention,
    keyed_attention,
)
from sink_eval.patches.streaming.cache import StepKV, StreamingCache, StreamingLayer

if TYPE_CHECKING:
    from sink_eval.patches.streaming.plan import StreamingPlan

LAYOUTS_KEPT = 4  # band layouts remembered per patch (one per distinct input length and padding)


class StreamingState(PatchState):
    """A streaming plan running: its layers' streamed and attending heads, its cache, and its band layouts."""

    plan: StreamingPlan
    cache: StreamingCache | None

    def __init__(self, plan: StreamingPlan, shape: Shape, cache: StreamingCache | None):
        super().__init__(plan, shape, cache)
        self.layouts: dict[tuple, BandLayout] = {}
        self.decode_heads: dict[int, DecodeHeads] = {}  # per layer, made at its first decode step
        self._rows: tuple[tuple, torch.Tensor, torch.Tensor | None] | None = None  # decode_mask's, with their key

    def using(self) -> AbstractContextManager[object]:
        return self.cache.in_use() if self.cache is not None else nullcontext()

    def layout(self, n: int, first: torch.Tensor, dtype: torch.dtype) -> BandLayout:
        """The band layout of N = n positions with these first positions, made once per patch and shape."""
        key = (n, tuple(first.tolist()), dtype, first.device)
        if key not in self.layouts:
            if len(self.layouts) >= LAYOUTS_KEPT:
                self.layouts.pop(next(iter(self.layouts)))
            self.layouts[key] = band_layout(n, first, self.plan.sink, self.plan.window, dtype)
        return self.layouts[key]

    def output(self, call: AttentionCall) -> torch.Tensor | None:
        """The patched attention output (B, T, H, D) of one layer; None where the plan streams nothing in it."""
        layer = self.layers.get(call.layer)
        if layer is None:
            return None
        query, key, value = call.query, call.key, call.value
        heads, t_len = query.shape[1], query.shape[2]
        cache_layer = None if self.cache is None else self.cache.layers[call.layer]
        streaming = cache_layer if isinstance(cache_layer, StreamingLayer) else None
        first = self.first(call)
        if t_len == 1 and not call.full_pass:
            return self.decode_step(call, layer, streaming, first)
        kv_index = streaming.kv_index if streaming is not None else {k: k for k in range(self.shape.kv_heads)}
        parts: list[tuple[list[int], torch.Tensor]] = []  # (query heads, their output (B, T, h, D)), in order
        if layer.attending:
            attend, result = attend_heads(layer, self.shape.group_size, call, key, value, kv_index)
            parts.append((attend, result.transpose(1, 2)))
        step = None if streaming is None else streaming.release_step()
        sources = GroupKV(key, value, kv_index, {} if streaming is None else streaming.stream_index, step)
        q = select_heads(query, layer.planned)
        g = self.shape.group_size
        if key.shape[2] == t_len:  # a full pass: no earlier context
            groups = layer.planned_groups if layer.whole else [h // g for h in layer.planned]
            keys, values = sources.full_pass(groups)
            streamed = banded_attention(q, keys, values, self.layout(t_len, first, q.dtype), call.scaling)
        else:
            keys, values, positions = sources.window(layer.planned_groups, self.plan, first, t_len)
            per_head = torch.tensor([layer.planned_groups.index(h // g) for h in layer.planned], device=key.device)
            keys, values, positions = (x.index_select(1, per_head) for x in (keys, values, positions))
            query_pos = torch.arange(key.shape[2] - t_len, key.shape[2], device=key.device)
            streamed = keyed_attention(
                q, query_pos, keys, values, positions, first, self.plan.sink, self.plan.window, call.scaling
            )
        parts.append((layer.planned, streamed))
        return _assemble(parts, heads)

    def decode_step(
        self, call: AttentionCall, layer: LayerHeads, streaming: StreamingLayer | None, first: torch.Tensor
    ) -> torch.Tensor:
        """One new token's attention output (B, 1, H, D) in one SDPA call per kind of key set, each KV group's keys
        read once (query heads packed by group, as transformers packs GQA for one query):
        - the groups the call's `key`/`value` hold (B, k', N, D) (every group, or a plan cache's kept groups): one
          call over all N keys with an additive mask per head, a planned head's row open at its sinks and window only,
          another head's as the model's own mask;
        - a plan cache's streamed groups: one call over their step's s + w slots, unmasked once every slot holds a
          key the new token sees."""
        query, key, value = call.query, call.key, call.value
        batch, _, _, dim = query.shape
        heads = self.decode_heads.get(call.layer)
        if heads is None:
            heads = self.decode_heads[call.layer] = DecodeHeads.of(layer, streaming, self.shape, query.device)
        g = self.shape.group_size
        outs = []
        if heads.kept is not None:
            q = take(query, heads.kept).reshape(batch, -1, g, dim)  # (B, k', g, D)
            mask = self.decode_mask(call, first, heads.planned)
            outs.append(F.scaled_dot_product_attention(q, key, value, attn_mask=mask, scale=call.scaling))
        if streaming is not None:
            step = streaming.release_step()
            q = take(query, heads.streamed).reshape(batch, -1, g, dim)  # (B, streamed groups, g, D)
            n, plan = key.shape[2], self.plan
            mask = None
            if n < streaming.last_first + plan.sink + plan.window:  # a slot may hold no key the new token sees
                ok = allowed(n - 1, step.positions[:, None, None, :], first.view(-1, 1, 1, 1), plan.sink, plan.window)
                mask = additive(ok, q.dtype)
            outs.append(F.scaled_dot_product_attention(q, step.keys, step.values, attn_mask=mask, scale=call.scaling))
        out = torch.cat(outs, dim=1) if len(outs) > 1 else outs[0]  # (B, groups, g, D): kept groups, then streamed
        out = out.reshape(batch, -1, dim)  # a CUDA kernel's output may be laid out (B, g, groups, D): no view
        if heads.inverse is not None:
            out = out.index_select(1, heads.inverse)
        return out.unsqueeze(1)

    def decode_mask(
        self, call: AttentionCall, first: torch.Tensor, planned: torch.Tensor | None
    ) -> torch.Tensor | None:
        """The additive mask (B, k', g, N) of a decode step over N keys: where `planned` (1, k', g, 1) the row of a
        streamed head (sinks and window), elsewhere the model's own (None: every key). The two rows (B, 1, 1, N) are
        made once per step (keyed by the mask, N, batch, dtype and device: every layer of a step shares them)."""
        n, query = call.key.shape[2], call.query
        key = (call.mask, n, len(first), query.dtype, query.device)
        if self._rows is None or self._rows[0][0] is not call.mask or self._rows[0][1:] != key[1:]:
            key_pos = torch.arange(n, device=call.key.device)
            ok = allowed(n - 1, key_pos, first[:, None], self.plan.sink, self.plan.window)  # (B, N)
            own = None if call.mask is None else additive(call.mask, call.query.dtype)
            self._rows = (key, additive(ok, call.query.dtype)[:, None, None, :], own)
        _, streamed_row, own_row = self._rows
        if planned is None:
            return own_row
        return torch.where(planned, streamed_row, 0.0 if own_row is None else own_row)


@dataclass(frozen=True)
class DecodeHeads:
    """One layer's query heads in a decode step: `kept` (the heads of the groups the call's keys hold, in their row
    order; None: no such group) with `planned` (1, k', g, 1), which of them stream (None: none); `streamed` (the heads
    of a plan cache's streamed groups, in its slot order); `inverse`: where each head's output is in the two calls'
    outputs laid end to end (None: already in order)."""

    kept: HeadIndex | None
    planned: torch.Tensor | None
    streamed: HeadIndex
    inverse: torch.Tensor | None

    @classmethod
    def of(cls, layer: LayerHeads, streaming: StreamingLayer | None, shape: Shape, device: torch.device) -> DecodeHeads:
        g = shape.group_size
        kept_groups = streaming.full if streaming is not None else list(range(shape.kv_heads))
        streamed_groups = streaming.streamed if streaming is not None else []
        kept = [k * g + i for k in kept_groups for i in range(g)]
        streamed = [k * g + i for k in streamed_groups for i in range(g)]
        planned = [h in layer.planned for h in kept]
        order = kept + streamed
        inverse = [order.index(h) for h in range(shape.heads)]

        return cls(
            kept=head_index(kept, device) if kept else None,
            planned=torch.tensor(planned, device=device).view(1, -1, g, 1) if any(planned) else None,
            streamed=head_index(streamed, device),
            inverse=None if inverse == list(range(shape.heads)) else torch.tensor(inverse, device=device),
        )


def _assemble(parts: list[tuple[list[int], torch.Tensor]], heads: int) -> torch.Tensor:
    """The layer's output (B, T, H, D) from (query heads, output (B, T, h, D)) parts, a later part overwriting an
    earlier one where they share heads: one concatenation where the parts are consecutive ranges of heads."""
    ordered = sorted(parts, key=lambda part: part[0][0])
    if [h for part, _ in ordered for h in part] == list(range(heads)):
        return torch.cat([out for _, out in ordered], dim=2)
    first = parts[0][1]
    out = first.new_empty(first.shape[0], first.shape[1], heads, first.shape[3])
    for part, values in parts:
        out[:, :, part] = values
    return out


@dataclass
class GroupKV:
    """Where one layer's KV groups' keys come from in a forward pass: a kept group's from the call's (or the cache's
    kept) `key`/`value` (B, H_kv', N, D) at row `kv_index[group]`; a streamed group's from the `step` its cache layer
    left, at row `stream_index[group]`."""

    key: torch.Tensor
    value: torch.Tensor
    kv_index: dict[int, int]
    stream_index: dict[int, int]
    step: StepKV | None

    def _streamed(self, k: int) -> StepKV:
        assert self.step is not None and k in self.stream_index, "a streamed group's keys come from its step"
        return self.step

    def full_pass(self, groups: list[int]) -> tuple[torch.Tensor, torch.Tensor]:
        """Keys and values (B, len(groups), N, D) of `groups` in a full pass over N positions."""
        if self.step is None and groups == list(range(self.key.shape[1])):
            return self.key, self.value
        n = self.key.shape[2]

        def of(k: int) -> tuple[torch.Tensor, torch.Tensor]:  # (B, N, D) each
            if k in self.kv_index:
                return self.key[:, self.kv_index[k]], self.value[:, self.kv_index[k]]
            step = self._streamed(k)
            return step.keys[:, self.stream_index[k], -n:], step.values[:, self.stream_index[k], -n:]

        keys, values = zip(*(of(k) for k in groups), strict=True)
        return torch.stack(keys, dim=1), torch.stack(values, dim=1)

    def window(
        self, groups: list[int], plan: StreamingPlan, first: torch.Tensor, t_len: int
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """The key set of a chunk of T > 1 new tokens after cached context (N positions in all) for `groups`:
        keys/values (B, k, M, D) and their positions (B, k, M), M = s + w + T. A kept group's sinks and last w + T keys
        (the size of a streamed group's step) are gathered from its full cache; a streamed group's are its step."""
        s, w = plan.sink, plan.window
        n = self.key.shape[2]
        device = self.key.device
        sink_pos = first[:, None] + torch.arange(s, device=device)  # (B, s)
        sink_pos = torch.where(sink_pos < n, sink_pos, -1)
        recent = torch.arange(n - w - t_len, n, device=device).expand(len(first), -1)
        recent = torch.where((recent >= 0) & (recent - first[:, None] >= s), recent, -1)
        gathered_pos = torch.cat([sink_pos, recent], dim=1)  # (B, M); a sink is held by its sink slot only
        rows = gathered_pos.clamp(min=0)[:, :, None].expand(-1, -1, self.key.shape[-1])
        keys, values, positions = [], [], []
        for k in groups:
            if k in self.kv_index:
                keys.append(self.key[:, self.kv_index[k]].gather(1, rows))
                values.append(self.value[:, self.kv_index[k]].gather(1, rows))
                positions.append(gathered_pos)
            else:
                step = self._streamed(k)
                keys.append(step.keys[:, self.stream_index[k]])
                values.append(step.values[:, self.stream_index[k]])
                positions.append(step.positions)
        return torch.stack(keys, 1), torch.stack(values, 1), torch.stack(positions, 1)
