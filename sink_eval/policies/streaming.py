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

import torch

from sink_eval.core.errors import SinkEvalError
from sink_eval.core.window import Window
from sink_eval.measure.probe import PromptStats
from sink_eval.patches.streaming.plan import StreamingPlan
from sink_eval.policies.base import Calibration, Policy, Target, heads_where
from sink_eval.policies.options import StreamingOptions, WindowOptions


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
    """Heads of calibrated streaming score >= p, or the top q of the KV groups (`streaming`)."""

    name = "streaming"
    Options = StreamingOptions
    options: StreamingOptions

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

    def plan(self, target: Target, prompt: PromptStats | None = None, calibration: Calibration = ()) -> StreamingPlan:
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
