"""`streaming_llm`: every head of every candidate (full-attention) layer streams, as in StreamingLLM. Needs no
statistics at all."""

from __future__ import annotations

from collections.abc import Sequence

from sink_eval.measure.probe import PromptStats
from sink_eval.patches.streaming.plan import StreamingPlan
from sink_eval.policies.base import Target, WindowOptions
from sink_eval.policies.streaming import WindowPolicy


class StreamingLLM(WindowPolicy):
    name = "streaming_llm"
    Options = WindowOptions

    @property
    def label(self) -> str:
        return f"streaming_llm ({self.options.label})"

    @property
    def calibrates(self) -> bool:
        return False

    def plan(
        self, target: Target, prompt: PromptStats | None = None, calibration: Sequence[PromptStats] = ()
    ) -> StreamingPlan:
        return self.streaming_plan({layer: list(range(target.shape.heads)) for layer in target.layers})
