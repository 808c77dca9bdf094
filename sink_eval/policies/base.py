"""Head-selection policies: attention statistics in, copy or streaming plans out.

Copy policies (sink statistics -> `CopyPlan`):

- `first_layer` (the original hypothesis): on this prompt, copy head h in every layer when layer 0's head h is a
  sink head. Needs only layer 0's attention on the prompt.
- `calibrated`: copy (l, h) when its consistency (fraction of calibration prompts on which it is a sink head) is at
  least p. One plan for every input; the calibration prompts must not overlap the evaluation prompts.
- `oracle`: copy the heads that are sink heads on this very prompt, measured on the full forward pass. An upper
  bound on what sink selection can do, not deployable (it needs the attention it is meant to skip).
- `hybrid`: another policy's plan, applied only while the sequence is at most L tokens and/or only for the first k
  decode steps (`CopyPlan.max_tokens`, `CopyPlan.decode_steps`).

Each uses a fixed threshold tau or, with `chance_corrected`, the length-dependent tau(N) of `sink_eval.measure.sinks`.

Streaming policies (streaming scores at (s, w) -> `StreamingPlan`), over the candidate layers only (full attention;
Gemma 3's sliding-window layers already attend to a window): a head's calibrated streaming score is the mean, over
the calibration prompts of at least 4 (s + w) tokens, of its streaming score (`sink_eval.measure.probe`: mass on the first s
tokens + the last w keys); a KV group's is its weakest query head's.
- `streaming`: stream every head whose calibrated score is at least p (a KV group all of whose heads are chosen also
  keeps only s + w cache entries; the plan reports both counts); with `fraction` q, DuoAttention's deployment rule
  instead: the top round(q G) of the G candidate KV groups by their calibrated score, every head of each;
- `random`: as many KV groups as `streaming` streams whole (round(q G) with q), drawn with `seed` from the same
  candidate layers, every head of each: the control that says whether the choice matters;
- `streaming_llm`: every head of every candidate layer (StreamingLLM).
The calibration prompts must not overlap the evaluation prompts (`check_disjoint`).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch

from sink_eval.core.errors import SinkEvalError
from sink_eval.core.shape import Shape, model_shape
from sink_eval.measure.probe import PromptStats, check_windows
from sink_eval.measure.sinks import sink_heads, threshold_for
from sink_eval.patches.base import is_index
from sink_eval.patches.copy import CopyPlan
from sink_eval.patches.plans import Plan
from sink_eval.patches.streaming.plan import DEFAULT_SINK, DEFAULT_WINDOW, StreamingPlan, candidate_layers
from sink_eval.prompts.prompt_set import Prompt

COPY_POLICIES = ("first_layer", "calibrated", "oracle", "hybrid")
STREAMING_POLICIES = ("streaming", "random", "streaming_llm")
POLICIES = COPY_POLICIES + STREAMING_POLICIES
PER_PROMPT = ("first_layer", "oracle")
CALIBRATION_SPANS = 4  # a streaming policy calibrates on prompts of at least 4 (s + w) tokens


@dataclass(frozen=True)
class PolicyOptions:
    threshold: float = 0.8
    chance_corrected: bool = False
    consistency: float = 0.9  # calibrated: p
    base: str = "calibrated"  # hybrid: the policy whose plan it limits
    max_tokens: int | None = None  # hybrid: L
    decode_steps: int | None = None  # hybrid: k
    sink: int = DEFAULT_SINK  # streaming policies: s
    window: int = DEFAULT_WINDOW  # streaming policies: w
    streaming_score: float = 0.9  # streaming: p
    fraction: float | None = None  # streaming, random: q (top q of the KV groups)
    seed: int = 0  # random

    @property
    def calibration_tokens(self) -> int:
        """The shortest calibration prompt a streaming policy counts: 4 (s + w) tokens."""
        return CALIBRATION_SPANS * (self.sink + self.window)


@dataclass(frozen=True)
class Target:
    """What a streaming policy plans for: the model's attention shape and its candidate (full-attention) layers."""

    shape: Shape
    layers: tuple[int, ...]

    @classmethod
    def of(cls, model) -> Target:
        return cls(model_shape(model), tuple(candidate_layers(model)))


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
        window = f"s={o.sink}, w={o.window}"
        if self.name == "calibrated":
            return f"calibrated p={o.consistency:g} {tau}"
        if self.name == "hybrid":
            limits = [f"L={o.max_tokens}"] * (o.max_tokens is not None) + [f"k={o.decode_steps}"] * (
                o.decode_steps is not None
            )
            base = Policy(o.base, o).label
            return f"hybrid({base}, {', '.join(limits)})"
        if self.name == "streaming":
            rule = f"p={o.streaming_score:g}" if o.fraction is None else f"q={o.fraction:g}"
            return f"streaming {rule} ({window})"
        if self.name == "random":
            rule = f"as streaming p={o.streaming_score:g}" if o.fraction is None else f"q={o.fraction:g}"
            return f"random {rule} seed={o.seed} ({window})"
        if self.name == "streaming_llm":
            return f"streaming_llm ({window})"
        return f"{self.name} {tau}"

    @property
    def streaming(self) -> bool:
        return self.name in STREAMING_POLICIES

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
        if options.base not in PER_PROMPT + ("calibrated",):
            raise SinkEvalError(f"a hybrid policy limits first_layer, calibrated or oracle, not {options.base!r}")
        if options.max_tokens is None and options.decode_steps is None:
            raise SinkEvalError("a hybrid policy needs a limit: max_tokens (L) and/or decode_steps (k)")
    if name in STREAMING_POLICIES:
        check_windows([(options.sink, options.window)])
        if not 0 < options.streaming_score <= 1:
            raise SinkEvalError(f"a streaming score threshold p is in (0, 1], not {options.streaming_score}")
        if options.fraction is not None and not 0 < options.fraction <= 1:
            raise SinkEvalError(f"a fraction q of the KV groups is in (0, 1], not {options.fraction}")
        if not is_index(options.seed):
            raise SinkEvalError(f"the random policy's seed is an int, not {options.seed!r}")


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


