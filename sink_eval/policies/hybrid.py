"""`hybrid`: another copy policy's plan (first_layer, calibrated or oracle), applied only while the sequence is at most
L tokens (`max_tokens`) and/or only in the first k decode steps (`decode_steps`): the notes' recommendation to copy
only for short prompts or early decode steps (`CopyPlan.max_tokens`, `CopyPlan.decode_steps`)."""

from __future__ import annotations

import dataclasses

from sink_eval.measure.probe import PromptStats
from sink_eval.patches.copy import CopyPlan
from sink_eval.policies.base import Calibration, Policy, Target
from sink_eval.policies.options import HybridOptions
from sink_eval.policies.registry import policy_class


class Hybrid(Policy):
    """Another copy policy's plan, within a length or decode-step limit (`hybrid`)."""

    name = "hybrid"
    kind = "copy"
    Options = HybridOptions
    options: HybridOptions

    @property
    def base(self) -> Policy:
        """The limited policy, with the options of ours it reads."""
        cls = policy_class(self.options.base)
        fields = {f.name: getattr(self.options, f.name) for f in dataclasses.fields(cls.Options)}
        return cls(cls.Options(**fields))

    @property
    def label(self) -> str:
        o = self.options
        limits = [f"L={o.max_tokens}"] * (o.max_tokens is not None) + [f"k={o.decode_steps}"] * (
            o.decode_steps is not None
        )
        return f"hybrid({self.base.label}, {', '.join(limits)})"

    @property
    def per_prompt(self) -> bool:
        return self.base.per_prompt

    @property
    def probe_layers(self) -> int | None:
        return self.base.probe_layers

    def plan(self, target: Target, prompt: PromptStats | None = None, calibration: Calibration = ()) -> CopyPlan:
        heads = self.base.plan(target, prompt, calibration).heads
        return CopyPlan(heads, max_tokens=self.options.max_tokens, decode_steps=self.options.decode_steps)
