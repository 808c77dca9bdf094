"""`streaming`: stream the heads whose calibrated streaming score is at least p, or, with a fraction q,
DuoAttention's deployment rule: the top round(q G) of the G candidate KV groups by their calibrated score, every head
of each. Only full-attention layers are candidates (Gemma 3's sliding-window layers already attend to a window).

A head's calibrated streaming score at (s, w) is the mean, over the calibration prompts of at least 4 (s + w) tokens,
of its streaming score (`sink_eval.measure.probe`: mass on the first s tokens + the last w keys); a KV group's is its
weakest query head's. A KV group all of whose heads are chosen also keeps only s + w cache entries; the plan reports
both counts.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch

from sink_eval.core.errors import SinkEvalError
from sink_eval.core.window import Window
from sink_eval.measure.probe import PromptStats
from sink_eval.patches.streaming.plan import StreamingPlan
from sink_eval.policies.base import Policy, Target, WindowOptions, check_unit, heads_where

CALIBRATION_SPANS = 4  # a streaming policy calibrates on prompts of at least 4 (s + w) tokens


@dataclass(frozen=True)
class StreamingOptions(WindowOptions):
    streaming_score: float = 0.9  # p
    fraction: float | None = None  # q: the top q of the KV groups

    def __post_init__(self) -> None:
        super().__post_init__()
        check_unit(self.streaming_score, "a streaming score threshold p")
        if self.fraction is not None:
            check_unit(self.fraction, "a fraction q of the KV groups")

    @property
    def calibration_tokens(self) -> int:
        """The shortest calibration prompt counted: 4 (s + w) tokens."""
        return CALIBRATION_SPANS * (self.sink + self.window)

    @property
    def rule(self) -> str:
        return f"p={self.streaming_score:g}" if self.fraction is None else f"q={self.fraction:g}"


class WindowPolicy(Policy):
    """A policy making streaming plans: evaluated on long inputs, where its window leaves something out."""

    kind = "streaming"
    long_inputs = True
    options: WindowOptions

    @property
    def min_tokens(self) -> int:
        return self.options.sink + self.options.window + 1

    def streaming_plan(self, heads: dict[int, list[int]]) -> StreamingPlan:
        return StreamingPlan.of(heads, self.options.sink, self.options.window)

    def whole_groups(self, groups: Sequence[tuple[int, int]], target: Target) -> StreamingPlan:
        """The plan streaming every head of these (layer, KV group) pairs."""
        g = target.shape.group_size
        heads: dict[int, list[int]] = {}
        for layer, k in groups:
            heads.setdefault(layer, []).extend(range(k * g, (k + 1) * g))
        return self.streaming_plan(heads)


class Streaming(WindowPolicy):
    name = "streaming"
    Options = StreamingOptions
    options: StreamingOptions

    @property
    def label(self) -> str:
        return f"streaming {self.options.rule} ({self.options.label})"

    @property
    def windows(self) -> tuple[Window, ...]:
        return ((self.options.sink, self.options.window),)

    @property
    def min_calibration_tokens(self) -> int:
        return self.options.calibration_tokens

    def scores(self, calibration: Sequence[PromptStats]) -> torch.Tensor:
        """Per head (layers, heads): the mean streaming score at (s, w) over the calibration prompts of at least
        4 (s + w) tokens."""
        window, least = self.windows[0], self.min_calibration_tokens
        long_enough = [s for s in calibration if s.n_tokens >= least]
        if not long_enough:
            raise SinkEvalError(
                f"the streaming policies calibrate on prompts of at least 4 (s + w) = {least} tokens; none of the "
                f"{len(calibration)} calibration prompts is that long"
            )
        if any(window not in s.streaming for s in long_enough):
            raise SinkEvalError(f"the calibration statistics have no streaming score at {window}: probe with windows")
        return torch.stack([s.streaming[window] for s in long_enough]).mean(0)

    def plan(
        self, target: Target, prompt: PromptStats | None = None, calibration: Sequence[PromptStats] = ()
    ) -> StreamingPlan:
        """Heads scoring at least p; with q, the top round(q G) KV groups (ties: lower layer, group first)."""
        scores = self.scores(calibration)
        if self.options.fraction is None:
            return self.streaming_plan(heads_where(scores >= self.options.streaming_score, target.layers))
        g = target.shape.group_size
        ranked = sorted(
            (
                (float(scores[layer, k * g : (k + 1) * g].min()), layer, k)
                for layer in target.layers
                for k in range(target.shape.kv_heads)
            ),
            key=lambda x: (-x[0], x[1], x[2]),
        )
        n = round(self.options.fraction * len(ranked))
        return self.whole_groups([(layer, k) for _, layer, k in ranked[:n]], target)
