"""The constant-size decode cache of a streaming plan: a transformers `Cache` whose streamed KV groups keep s + w
entries.

`StreamingCache(model, plan, attention_mask)` is a `DynamicCache` (a `PlanCache`: `model.generate(..., cache=cache)`
uses it as it is) in which every layer with a streamed group (`Plan.whole_groups`: all its query heads stream) is a
`StreamingLayer`; the other layers are the model's own (`DynamicLayer`, Gemma 3's `DynamicSlidingWindowLayer`).
A `StreamingLayer` keeps
- the other KV groups of its layer in full, as a `DynamicLayer` does (`keys`, `values`: (B, kept groups, N, D));
- for each streamed group s sink slots, holding the first s real tokens of each row (left padding: the sinks are
  counted from each row's first non-padding token), and a ring buffer of w slots, where position p is written to
  slot s + p mod w (`stream_keys`, `stream_values`: (B, streamed groups, s + w, D); `stream_positions` (B, s + w):
  the position each slot holds, −1 for none). Keys are cached after RoPE, so a kept key keeps its own rotation and
  the ring buffer is exact. A position among a row's first s real tokens is held by its sink slot only.
Each update also leaves `step`, the streamed groups' key set of that forward pass, which the streaming attention
(`sink_eval.patches.streaming.patch`) reads once and releases, so between forward passes a streamed group holds
exactly s + w entries whatever the number of steps: in a decode step (one new token) the slots once it is written
(the position it overwrites, i − w, is out of its window); in a pass over T > 1 tokens the slots as they were
before it, followed by the new keys. The cache accepts updates only while the streaming patch runs with it
(`in_use`): the model's own attention would read the kept groups only.

KV bytes (`sink_eval.patches.base.kv_cache_bytes`) count every floating-point tensor a cache layer holds.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch
from transformers.cache_utils import DynamicLayer

from sink_eval.core.errors import SinkEvalError
from sink_eval.patches.base import HeadIndex, PlanCache, head_index, take

if TYPE_CHECKING:
    from sink_eval.patches.streaming.plan import StreamingPlan


@dataclass
class StepKV:
    """The streamed groups' key set of one forward pass: keys/values (B, streamed groups, s + w + T, D) at
    `positions` (B, s + w + T) (−1: an empty slot); the last T entries are the new tokens."""

    keys: torch.Tensor
    values: torch.Tensor
    positions: torch.Tensor


class _Use:
    """Whether the streaming patch is running with the cache (set by `StreamingCache.in_use`)."""

    active = False


class StreamingLayer(DynamicLayer):
    """A full-attention cache layer with some KV groups (`streamed`) held as s sink slots + a ring of w."""

    is_croppable = False

    def __init__(self, sink: int, window: int, streamed: list[int], kv_heads: int, first: torch.Tensor, use: _Use):
        super().__init__()
        self.sink, self.window = sink, window
        self.streamed = streamed
        self.full = [group for group in range(kv_heads) if group not in streamed]
        self.kv_index = {group: j for j, group in enumerate(self.full)}  # a kept group's row in `keys`
        self.stream_index = {group: j for j, group in enumerate(streamed)}  # a streamed group's row in the slots
        self.index: tuple[HeadIndex, HeadIndex, torch.device] | None = None  # streamed, full: on the keys' device
        self.first = first  # (B,) first non-padding position of each row
        self.last_first = int(first.max())  # the latest of them
        self.use = use
        self.seen = 0
        self.stream_keys: torch.Tensor | None = None
        self.stream_values: torch.Tensor | None = None
        self.stream_positions: torch.Tensor | None = None
        self.step: StepKV | None = None

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args, **kwargs):
        """key/value states (B, KV heads, T, D) -> the kept groups' keys and values (B, kept, N, D)."""
        if not self.use.active:
            raise SinkEvalError("a StreamingCache is updated only inside plan.patched(model, cache)")
        batch, _, t_len, dim = key_states.shape
        device = key_states.device
        if self.stream_keys is None:
            slots = self.sink + self.window
            self.stream_keys = key_states.new_zeros(batch, len(self.streamed), slots, dim)
            self.stream_values = value_states.new_zeros(batch, len(self.streamed), slots, dim)
            self.stream_positions = torch.full((batch, slots), -1, dtype=torch.long, device=device)
        assert self.stream_values is not None and self.stream_positions is not None
        if self.index is None or self.index[2] != device:
            self.index = (head_index(self.streamed, device), head_index(self.full, device), device)
        streamed, full, _ = self.index
        keys, values = take(key_states, streamed), take(value_states, streamed)
        positions = torch.arange(self.seen, self.seen + t_len, device=device)
        if t_len == 1 and self.seen > 0:  # a decode step: the slots once written are exactly its key set
            self._write(keys, values, positions)
            self.step = StepKV(self.stream_keys, self.stream_values, self.stream_positions)
        else:
            self.step = StepKV(
                torch.cat([self.stream_keys, keys], dim=2),
                torch.cat([self.stream_values, values], dim=2),
                torch.cat([self.stream_positions, positions.expand(batch, t_len)], dim=1),
            )
            self._write(keys, values, positions)
        self.seen += t_len
        return super().update(take(key_states, full), take(value_states, full))

    def _write(self, keys: torch.Tensor, values: torch.Tensor, positions: torch.Tensor) -> None:
        """Store new tokens (B, streamed, T, D) at `positions` (T,): a row's first s real tokens in its sink slots,
        the last w positions in the ring."""
        assert self.stream_keys is not None and self.stream_values is not None and self.stream_positions is not None
        batch, groups, t_len, dim = keys.shape
        s, first, start = self.sink, self.first.to(keys.device), self.seen
        if s > 0 and start < self.last_first + s:  # a row's sink may arrive
            sink_pos = first[:, None] + torch.arange(s, device=keys.device)  # (B, s)
            offset = sink_pos - start
            arriving = (offset >= 0) & (offset < t_len)
            index = offset.clamp(0, t_len - 1)[:, None, :, None].expand(batch, groups, s, dim)
            here = arriving[:, None, :, None]
            self.stream_keys[:, :, :s] = torch.where(here, keys.gather(2, index), self.stream_keys[:, :, :s])
            self.stream_values[:, :, :s] = torch.where(here, values.gather(2, index), self.stream_values[:, :, :s])
            self.stream_positions[:, :s] = torch.where(arriving, sink_pos, self.stream_positions[:, :s])
        last = min(t_len, self.window)
        if t_len == 1:
            slot = s + start % self.window
            self.stream_keys[:, :, slot] = keys[:, :, 0]
            self.stream_values[:, :, slot] = values[:, :, 0]
            if start >= self.last_first + s:  # no row's sink: every row keeps it
                self.stream_positions[:, slot] = start
            else:
                self.stream_positions[:, slot] = torch.where(start - first >= s, start, -1)
            return
        ring_pos = positions[-last:]
        slots = s + ring_pos % self.window
        self.stream_keys[:, :, slots] = keys[:, :, -last:]
        self.stream_values[:, :, slots] = values[:, :, -last:]
        self.stream_positions[:, slots] = torch.where(ring_pos[None] - first[:, None] >= s, ring_pos[None], -1)

    def release_step(self) -> StepKV:
        """This forward pass's key set of the streamed groups, no longer held by the cache."""
        step, self.step = self.step, None
        assert step is not None, "the cache layer's update, which leaves the step, runs before attention"
        return step

    def get_seq_length(self) -> int:
        return self.seen

    def get_mask_sizes(self, query_length: int) -> tuple[int, int]:
        """The mask of the kept groups spans every position seen, as a `DynamicLayer`'s does."""
        return self.seen + query_length, 0

    def reset(self) -> None:
        super().reset()
        self.seen = 0
        self.stream_keys = self.stream_values = self.stream_positions = None
        self.step = None

    def _unsupported(self, *args, **kwargs) -> None:
        raise SinkEvalError("the streaming cache decodes one sequence per row (greedy or sampled), not beams or crops")

    crop = reorder_cache = batch_repeat_interleave = batch_select_indices = _unsupported


class StreamingCache(PlanCache):
    """The decode cache of `plan` for a batch with this (left-padded) attention mask (B, N)."""

    def __init__(self, model: torch.nn.Module, plan: StreamingPlan, attention_mask: torch.Tensor):
        shape = plan.check(model)
        super().__init__(model, attention_mask)
        self.plan = plan
        self.use = _Use()
        for index, groups in plan.whole_groups(shape).items():
            if type(self.layers[index]) is not DynamicLayer:
                raise SinkEvalError(f"the streaming cache does not replace {type(self.layers[index]).__name__} layers")
            self.layers[index] = StreamingLayer(
                plan.sink, plan.window, sorted(groups), shape.kv_heads, self.first, self.use
            )

    @contextmanager
    def in_use(self) -> Iterator[None]:
        """Accept updates inside the block (the streaming patch's)."""
        self.use.active = True
        try:
            yield
        finally:
            self.use.active = False
