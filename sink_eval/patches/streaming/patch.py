"""The streaming patch: planned heads attend only to the s sink tokens and the last w keys, at that cost.

`patched(model, plan)` runs `model` with the registered attention implementation "sink_stream" (transformers'
`AttentionInterface`), per layer in at most two attention calls:
- the heads that attend in full: SDPA with transformers' own mask, exactly as unpatched
  (`sink_eval.patches.copy.attend_heads`, one call, each head with its KV group);
- the streamed heads, in one call: in a full pass (no earlier context) `sink_eval.patches.streaming.banded.banded_attention`, work
  O(N (s + w)); in a decode step (or a chunk after it) `sink_eval.patches.streaming.banded.keyed_attention` over the s sinks and the
  last w (+ T) keys only, or, once every one of those slots holds a key the new token sees, plain SDPA over them
  without a mask. Streamed heads that make up whole KV groups share their groups' keys (GQA); others get their
  group's keys gathered per head.
A layer without streamed heads runs transformers' own SDPA function, so an empty plan is the unpatched model.

Decoding: with `StreamingCache` (`new_cache`, `generate`), streamed groups keep s + w entries; with transformers'
own cache (plain `model.generate` inside `patched`) every entry is kept and the streamed heads read their sinks and
window from it: the same outputs, no memory saved. Positions count from each row's first non-padding token: read off
the attention mask in a pass without the plan's cache, held by the cache otherwise.

This module knows no statistics: plans come from `sink_eval.policies.base`, or from anyone.
"""

from __future__ import annotations

import contextvars
from collections.abc import Iterator
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from transformers import LogitsProcessorList
from transformers.integrations.sdpa_attention import sdpa_attention_forward

from sink_eval.core.errors import SinkEvalError
from sink_eval.core.shape import Shape
from sink_eval.patches import base as seam
from sink_eval.patches.copy import attend_heads, select_heads
from sink_eval.patches.streaming.banded import BandLayout, band_layout, banded_attention, keyed_attention
from sink_eval.patches.streaming.cache import StepKV, StreamingCache, StreamingLayer
from sink_eval.patches.streaming.plan import StreamingPlan, check_streaming_plan

STREAM_ATTENTION = "sink_stream"
STREAM_ERROR_ATTENTION = "sink_stream_error"  # layer_errors(): the exact attention, recording the patch's error
LAYOUTS_KEPT = 4  # band layouts remembered per patch (one per distinct input length and padding)


@dataclass(frozen=True)
class _LayerPlan:
    streamed: list[int]  # query heads that stream
    streamed_kv: list[int]  # their KV groups, sorted
    whole: bool  # the streamed heads are exactly every head of `streamed_kv`, in order (one GQA call)
    attending: list[int]  # query heads that attend in full
    kept_groups: list[int]  # their KV groups


