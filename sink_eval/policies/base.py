"""The policy interface: attention statistics in, a plan out.

A policy is a class, one per file, registered by name (`sink_eval.policies.registry`). It declares the plan kind it
makes (`kind`, a `sink_eval.patches.base.PLAN_KINDS` name), the options it reads (`Options`: a frozen dataclass whose
fields are checked as it is made), whether it needs the prompt's own statistics (`per_prompt`) or calibration
statistics (`calibrates`), and makes the plan: `plan(target, prompt, calibration)`. What it needs measured:
- `windows`: the streaming windows (s, w) whose scores its calibration prompts must be probed for;
- `min_tokens`: the shortest prompt on which its plan changes anything (2; a streaming plan's s + w + 1);
- `long_inputs`: whether it is evaluated on the long passages (a streaming plan is the unpatched model on prompts of
  at most s + w tokens, so the default prompts, most of them short, would show a trivially perfect fidelity).
Calibration prompts never overlap evaluation prompts (`check_disjoint`).
"""

from __future__ import annotations

import dataclasses
from abc import ABC, abstractmethod
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, ClassVar, Self

import torch

from sink_eval.core.errors import SinkEvalError
from sink_eval.core.shape import Shape, model_shape
from sink_eval.core.window import Window
from sink_eval.measure.probe import PromptStats
from sink_eval.patches.base import PLAN_KINDS, Plan
from sink_eval.policies.options import SinkOptions
from sink_eval.prompts.prompt_set import Prompt

Calibration = Sequence[PromptStats]  # the calibration prompts' statistics


@dataclass(frozen=True)
class Target:
    """What a policy plans for: the model's attention shape and the layers its plan kind may name."""

    shape: Shape
    layers: tuple[int, ...]

    @classmethod
    def of(cls, model: torch.nn.Module, kind: str) -> Target:
        return cls(model_shape(model), tuple(PLAN_KINDS[kind].candidate_layers(model)))


class Policy(ABC):
    """A head-selection policy with its options (module doc)."""

    name: ClassVar[str]
    kind: ClassVar[str]  # the plan kind it makes
    Options: ClassVar[type]  # a frozen dataclass of the options it reads
    long_inputs: ClassVar[bool] = False

    def __init__(self, options: Any = None):
        self.options = self.Options() if options is None else options
        if not isinstance(self.options, self.Options):
            raise TypeError(f"the {self.name} policy takes {self.Options.__name__}, not {type(self.options).__name__}")

    @classmethod
    def with_options(cls, **options: Any) -> Self:
        """The policy with these options; one it does not read is an error."""
        fields = [f.name for f in dataclasses.fields(cls.Options)]
        unknown = sorted(set(options) - set(fields))
        if unknown:
            raise SinkEvalError(
                f"the {cls.name} policy does not read {', '.join(unknown)}; its options are {', '.join(fields)}"
            )
        return cls(cls.Options(**options))

    @property
    def label(self) -> str:
        """How results name the policy with its options, e.g. "calibrated p=0.9 tau=0.8": its name, then its
        options' `label`."""
        return f"{self.name} {self.options.label}"

    @property
    def per_prompt(self) -> bool:
        """Whether its plan is made from the prompt's own statistics (one plan per prompt)."""
        return False

    @property
    def calibrates(self) -> bool:
        """Whether its plan is made from calibration statistics."""
        return not self.per_prompt

    @property
    def windows(self) -> tuple[Window, ...]:
        """The streaming windows (s, w) its calibration statistics need."""
        return ()

    @property
    def probe_layers(self) -> int | None:
        """How many layers (from the first) of a prompt's statistics a per-prompt policy reads (None: all)."""
        return None

    @property
    def min_tokens(self) -> int:
        """The shortest prompt on which its plan can change anything."""
        return 2

    @property
    def min_calibration_tokens(self) -> int:
        """The shortest calibration prompt it counts."""
        return 2

    @abstractmethod
    def plan(self, target: Target, prompt: PromptStats | None = None, calibration: Calibration = ()) -> Plan:
        """The plan for one prompt (`prompt`: its statistics, for a per-prompt policy) from the `calibration`
        prompts' statistics, for the model `target`."""

    def check_prompt(self, prompt: PromptStats | None) -> PromptStats:
        """The prompt's statistics, which a per-prompt policy cannot do without."""
        if prompt is None:
            raise SinkEvalError(f"the {self.name} policy needs the prompt's own attention statistics")
        return prompt


def heads_where(chosen: torch.Tensor, layers: Sequence[int] | None = None) -> dict[int, list[int]]:
    """layer -> the heads where `chosen` (layers, heads) is true, over `layers` (default: all)."""
    rows = range(chosen.shape[0]) if layers is None else layers
    return {layer: torch.nonzero(chosen[layer]).flatten().tolist() for layer in rows}


class SinkPolicy(Policy):
    """A policy making copy plans of sink heads (sink score >= tau), on the prompt itself or on calibration
    prompts."""

    kind = "copy"
    Options = SinkOptions
    options: SinkOptions


def check_disjoint(calibration: Sequence[Prompt], evaluation: Sequence[Prompt]) -> None:
    """Refuse a calibration set that shares a prompt (by id or by text) with the evaluation set; the message counts
    the evaluation prompts that share either, each once."""
    ids, texts = {p.id for p in calibration}, {p.text for p in calibration}
    shared = [p for p in evaluation if p.id in ids or p.text in texts]
    if shared:
        example = shared[0].id if shared[0].id in ids else f"text {shared[0].text[:40]!r}"
        raise SinkEvalError(
            f"the calibration prompts overlap the evaluation prompts ({len(shared)} evaluation prompt(s) shared, "
            f"e.g. {example}); calibrate on other prompts"
        )
