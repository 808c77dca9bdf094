"""Streaming plans: which query heads attend only to the first s tokens and a window of the last w keys.

A streamed head at query i (positions counted from the first non-padding token) attends to the keys
[0, s) ∪ (i − w, i]: the s sink tokens and the w most recent keys, its own included (StreamingLLM's pattern; per head
as in DuoAttention). s ≥ 0, w ≥ 1. Rules:
- where N ≤ s + w every query's window covers its whole context (i − w < s for every i ≤ N − 1): the plan is the
  unpatched model there, exactly, and the streaming score of `sink_eval.measure.probe` is undefined (no query i ≥ s + w);
- only full-attention layers stream (`candidate_layers`): a sliding-window layer (Gemma 3's local layers) already
  restricts attention to its own window, so a plan naming one is refused;
- a KV group all of whose query heads stream is a *streamed group*: its keys and values are never read beyond the
  sinks and the window, so its decode cache keeps s + w entries (`sink_eval.patches.streaming.cache`);
- there is no plan that copies some heads and streams others: the copy and the streaming patch do not nest
  (`sink_eval.core.attention.use`), so no head is ever both.

This module knows the plan and its rules only: the kernels are in `sink_eval.patches.streaming.banded`, the cache in
`sink_eval.patches.streaming.cache`, the attention implementation in `sink_eval.patches.streaming.patch`.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field

import torch

from sink_eval.core.errors import SinkEvalError
from sink_eval.core.shape import Shape, model_shape
from sink_eval.measure.probe import check_windows
from sink_eval.patches.copy import SUPPORTED_MODEL_TYPES, check_indices, head_set

DEFAULT_SINK = 4
DEFAULT_WINDOW = 256
FULL_ATTENTION = "full_attention"


@dataclass(frozen=True)
class StreamingPlan:
    """Which query heads stream, per layer (0-based), with the sink count s (`sink`) and the window w (`window`)."""

    heads: Mapping[int, frozenset[int]] = field(default_factory=dict)
    sink: int = DEFAULT_SINK
    window: int = DEFAULT_WINDOW

    def __post_init__(self) -> None:
        check_windows([(self.sink, self.window)])
        check_indices(self.heads.items(), "streaming")

    @classmethod
    def of(cls, heads: Mapping[int, Iterable[int]], sink: int = DEFAULT_SINK, window: int = DEFAULT_WINDOW):
        """A plan from layer -> heads; layers without heads are left out. Layers and heads must be ints."""
        items = [(layer, head_set(layer, h, "streaming")) for layer, h in heads.items()]
        check_indices(items, "streaming")
        return cls({layer: h for layer, h in sorted(items) if h}, sink, window)

    conditional = False  # a streaming plan applies to every forward pass

    def n_heads(self) -> int:
        return sum(len(h) for h in self.heads.values())

    def fraction(self, layers: int, heads: int) -> float:
        """Fraction of all (layer, head) pairs the plan streams."""
        return self.n_heads() / (layers * heads)

    def per_layer(self, layers: int) -> list[int]:
        return [len(self.heads.get(layer, ())) for layer in range(layers)]

    def streamed_groups(self, shape: Shape) -> dict[int, frozenset[int]]:
        """Per layer, the KV groups all of whose query heads stream (their cache keeps s + w entries)."""
        return shape.whole_groups(self.heads)

    def n_streamed_groups(self, shape: Shape) -> int:
        return shape.n_whole_groups(self.heads)

    def to_json(self) -> dict:
        return {
            "heads": {str(layer): sorted(h) for layer, h in self.heads.items()},
            "sink": self.sink,
            "window": self.window,
        }


def candidate_layers(model: torch.nn.Module) -> list[int]:
    """The layers a streaming plan may name: those of full attention (a config without `layer_types` has only
    those). Gemma 3's sliding-window layers are not candidates: they already attend to a window of their own."""
    text = model.config.get_text_config(decoder=True)
    types = getattr(text, "layer_types", None) or [FULL_ATTENTION] * text.num_hidden_layers
    return [layer for layer, kind in enumerate(types) if kind == FULL_ATTENTION]


def check_streaming_plan(model: torch.nn.Module, plan: StreamingPlan) -> Shape:
    """The model's shape, after checking that the streaming patch supports it and that the plan fits it."""
    shape = model_shape(model)
    if shape.model_type not in SUPPORTED_MODEL_TYPES:
        raise SinkEvalError(
            f"the streaming patch supports {', '.join(SUPPORTED_MODEL_TYPES)} models, not {shape.model_type!r}"
        )
    candidates = candidate_layers(model)
    for layer, heads in plan.heads.items():
        if not 0 <= layer < shape.layers:
            raise SinkEvalError(f"the plan names layer {layer}; the model has layers 0..{shape.layers - 1}")
        if layer not in candidates:
            raise SinkEvalError(
                f"layer {layer} is a sliding-window layer: it already attends to a window of its own; only the "
                f"full-attention layers {candidates} stream"
            )
        bad = sorted(h for h in heads if not 0 <= h < shape.heads)
        if bad:
            raise SinkEvalError(
                f"the plan names head(s) {bad} of layer {layer}; the model has heads 0..{shape.heads - 1}"
            )
    return shape
