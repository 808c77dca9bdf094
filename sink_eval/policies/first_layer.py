"""`first_layer`, the original notes' hypothesis: on this prompt, copy head h in every layer when layer 0's head h is
a sink head (sink score >= tau). Needs only layer 0's attention on the prompt."""

from __future__ import annotations

from sink_eval.measure.probe import PromptStats
from sink_eval.patches.copy import CopyPlan
from sink_eval.policies.base import Calibration, SinkPolicy, Target, heads_where


class FirstLayer(SinkPolicy):
    """Layer 0's sink heads, copied in every layer (`first_layer`)."""

    name = "first_layer"

    @property
    def per_prompt(self) -> bool:
        return True

    @property
    def probe_layers(self) -> int | None:
        return 1

    def plan(self, target: Target, prompt: PromptStats | None = None, calibration: Calibration = ()) -> CopyPlan:
        stats = self.check_prompt(prompt)
        heads = heads_where(self.options.sinks(stats)[:1])[0]
        return CopyPlan.of({layer: heads for layer in range(stats.sink.shape[0])})
