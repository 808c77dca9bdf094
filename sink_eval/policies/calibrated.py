"""`calibrated`: copy (l, h) when its consistency, the fraction of calibration prompts (of at least two tokens) on
which it is a sink head, is at least p. One plan for every input."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch

from sink_eval.core.errors import SinkEvalError
from sink_eval.measure.probe import PromptStats
from sink_eval.patches.copy import CopyPlan
from sink_eval.policies.base import Policy, SinkOptions, Target, check_unit, heads_where


@dataclass(frozen=True)
class CalibratedOptions(SinkOptions):
    consistency: float = 0.9  # p

    def __post_init__(self) -> None:
        super().__post_init__()
        check_unit(self.consistency, "a consistency level p")


class Calibrated(Policy):
    name = "calibrated"
    kind = "copy"
    Options = CalibratedOptions
    options: CalibratedOptions

    @property
    def label(self) -> str:
        return f"calibrated p={self.options.consistency:g} {self.options.tau}"

    def plan(
        self, target: Target, prompt: PromptStats | None = None, calibration: Sequence[PromptStats] = ()
    ) -> CopyPlan:
        scored = [s for s in calibration if s.n_tokens >= 2]
        if not scored:
            raise SinkEvalError("the calibrated policy needs calibration prompts of at least two tokens")
        consistency = torch.stack([self.options.sinks(s) for s in scored]).float().mean(0)
        return CopyPlan.of(heads_where(consistency >= self.options.consistency))
