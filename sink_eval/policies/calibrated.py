"""`calibrated`: copy (l, h) when its consistency, the fraction of calibration prompts (of at least two tokens) on
which it is a sink head, is at least p. One plan for every input."""

from __future__ import annotations

import torch

from sink_eval.core.errors import SinkEvalError
from sink_eval.measure.probe import PromptStats
from sink_eval.patches.copy import CopyPlan
from sink_eval.policies.base import Calibration, SinkPolicy, Target, heads_where
from sink_eval.policies.options import CalibratedOptions


class Calibrated(SinkPolicy):
    """The heads that are sink heads on at least a fraction p of the calibration prompts (`calibrated`)."""

    name = "calibrated"
    Options = CalibratedOptions
    options: CalibratedOptions

    def plan(self, target: Target, prompt: PromptStats | None = None, calibration: Calibration = ()) -> CopyPlan:
        scored = [s for s in calibration if s.n_tokens >= 2]
        if not scored:
            raise SinkEvalError("the calibrated policy needs calibration prompts of at least two tokens")
        consistency = torch.stack([self.options.sinks(s) for s in scored]).float().mean(0)
        return CopyPlan.of(heads_where(consistency >= self.options.consistency))
