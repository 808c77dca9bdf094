"""The streaming plan: which query heads attend only to the first s tokens and a window of the last w keys.

A streamed head at query i (positions counted from the first non-padding token) attends to the keys
[0, s) ∪ (i − w, i]: the s sink tokens and the w most recent keys, its own included (StreamingLLM's pattern; per head
as in DuoAttention). s ≥ 0, w ≥ 1. Rules:
- where N ≤ s + w every query's window covers its whole context (i − w < s for every i ≤ N − 1): the plan is the
  unpatched model there, exactly, and the streaming score of `sink_eval.measure.probe` is undefined (no query
  i ≥ s + w);
- only full-attention layers stream (`candidate_layers`): a sliding-window layer (Gemma 3's local layers) already
  restricts attention to its own window, so a plan naming one is refused;
- a KV group all of whose query heads stream is a *streamed group*: its keys and values are never read beyond the
  sinks and the window, so its decode cache keeps s + w entries (`sink_eval.patches.streaming.cache`).

The kernels are in `banded`, the cache in `cache`, the attention in `patch` (this package).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from transformers.cache_utils import Cache

from sink_eval.core.errors import SinkEvalError
from sink_eval.core.shape import Shape
from sink_eval.core.window import check_windows
from sink_eval.patches.base import Plan
from sink_eval.patches.streaming.banded import allowed
from sink_eval.patches.streaming.cache import StreamingCache
from sink_eval.patches.streaming.patch import StreamingState

DEFAULT_SINK = 4
DEFAULT_WINDOW = 256
FULL_ATTENTION = "full_attention"


@dataclass(frozen=True)
class StreamingPlan(Plan):
    """Which query heads stream, per layer (0-based), with the sink count s (`sink`) and the window w (`window`)."""

    kind = "streaming"
    sink: int = DEFAULT_SINK
    window: int = DEFAULT_WINDOW

    def __post_init__(self) -> None:
        check_windows([(self.sink, self.window)])
        super().__post_init__()

    def allowed(self, query_pos: torch.Tensor, key_pos: torch.Tensor, first: torch.Tensor) -> torch.Tensor:
        return allowed(query_pos, key_pos, first, self.sink, self.window)

    @classmethod
    def candidate_layers(cls, model: torch.nn.Module) -> list[int]:
        """The layers of full attention (a config without `layer_types` has only those). Gemma 3's sliding-window
        layers are not candidates: they already attend to a window of their own."""
        text = model.config.get_text_config(decoder=True)
        types = getattr(text, "layer_types", None) or [FULL_ATTENTION] * text.num_hidden_layers
        return [layer for layer, kind in enumerate(types) if kind == FULL_ATTENTION]

    def not_a_candidate(self, layer: int, candidates: list[int]) -> str:
        return (
            f"layer {layer} is a sliding-window layer: it already attends to a window of its own; only the "
            f"full-attention layers {candidates} stream"
        )

    def applies(self, seq_len: int, decode_step: int) -> bool:
        return bool(self.heads) and seq_len > self.sink + self.window

    def work_removed(self, shape: Shape, seq_len: int, decode_step: int) -> float:
        """f = the fraction of heads streamed × (1 − ρ), ρ = `streamed_share` (0 where the plan does not apply)."""
        if not self.applies(seq_len, decode_step):
            return 0.0
        share = streamed_share(seq_len, self.sink, self.window, decode=decode_step > 0)
        return self.fraction(shape.layers, shape.heads) * (1 - share)

    def kv_groups_removed(self, shape: Shape) -> int:
        """The streamed groups: their decode cache keeps s + w entries."""
        return self.n_whole_groups(shape)

    def state(self, model: torch.nn.Module, cache: Cache | None) -> StreamingState:
        if cache is not None and (not isinstance(cache, StreamingCache) or cache.plan != self):
            raise SinkEvalError(
                "this StreamingCache was made for another plan: make one with plan.new_cache(model, mask)"
            )
        return StreamingState(self, self.check(model), cache)

    def new_cache(self, model: torch.nn.Module, attention_mask: torch.Tensor) -> StreamingCache:
        """The constant-size cache of the plan for a left-padded batch with this attention mask (B, N)."""
        return StreamingCache(model, self, attention_mask)


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
