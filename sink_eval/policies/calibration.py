"""What calibrating policies learn their plans from, probed once: the calibration prompts and their statistics.

By default (the committed prompt set): its calibration half, each prompt cut to the model's context; for policies
evaluated on long inputs (`Policy.long_inputs`) also the long calibration passages, cut to `long_tokens`. Never the
evaluation prompts or the long evaluation passages (`prompts.prompt_set.long_passages`: the first two passages of
each domain calibrate, the others evaluate).
"""

from __future__ import annotations

from collections.abc import Sequence

from sink_eval.core.window import Window
from sink_eval.measure.probe import PromptStats, probe_prompts
from sink_eval.models.load import LoadedModel
from sink_eval.patches.base import Plan
from sink_eval.policies.base import Policy, Target
from sink_eval.prompts.prompt_set import (
    DEFAULT_MAX_TOKENS,
    LONG_TOKENS,
    TokenizedPrompt,
    default_split,
    long_passages,
    model_context,
    tokenize,
)


def default_calibration(loaded: LoadedModel) -> list[TokenizedPrompt]:
    """The calibration half of the default prompt set, tokenized; a prompt longer than the model's context is cut to
    it."""
    context = model_context(loaded.model) or DEFAULT_MAX_TOKENS
    return tokenize(loaded.tokenizer, default_split()[0], context, truncate=True)


def long_calibration(loaded: LoadedModel, long_tokens: int = LONG_TOKENS) -> list[TokenizedPrompt]:
    """The long calibration passages, cut to `long_tokens`."""
    return tokenize(loaded.tokenizer, long_passages("calibration"), long_tokens, truncate=True)


def windows(policies: Sequence[Policy]) -> list[Window]:
    """The streaming windows the calibrating policies need probed, each once, in order."""
    return list(dict.fromkeys(w for p in policies if p.calibrates for w in p.windows))


def stats(
    loaded: LoadedModel, prompts: list[TokenizedPrompt], policies: Sequence[Policy], progress: bool, what: str
) -> list[PromptStats]:
    """The statistics of `prompts` that `policies` calibrate on: sink scores and their streaming windows' scores
    (none probed where no policy calibrates)."""
    if not any(p.calibrates for p in policies):
        return []
    probed = probe_prompts(loaded, prompts, progress, windows(policies), desc=f"probing {what}")
    return [p.stats for p in probed]


def static_plans(
    loaded: LoadedModel, policies: Sequence[Policy], long_tokens: int = LONG_TOKENS, progress: bool = True
) -> list[Plan]:
    """Each static (not per-prompt) policy's plan, calibrated on the default calibration prompts and, for a policy
    evaluated on long inputs, also the long calibration passages (as `patch-eval` calibrates them)."""
    if not policies:
        return []
    calibration = stats(loaded, default_calibration(loaded), policies, progress, "calibration prompts")
    long = [p for p in policies if p.long_inputs]
    extra = stats(loaded, long_calibration(loaded, long_tokens), long, progress, "long calibration") if long else []
    return [
        p.plan(Target.of(loaded.model, p.kind), None, calibration + extra if p.long_inputs else calibration)
        for p in policies
    ]