def _layer_plan(heads: frozenset[int], shape: Shape) -> _LayerPlan:
    g = shape.group_size
    streamed = sorted(heads)
    groups = sorted({h // g for h in streamed})
    attending = [h for h in range(shape.heads) if h not in heads]
    whole = streamed == [k * g + i for k in groups for i in range(g)]
    return _LayerPlan(streamed, groups, whole, attending, sorted({h // g for h in attending}))


class _State:
    def __init__(self, plan: StreamingPlan, shape: Shape, cache: StreamingCache | None):
        self.plan = plan
        self.shape = shape
        self.layers = {layer: _layer_plan(heads, shape) for layer, heads in plan.heads.items()}
        self.cache = cache
        self.layouts: dict[tuple, BandLayout] = {}
        self.errors: dict[int, float] = {}  # per layer, filled by error_attention (layer_errors)

    def layout(self, n: int, first: torch.Tensor, dtype: torch.dtype) -> BandLayout:
        """The band layout of N = n positions with these first positions, made once per patch and shape."""
        key = (n, tuple(first.tolist()), dtype, first.device)
        if key not in self.layouts:
            if len(self.layouts) >= LAYOUTS_KEPT:
                self.layouts.pop(next(iter(self.layouts)))
            self.layouts[key] = band_layout(n, first, self.plan.sink, self.plan.window, dtype)
        return self.layouts[key]


_ACTIVE: contextvars.ContextVar[_State | None] = contextvars.ContextVar("sink_eval_streaming", default=None)


def _first_of_mask(mask: torch.Tensor | None, batch: int, device: torch.device) -> torch.Tensor:
    """First non-padding position per row: the first key the last query (a real token, left padding) may see."""
    if mask is None:
        return torch.zeros(batch, dtype=torch.long, device=device)
    if mask.dtype != torch.bool:
        raise SinkEvalError("the streaming patch expects SDPA's boolean masks")
    return mask[:, 0, -1].long().argmax(dim=-1)


def stream_attention(
    module: torch.nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: torch.Tensor | None,
    dropout: float = 0.0,
    scaling: float | None = None,
    **kwargs,
) -> tuple[torch.Tensor, None]:
    """query (B, H, T, D), key/value (B, H_kv', S, D) -> (B, T, H, D): streamed heads over their sinks and window,
    the others by SDPA."""
    state = seam.active_state(_ACTIVE, module, kwargs, "streaming")
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
    """The patched attention output (B, T, H, D) of one layer; None where the plan streams nothing in it."""
    layer = state.layers.get(module.layer_idx)
    if layer is None:
        return None
    batch, heads, t_len, _ = query.shape
    cache_layer = None if state.cache is None else state.cache.layers[module.layer_idx]
    streaming = cache_layer if isinstance(cache_layer, StreamingLayer) else None
    kv_index = streaming.kv_index if streaming is not None else {k: k for k in range(state.shape.kv_heads)}
    if state.cache is not None:
        first = state.cache.first.to(query.device)
    else:
        first = _first_of_mask(attention_mask, batch, query.device)
    parts: list[tuple[list[int], torch.Tensor]] = []  # (query heads, their output (B, T, h, D)), in order
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
        parts.append((attend, result.transpose(1, 2)))
    step = None if streaming is None else streaming.release_step()
    stream_index = {} if streaming is None else streaming.stream_index
    q = select_heads(query, layer.streamed)
    g = state.shape.group_size
    if key.shape[2] == t_len:  # a full pass: no earlier context
        groups = layer.streamed_kv if layer.whole else [h // g for h in layer.streamed]
        keys, values = _full_pass_kv(groups, kv_index, stream_index, key, value, step)
        streamed = banded_attention(q, keys, values, state.layout(t_len, first, q.dtype), scaling)
    else:
        keys, values, positions = _window_kv(
            state.plan, layer.streamed_kv, kv_index, stream_index, key, value, step, first, t_len
        )
        plan = state.plan
        last_first = state.cache.last_first if state.cache is not None else int(first.max())
        if layer.whole and t_len == 1 and key.shape[2] >= last_first + plan.sink + plan.window:
            # every slot holds a key the new token sees: no mask, each KV group read once
            streamed = F.scaled_dot_product_attention(q, keys, values, scale=scaling, enable_gqa=g > 1)
            streamed = streamed.transpose(1, 2)
        else:
            per_head = torch.tensor([layer.streamed_kv.index(h // g) for h in layer.streamed], device=key.device)
            keys, values, positions = (x.index_select(1, per_head) for x in (keys, values, positions))
            query_pos = torch.arange(key.shape[2] - t_len, key.shape[2], device=key.device)
            streamed = keyed_attention(q, query_pos, keys, values, positions, first, plan.sink, plan.window, scaling)
    parts.append((layer.streamed, streamed))
    return _assemble(parts, heads)


def _first_of(state: _State, mask: torch.Tensor | None, query: torch.Tensor) -> torch.Tensor:
    return _first_of_mask(mask, query.shape[0], query.device)


error_attention = seam.error_attention(_ACTIVE, "streaming", _planned_output, _first_of)


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


@contextmanager
def patched(model: torch.nn.Module, plan: StreamingPlan, cache: StreamingCache | None = None) -> Iterator[None]:
    """Run `model` with the plan's heads streamed inside the block; the previous attention is restored on exit, also
    after an exception. `cache` is the plan's own constant-size cache (`new_cache`); without it, decoding keeps
    transformers' full cache."""
    state = _State(plan, check_streaming_plan(model, plan), cache)
    if cache is not None and cache.plan != plan:
        raise SinkEvalError("this StreamingCache was made for another plan: make one with new_cache(model, plan, mask)")
    running = seam.running(model, _ACTIVE, state, STREAM_ATTENTION, stream_attention, patch=True)
    with running, cache.in_use() if cache else nullcontext():
        yield


def new_cache(model: torch.nn.Module, plan: StreamingPlan, attention_mask: torch.Tensor) -> StreamingCache:
    """The constant-size cache of `plan` for a left-padded batch with this attention mask (B, N)."""
    return StreamingCache(model, plan, attention_mask)


def generate(
    model: torch.nn.Module,
    plan: StreamingPlan,
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor | None = None,
    max_new_tokens: int = 32,
    logits_processor: LogitsProcessorList | None = None,
) -> tuple[torch.Tensor, StreamingCache]:
    """Greedy generation under `plan` with its constant-size cache, by plain `model.generate`: (prompt + new token
    ids, the cache). `max_new_tokens` is at least 1; `logits_processor` as in `seam.greedy`."""
    return seam.generate(model, plan, new_cache, patched, input_ids, attention_mask, max_new_tokens, logits_processor)


def layer_errors(
    model: torch.nn.Module, plan: StreamingPlan, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None
) -> dict[int, float]:
    """Per-layer relative error of the patched attention output against the exact one on the same input (defined as
    in `sink_eval.patches.copy.layer_errors`); layers the plan does not touch are left out."""
    state = _State(plan, check_streaming_plan(model, plan), None)
    return seam.layer_errors(model, _ACTIVE, state, STREAM_ERROR_ATTENTION, error_attention, input_ids, attention_mask)
