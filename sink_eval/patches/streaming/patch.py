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
from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F

from sink_eval.core.shape import Shape
from sink_eval.patches.base import PatchState, attend_heads, select_heads
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

    def output(
        self,
        module: torch.nn.Module,
        query: torch.Tensor,
        key: torch.Tensor,
        value: torch.Tensor,
        mask: torch.Tensor | None,
        scaling: float | None,
    ) -> torch.Tensor | None:
        """The patched attention output (B, T, H, D) of one layer; None where the plan streams nothing in it."""
        layer = self.layers.get(module.layer_idx)
        if layer is None:
            return None
        heads, t_len = query.shape[1], query.shape[2]
        cache_layer = None if self.cache is None else self.cache.layers[module.layer_idx]
        streaming = cache_layer if isinstance(cache_layer, StreamingLayer) else None
        kv_index = streaming.kv_index if streaming is not None else {k: k for k in range(self.shape.kv_heads)}
        first = self.first(mask, query, key)
        parts: list[tuple[list[int], torch.Tensor]] = []  # (query heads, their output (B, T, h, D)), in order
        if layer.attending:
            attend, result = attend_heads(layer, self.shape.group_size, query, key, value, mask, kv_index, scaling)
            parts.append((attend, result.transpose(1, 2)))
        step = None if streaming is None else streaming.release_step()
        stream_index = {} if streaming is None else streaming.stream_index
        q = select_heads(query, layer.planned)
        g = self.shape.group_size
        plan = self.plan
        if key.shape[2] == t_len:  # a full pass: no earlier context
            groups = layer.planned_groups if layer.whole else [h // g for h in layer.planned]
            keys, values = _full_pass_kv(groups, kv_index, stream_index, key, value, step)
            streamed = banded_attention(q, keys, values, self.layout(t_len, first, q.dtype), scaling)
        else:
            keys, values, positions = _window_kv(
                plan, layer.planned_groups, kv_index, stream_index, key, value, step, first, t_len
            )
            last_first = self.cache.last_first if self.cache is not None else int(first.max())
            if layer.whole and t_len == 1 and key.shape[2] >= last_first + plan.sink + plan.window:
                # every slot holds a key the new token sees: no mask, each KV group read once
                streamed = F.scaled_dot_product_attention(q, keys, values, scale=scaling, enable_gqa=g > 1)
                streamed = streamed.transpose(1, 2)
            else:
                per_head = torch.tensor([layer.planned_groups.index(h // g) for h in layer.planned], device=key.device)
                keys, values, positions = (x.index_select(1, per_head) for x in (keys, values, positions))
                query_pos = torch.arange(key.shape[2] - t_len, key.shape[2], device=key.device)
                streamed = keyed_attention(
                    q, query_pos, keys, values, positions, first, plan.sink, plan.window, scaling
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


def _full_pass_kv(
    groups: list[int],
    kv_index: dict[int, int],
    stream_index: dict[int, int],
    key: torch.Tensor,
    value: torch.Tensor,
    step: StepKV | None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Keys and values (B, len(groups), N, D) of KV groups `groups` in a full pass over N positions: a kept group's
    from `key`/`value` (rows `kv_index`), a streamed group's from the step its cache layer left (rows
    `stream_index`)."""
    if step is None and groups == list(range(key.shape[1])):
        return key, value
    n = key.shape[2]

    def group(x: torch.Tensor, new: torch.Tensor | None, k: int) -> torch.Tensor:  # (B, N, D)
        if k in kv_index:
            return x[:, kv_index[k]]
        assert new is not None, "a streamed group's keys come from its cache layer's step"
        return new[:, stream_index[k], -n:]

    keys = torch.stack([group(key, None if step is None else step.keys, k) for k in groups], dim=1)
    values = torch.stack([group(value, None if step is None else step.values, k) for k in groups], dim=1)
    return keys, values


def _window_kv(
    plan: StreamingPlan,
    groups: list[int],
    kv_index: dict[int, int],
    stream_index: dict[int, int],
    key: torch.Tensor,
    value: torch.Tensor,
    step: StepKV | None,
    first: torch.Tensor,
    t_len: int,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The key set of a decode step (T new tokens, N positions in all) for KV groups `groups`: keys/values
    (B, k, M, D) and their positions (B, k, M). A kept group's sinks and last w + T − 1 keys (w + T after T > 1: the
    size of a streamed group's step) are gathered from its full cache; a streamed group's are the step its cache
    layer left (M = s + w for one new token, s + w + T otherwise)."""
    s, w = plan.sink, plan.window
    n = key.shape[2]
    device = key.device
    sink_pos = first[:, None] + torch.arange(s, device=device)  # (B, s)
    sink_pos = torch.where(sink_pos < n, sink_pos, -1)
    recent = torch.arange(n - w - t_len + (t_len == 1), n, device=device).expand(len(first), -1)
    recent = torch.where((recent >= 0) & (recent - first[:, None] >= s), recent, -1)
    gathered_pos = torch.cat([sink_pos, recent], dim=1)  # (B, M); a sink is held by its sink slot only
    rows = gathered_pos.clamp(min=0)[:, :, None].expand(-1, -1, key.shape[-1])
    keys, values, positions = [], [], []
    for k in groups:
        if k in kv_index:
            keys.append(key[:, kv_index[k]].gather(1, rows))
            values.append(value[:, kv_index[k]].gather(1, rows))
            positions.append(gathered_pos)
        else:
            assert step is not None, "a streamed group's keys come from its cache layer's step"
            keys.append(step.keys[:, stream_index[k]])
            values.append(step.values[:, stream_index[k]])
            positions.append(step.positions)
    return torch.stack(keys, 1), torch.stack(values, 1), torch.stack(positions, 1)