def calibrated_streaming_scores(calibration: Sequence[PromptStats], options: PolicyOptions) -> torch.Tensor:
    """Per head (layers, heads): the mean streaming score at (s, w) over the calibration prompts of at least
    4 (s + w) tokens."""
    window = (options.sink, options.window)
    long_enough = [s for s in calibration if s.n_tokens >= options.calibration_tokens]
    if not long_enough:
        raise SinkEvalError(
            f"the streaming policies calibrate on prompts of at least 4 (s + w) = {options.calibration_tokens} "
            f"tokens; none of the {len(calibration)} calibration prompts is that long"
        )
    if any(window not in s.streaming for s in long_enough):
        raise SinkEvalError(f"the calibration statistics have no streaming score at {window}: probe with windows")
    return torch.stack([s.streaming[window] for s in long_enough]).mean(0)


def _group_scores(scores: torch.Tensor, target: Target) -> list[tuple[float, int, int]]:
    """(score, layer, group) of every candidate KV group: its weakest query head's calibrated score."""
    g = target.shape.group_size
    return [
        (float(scores[layer, k * g : (k + 1) * g].min()), layer, k)
        for layer in target.layers
        for k in range(target.shape.kv_heads)
    ]


def _whole_groups(groups: Sequence[tuple[int, int]], target: Target, options: PolicyOptions) -> StreamingPlan:
    g = target.shape.group_size
    heads: dict[int, list[int]] = {}
    for layer, k in groups:
        heads.setdefault(layer, []).extend(range(k * g, (k + 1) * g))
    return StreamingPlan.of(heads, options.sink, options.window)


def streaming_plan(calibration: Sequence[PromptStats], options: PolicyOptions, target: Target) -> StreamingPlan:
    """`streaming`: heads scoring at least p; with q, the top round(q G) KV groups (ties: lower layer, group first)."""
    scores = calibrated_streaming_scores(calibration, options)
    if options.fraction is None:
        heads = {
            layer: torch.nonzero(scores[layer] >= options.streaming_score).flatten().tolist() for layer in target.layers
        }
        return StreamingPlan.of(heads, options.sink, options.window)
    ranked = sorted(_group_scores(scores, target), key=lambda x: (-x[0], x[1], x[2]))
    n = round(options.fraction * len(ranked))
    return _whole_groups([(layer, k) for _, layer, k in ranked[:n]], target, options)


def random_plan(calibration: Sequence[PromptStats], options: PolicyOptions, target: Target) -> StreamingPlan:
    """`random`: as many KV groups as `streaming` streams whole, drawn with the seed from the candidate groups."""
    shape = target.shape
    n = streaming_plan(calibration, options, target).n_streamed_groups(shape)
    candidates = [(layer, k) for layer in target.layers for k in range(shape.kv_heads)]
    order = torch.randperm(len(candidates), generator=torch.Generator().manual_seed(options.seed)).tolist()
    return _whole_groups(sorted(candidates[i] for i in order[:n]), target, options)


def streaming_llm_plan(options: PolicyOptions, target: Target) -> StreamingPlan:
    heads = range(target.shape.heads)
    return StreamingPlan.of({layer: heads for layer in target.layers}, options.sink, options.window)


def make_plan(
    name: str,
    options: PolicyOptions,
    prompt: PromptStats | None,
    calibration: Sequence[PromptStats] = (),
    target: Target | None = None,
) -> Plan:
    """The plan of policy `name` for one prompt (`prompt` = its statistics, needed by per-prompt policies); a
    streaming policy needs the model's `target`."""
    check_policy(name, options)
    if name in STREAMING_POLICIES:
        if target is None:
            raise SinkEvalError(f"the {name} policy needs the model's shape and candidate layers (Target.of(model))")
        if name == "streaming_llm":
            return streaming_llm_plan(options, target)
        return (streaming_plan if name == "streaming" else random_plan)(calibration, options, target)
    return make_copy_plan(name, options, prompt, calibration)


def make_copy_plan(
    name: str, options: PolicyOptions, prompt: PromptStats | None, calibration: Sequence[PromptStats] = ()
) -> CopyPlan:
    """The copy plan of copy policy `name` for one prompt (see `make_plan`)."""
    check_policy(name, options)
    if name not in COPY_POLICIES:
        raise SinkEvalError(f"{name} is a streaming policy, not one of the copy policies {', '.join(COPY_POLICIES)}")
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
