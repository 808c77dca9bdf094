"""`streaming_llm`: every head of every candidate (full-attention) layer streams, as in StreamingLLM. Needs no
statistics at all."""

from __future__ import annotations

from sink_eval.measure.probe import PromptStats
from sink_eval.patches.streaming.plan import StreamingPlan
from sink_eval.policies.base import Calibration, Target
from sink_eval.policies.options import WindowOptions
from sink_eval.policies.streaming import WindowPolicy


class StreamingLLM(WindowPolicy):
    """Every head of every candidate layer (`streaming_llm`)."""

    name = "streaming_llm"
    Options = WindowOptions

    @property
    def calibrates(self) -> bool:
        return False

    def plan(self, target: Target, prompt: PromptStats | None = None, calibration: Calibration = ()) -> StreamingPlan:
        return self.streaming_plan({layer: list(range(target.shape.heads)) for layer in target.layers})
