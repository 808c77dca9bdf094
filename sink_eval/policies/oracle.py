"""`oracle`: copy the heads that are sink heads on this very prompt, measured on its full forward pass. An upper
bound on what sink selection can do, not deployable: it needs the attention it is meant to skip."""

from __future__ import annotations

from sink_eval.measure.probe import PromptStats
from sink_eval.patches.copy import CopyPlan
from sink_eval.policies.base import Calibration, SinkPolicy, Target, heads_where


class Oracle(SinkPolicy):
    """The prompt's own sink heads (`oracle`)."""

    name = "oracle"

    @property
    def per_prompt(self) -> bool:
        return True

    def plan(self, target: Target, prompt: PromptStats | None = None, calibration: Calibration = ()) -> CopyPlan:
        return CopyPlan.of(heads_where(self.options.sinks(self.check_prompt(prompt))))
