"""The streaming patch: planned heads attend only to the s sink tokens and the last w keys, at that cost.

`StreamingState` is what the registered attention ("sink_streaming", `sink_eval.patches.base`) asks for each layer's
output while a `StreamingPlan` runs, computed in at most two attention calls:
- the heads that attend in full: SDPA with transformers' own mask, exactly as unpatched
  (`sink_eval.patches.base.attend_heads`, one call, each head with its KV group);
- the streamed heads, in one call: in a full pass (no earlier context) `banded.banded_attention`, work O(N (s + w));
  in a decode step (or a chunk after it) `banded.keyed_attention` over the s sinks and the last w (+ T) keys only, or,
  once every one of those slots holds a key the new token sees, plain SDPA over them without a mask. Streamed heads
  that make up whole KV groups share their groups' keys (GQA); others get their group's keys gathered per head.
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
from sink_eval.patches.base import AttentionCall, PatchState, attend_heads, select_heads
from sink_eval.patches.streaming.banded import BandLayout, band_layout, banded_attention, keyed_attention
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
        kv_index = streaming.kv_index if streaming is not None else {k: k for k in range(self.shape.kv_heads)}
        first = self.first(call)
        parts: list[tuple[list[int], torch.Tensor]] = []  # (query heads, their output (B, T, h, D)), in order
        if layer.attending:
            attend, result = attend_heads(layer, self.shape.group_size, call, key, value, kv_index)
            parts.append((attend, result.transpose(1, 2)))
        step = None if streaming is None else streaming.release_step()
        sources = GroupKV(key, value, kv_index, {} if streaming is None else streaming.stream_index, step)
        q = select_heads(query, layer.planned)
        g = self.shape.group_size
        plan = self.plan
        if key.shape[2] == t_len:  # a full pass: no earlier context
            groups = layer.planned_groups if layer.whole else [h // g for h in layer.planned]
            keys, values = sources.full_pass(groups)
            streamed = banded_attention(q, keys, values, self.layout(t_len, first, q.dtype), call.scaling)
        else:
            keys, values, positions = sources.window(layer.planned_groups, plan, first, t_len)
            last_first = self.cache.last_first if self.cache is not None else int(first.max())
            if layer.whole and t_len == 1 and key.shape[2] >= last_first + plan.sink + plan.window:
                # every slot holds a key the new token sees: no mask, each KV group read once
                streamed = F.scaled_dot_product_attention(q, keys, values, scale=call.scaling, enable_gqa=g > 1)
                streamed = streamed.transpose(1, 2)
            else:
                per_head = torch.tensor([layer.planned_groups.index(h // g) for h in layer.planned], device=key.device)
                keys, values, positions = (x.index_select(1, per_head) for x in (keys, values, positions))
                query_pos = torch.arange(key.shape[2] - t_len, key.shape[2], device=key.device)
                streamed = keyed_attention(
                    q, query_pos, keys, values, positions, first, plan.sink, plan.window, call.scaling
                )
        parts.append((layer.planned, streamed))
        return _assemble(parts, heads)


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
        """The key set of a decode step (T new tokens, N positions in all) for `groups`: keys/values (B, k, M, D) and
        their positions (B, k, M). A kept group's sinks and last w + T − 1 keys (w + T after T > 1: the size of a
        streamed group's step) are gathered from its full cache; a streamed group's are its step (M = s + w for one
        new token, s + w + T otherwise)."""
        s, w = plan.sink, plan.window
        n = self.key.shape[2]
        device = self.key.device
        sink_pos = first[:, None] + torch.arange(s, device=device)  # (B, s)
        sink_pos = torch.where(sink_pos < n, sink_pos, -1)
        recent = torch.arange(n - w - t_len + (t_len == 1), n, device=device).expand(len(first), -1)
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
