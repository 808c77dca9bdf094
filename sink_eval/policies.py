"""Head-selection policies: sink statistics in, copy plans out.

- `first_layer` (the original hypothesis): on this prompt, copy head h in every layer when layer 0's head h is a
  sink head. Needs only layer 0's attention on the prompt.
- `calibrated`: copy (l, h) when its consistency (fraction of calibration prompts on which it is a sink head) is at
  least p. One plan for every input; the calibration prompts must not overlap the evaluation prompts.
- `oracle`: copy the heads that are sink heads on this very prompt, measured on the full forward pass. An upper
  bound on what sink selection can do, not deployable (it needs the attention it is meant to skip).
- `hybrid`: another policy's plan, applied only while the sequence is at most L tokens and/or only for the first k
  decode steps (`CopyPlan.max_tokens`, `CopyPlan.decode_steps`).

Each uses a fixed threshold tau or, with `chance_corrected`, the length-dependent tau(N) of `sink_eval.sinks`.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch

from sink_eval.errors import SinkEvalError
from sink_eval.patch import CopyPlan
from sink_eval.probe import PromptStats
from sink_eval.prompts import Prompt
from sink_eval.sinks import sink_heads, threshold_for

POLICIES = ("first_layer", "calibrated", "oracle", "hybrid")
PER_PROMPT = ("first_layer", "oracle")


@dataclass(frozen=True)
class PolicyOptions:
    threshold: float = 0.8
    chance_corrected: bool = False
    consistency: float = 0.9  # calibrated: p
    base: str = "calibrated"  # hybrid: the policy whose plan it limits
    max_tokens: int | None = None  # hybrid: L
    decode_steps: int | None = None  # hybrid: k


def base_policy(name: str, options: PolicyOptions) -> str:
    """The policy that chooses a plan's heads: a hybrid's base policy, else the policy itself."""
    return options.base if name == "hybrid" else name


@dataclass(frozen=True)
class Policy:
    """A policy by name with its options, as the commands run it."""

    name: str
    options: PolicyOptions

    @property
    def label(self) -> str:
        o = self.options
        tau = f"tau={o.threshold:g}" + ("(N)" if o.chance_corrected else "")
        if self.name == "calibrated":
            return f"calibrated p={o.consistency:g} {tau}"
        if self.name == "hybrid":
            limits = [f"L={o.max_tokens}"] * (o.max_tokens is not None) + [f"k={o.decode_steps}"] * (
                o.decode_steps is not None
            )
            base = Policy(o.base, o).label
            return f"hybrid({base}, {', '.join(limits)})"
        return f"{self.name} {tau}"

    def per_prompt(self) -> bool:
        return base_policy(self.name, self.options) in PER_PROMPT


def check_policy(name: str, options: PolicyOptions) -> None:
    if name not in POLICIES:
        raise SinkEvalError(f"unknown policy {name!r}; choose one of {', '.join(POLICIES)}")
    if not 0 < options.threshold <= 1:
        raise SinkEvalError(f"a sink threshold is in (0, 1], not {options.threshold}")
    if not 0 < options.consistency <= 1:
        raise SinkEvalError(f"a consistency level p is in (0, 1], not {options.consistency}")
    if name == "hybrid":
        if options.base not in POLICIES or options.base == "hybrid":
            raise SinkEvalError(f"a hybrid policy limits first_layer, calibrated or oracle, not {options.base!r}")
        if options.max_tokens is None and options.decode_steps is None:
            raise SinkEvalError("a hybrid policy needs a limit: max_tokens (L) and/or decode_steps (k)")


def _sinks(stats: PromptStats, options: PolicyOptions) -> torch.Tensor:
    return sink_heads(stats.sink, threshold_for(options.threshold, stats.n_tokens, options.chance_corrected))


def first_layer_plan(stats: PromptStats, options: PolicyOptions) -> CopyPlan:
    heads = torch.nonzero(_sinks(stats, options)[0]).flatten().tolist()
    return CopyPlan.of({layer: heads for layer in range(stats.sink.shape[0])})


def oracle_plan(stats: PromptStats, options: PolicyOptions) -> CopyPlan:
    sinks = _sinks(stats, options)
    return CopyPlan.of({layer: torch.nonzero(row).flatten().tolist() for layer, row in enumerate(sinks)})


def calibrated_plan(calibration: Sequence[PromptStats], options: PolicyOptions) -> CopyPlan:
    scored = [s for s in calibration if s.n_tokens >= 2]
    if not scored:
        raise SinkEvalError("the calibrated policy needs calibration prompts of at least two tokens")
    consistency = torch.stack([_sinks(s, options) for s in scored]).float().mean(0)
    chosen = consistency >= options.consistency
    return CopyPlan.of({layer: torch.nonzero(row).flatten().tolist() for layer, row in enumerate(chosen)})


def make_plan(
    name: str, options: PolicyOptions, prompt: PromptStats | None, calibration: Sequence[PromptStats] = ()
) -> CopyPlan:
    """The plan of policy `name` for one prompt (`prompt` = its statistics, needed by per-prompt policies)."""
    check_policy(name, options)
    base = base_policy(name, options)
    if base in PER_PROMPT:
        if prompt is None:
            raise SinkEvalError(f"the {base} policy needs the prompt's own attention statistics")
        plan = first_layer_plan(prompt, options) if base == "first_layer" else oracle_plan(prompt, options)
    else:
        plan = calibrated_plan(calibration, options)
    if name == "hybrid":
        return CopyPlan(plan.heads, max_tokens=options.max_tokens, decode_steps=options.decode_steps)
    return plan


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
