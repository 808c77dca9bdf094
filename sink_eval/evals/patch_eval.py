"""`sink-eval patch-eval`: what each copy or streaming policy costs in fidelity and buys in speed and KV memory.

Fidelity, per policy, over its evaluation prompts (never the calibration prompts):
- fraction of heads = mean over prompts of the fraction of (layer, head) pairs the prompt's plan copies or streams;
  fraction of KV groups = mean fraction of KV groups all of whose query heads it copies or streams (for an
  unconditional plan, the groups whose cache shrinks: dropped by a copy plan, kept at s + w entries by a streaming
  plan);
- KL = mean over prompts of the mean over up to `KL_POSITIONS` evenly spaced positions of
  KL(p_unpatched || p_patched) of the next-token distributions, in nats; top-1 = fraction of those positions whose
  argmax agrees. The unpatched reference is the probe's pass (exact eager attention; equal to SDPA within 1e-4 in
  the logits, tested), which also gives the per-prompt policies their statistics;
- layer error = per-layer relative error of the attention output (`Plan.layer_errors`), mean over prompts;
- greedy agreement = fraction of the `new_tokens` greedy tokens that equal the unpatched model's at the same step,
  and the common prefix length, over the shortest evaluation prompts.
Speed (`sink_eval.evals.speed.measure`) on one real prompt of `speed_tokens` tokens, with its ceilings 1 / (1 − f a), f
the fraction of attention work the plan removes (`Plan.work_removed`); KV bytes measured from the
cache objects after the decode run.

Streaming policies are evaluated on long inputs ("long"): on prompts of N ≤ s + w tokens a streaming plan is the
unpatched model exactly (every window covers its context), so the default prompts, most of them short, would show a
fidelity that is trivially perfect. With the default prompt set they calibrate on its calibration prompts plus the
long calibration passages and are evaluated on the long evaluation passages (`prompts.long_passages`), both cut to
`long_tokens`; with prompt files of one's own, on those files' prompts longer than s + w ("given").
"""

from __future__ import annotations

import sys
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
from tqdm import tqdm

from sink_eval.core.errors import SinkEvalError
from sink_eval.core.results import ModelInfo, Provenance, TopLevel, provenance
from sink_eval.core.shape import Shape, model_shape
from sink_eval.evals.speed import SpeedResult, ceiling, measure
from sink_eval.measure.probe import ProbeResult, PromptStats, probe
from sink_eval.measure.stats import bootstrap_se
from sink_eval.models.load import LoadedModel
from sink_eval.patches.base import Plan
from sink_eval.patches.copy import CopyPlan
from sink_eval.policies import calibration
from sink_eval.policies.base import Policy, Target
from sink_eval.prompts.prompt_set import TokenizedPrompt, prompt_set_sha256

SCHEMA = "sink_eval.patch_eval/4"
OLDER_SCHEMA = "sink_eval.patch_eval/2"  # copy policies only; read as such (`_from_older`)
NO_GROWTH_SCHEMA = "sink_eval.patch_eval/3"  # decode ceilings of attention alone; read with the growth fields None
KL_POSITIONS = 32


def positions(n_tokens: int, k: int = KL_POSITIONS) -> torch.Tensor:
    return torch.linspace(0, n_tokens - 1, min(k, n_tokens)).round().long().unique()


def kl_and_top1(reference: torch.Tensor, patched_logits: torch.Tensor) -> tuple[float, float]:
    """Mean KL(reference || patched) in nats and top-1 agreement over the positions of (1, P, vocab) logits."""
    log_p = torch.log_softmax(reference.float(), dim=-1)
    log_q = torch.log_softmax(patched_logits.float(), dim=-1)
    kl = (log_p.exp() * (log_p - log_q)).sum(-1)
    top1 = (reference.argmax(-1) == patched_logits.argmax(-1)).float()
    return float(kl.mean()), float(top1.mean())


def _ids(tp: TokenizedPrompt, device: torch.device) -> torch.Tensor:
    return torch.tensor([tp.input_ids], device=device)


def _references(loaded: LoadedModel, prompts: list[TokenizedPrompt], what: str, progress: bool) -> list[ProbeResult]:
    """The unpatched probe pass of each prompt, with its logits at `positions`."""
    device = next(loaded.model.parameters()).device
    out = []
    for tp in tqdm(prompts, desc=f"probing {what}", unit="prompt", disable=not progress, file=sys.stderr):
        out.append(probe(loaded.model, _ids(tp, device), logits_to_keep=positions(len(tp.input_ids))))
    return out


def _greedy(model, plan: Plan, ids: torch.Tensor, new_tokens: int) -> torch.Tensor:
    return plan.generate(model, ids, max_new_tokens=new_tokens)[0][0, ids.shape[1] :]


@dataclass
class Fidelity:
    fraction_heads: float
    fraction_groups: float | None  # None: read from an older results file, which did not record it
    per_layer_fraction: list[float]
    kl: float
    kl_se: float | None
    top1: float
    layer_error: list[float]


@dataclass
class Greedy:
    agreement: float | None
    prefix: float | None


@dataclass
class Ceilings:
    plan_fraction: float  # fraction of heads the speed prompt's plan copies or streams
    prefill_removed: float | None  # f of the prefill ceiling: fraction of attention work removed (None: older file)
    decode_removed: float | None  # mean f over the timed decode steps
    decode_groups_removed: float | None  # f_g: fraction of KV groups whose cache stops growing (None: older file)
    prefill: float
    decode: float


@dataclass
class KVMemory:
    unpatched_bytes: int
    patched_bytes: int
    saved_bytes: int


@dataclass
class PolicyRow:
    policy: str
    label: str
    kind: str  # "copy" or "streaming"
    evaluation: str  # the prompts it is evaluated on: "default", "long" or "given" (see the module doc)
    options: dict[str, Any]
    fidelity: Fidelity
    greedy: Greedy
    speed: SpeedResult
    ceilings: Ceilings
    kv: KVMemory


@dataclass
class SpeedPrompt:
    id: str
    tokens: int


@dataclass
class PatchEvalSettings:
    kl_positions: int
    greedy_prompts: list[str]
    new_tokens: int
    speed_prompt: SpeedPrompt
    speed_rounds: int
    calibration_prompts: list[str]
    evaluation_prompts: list[str]
    calibration_sha256: str
    evaluation_sha256: str
    threads: int
    device: str
    long_tokens: int | None  # streaming policies: the long passages' length cut (None: none used)
    long_calibration_prompts: list[str]  # streaming policies' extra calibration prompts
    long_evaluation_prompts: list[str]  # streaming policies' evaluation prompts
    long_greedy_prompts: list[str]


@dataclass
class PatchEvalResult(TopLevel, schema=SCHEMA, command="patch-eval"):
    """The results.json of `sink-eval patch-eval`: per policy, fidelity, greedy agreement, speed and KV memory."""

    model: ModelInfo
    settings: PatchEvalSettings
    policies: list[PolicyRow]
    provenance: Provenance

    @classmethod
    def from_json(cls, data: dict, source: str | Path) -> PatchEvalResult:
        """Also reads a results file of `OLDER_SCHEMA`, as copy runs (`_from_older`), and of `NO_GROWTH_SCHEMA`
        (`_without_growth`)."""
        if isinstance(data, dict) and data.get("schema") == OLDER_SCHEMA:
            data = _from_older(data)
        if isinstance(data, dict) and data.get("schema") == NO_GROWTH_SCHEMA:
            data = _without_growth(data)
        return super().from_json(data, source)


def _without_growth(data: dict) -> dict:
    """A results file whose decode ceilings counted attention alone, in this schema's terms: no growth share and no
    fraction of groups (their ceilings read as recorded)."""
    policies = [
        {
            **row,
            "speed": {**row["speed"], "decode_growth_share": None},
            "ceilings": {**row["ceilings"], "decode_groups_removed": None},
        }
        for row in data.get("policies", [])
    ]
    return {**data, "schema": SCHEMA, "policies": policies}


def _from_older(data: dict) -> dict:
    """A results file of `OLDER_SCHEMA` (copy policies only, evaluated on the given prompts) in this schema's terms:
    the fields it did not record are None or empty."""
    policies = []
    for row in data.get("policies", []):
        fidelity = dict(row["fidelity"])
        fidelity["fraction_heads"] = fidelity.pop("fraction_copied")
        fidelity["fraction_groups"] = None
        ceilings = {**row["ceilings"], "prefill_removed": None, "decode_removed": None}
        policies.append({**row, "kind": "copy", "evaluation": "default", "fidelity": fidelity, "ceilings": ceilings})
    settings = {
        **data["settings"],
        "long_tokens": None,
        "long_calibration_prompts": [],
        "long_evaluation_prompts": [],
        "long_greedy_prompts": [],
    }
    return _without_growth({**data, "schema": NO_GROWTH_SCHEMA, "settings": settings, "policies": policies})


@dataclass
class EvaluationSet:
    """Prompts a policy is evaluated on, with their unpatched probe passes and the chosen greedy prompts."""

    name: str
    prompts: list[TokenizedPrompt]
    reference: list[ProbeResult]
    greedy: dict[int, torch.Tensor] = field(default_factory=dict)  # prompt index -> unpatched greedy continuation


@dataclass
class _Context:
    """What every policy is measured against: the model, the evaluation sets and the calibration statistics."""

    loaded: LoadedModel
    default: EvaluationSet  # the policies' evaluated on the given prompts
    long: EvaluationSet | None  # the policies' evaluated on long inputs (None: no such policy)
    calibration: list[PromptStats]  # every calibrating policy's
    long_calibration: list[PromptStats]  # the long-input policies' too (the long passages)
    device: torch.device

    @property
    def shape(self) -> Shape:
        return model_shape(self.loaded.model)

    def evaluation(self, policy: Policy) -> EvaluationSet:
        if policy.long_inputs:
            assert self.long is not None, "a long-input policy has its long evaluation set"
            return self.long
        return self.default


def plan(ctx: _Context, policy: Policy, stats: PromptStats | None) -> Plan:
    """The policy's plan for a prompt of these statistics (None: a static policy's own plan)."""
    stats_of = ctx.calibration + ctx.long_calibration if policy.long_inputs else ctx.calibration
    return policy.plan(Target.of(ctx.loaded.model, policy.kind), stats, stats_of)


def scored_prompts(policy: Policy, prompts: list[TokenizedPrompt]) -> list[int]:
    """Indices of the prompts a policy's fidelity is measured on: those of at least `policy.min_tokens` tokens (on
    shorter ones its plan is the unpatched model: a streaming plan's windows cover their whole context), at least one
    of them."""
    least = policy.min_tokens
    chosen = [i for i, tp in enumerate(prompts) if len(tp.input_ids) >= least]
    if not chosen:
        raise SinkEvalError(
            f"every evaluation prompt has at most {least - 1} tokens, where the {policy.label} plan is the unpatched "
            "model (a streaming plan's windows cover their whole context, and its score is undefined); give longer "
            "prompts, or a smaller --sink / --window"
        )
    return chosen


def fidelity(ctx: _Context, policy: Policy, progress: bool) -> Fidelity:
    """Fractions planned, KL, top-1 and layer error over the policy's scored evaluation prompts (module doc)."""
    model, shape = ctx.loaded.model, ctx.shape
    evaluation = ctx.evaluation(policy)
    fractions, groups, per_layer, kls, top1s, errors = [], [], [], [], [], []
    chosen = scored_prompts(policy, evaluation.prompts)
    for i in tqdm(chosen, desc=policy.label, unit="prompt", disable=not progress, file=sys.stderr):
        tp = evaluation.prompts[i]
        prompt_plan = plan(ctx, policy, evaluation.reference[i].stats[0])
        ids = _ids(tp, ctx.device)
        fractions.append(prompt_plan.fraction(shape.layers, shape.heads))
        groups.append(prompt_plan.n_whole_groups(shape) / (shape.layers * shape.kv_heads))
        per_layer.append([n / shape.heads for n in prompt_plan.per_layer(shape.layers)])
        with prompt_plan.patched(model):
            logits = model(input_ids=ids, use_cache=False, logits_to_keep=positions(len(tp.input_ids))).logits
        kl, top1 = kl_and_top1(evaluation.reference[i].logits, logits)
        kls.append(kl)
        top1s.append(top1)
        layer_err = prompt_plan.layer_errors(model, ids)
        errors.append([layer_err.get(layer, 0.0) for layer in range(shape.layers)])
    kl_t = torch.tensor(kls)
    return Fidelity(
        fraction_heads=sum(fractions) / len(fractions),
        fraction_groups=sum(groups) / len(groups),
        per_layer_fraction=torch.tensor(per_layer).mean(0).tolist(),
        kl=float(kl_t.mean()),
        kl_se=bootstrap_se(kl_t, lambda x: float(x.mean())),
        top1=sum(top1s) / len(top1s),
        layer_error=torch.tensor(errors).mean(0).tolist(),
    )


def greedy_prompts(evaluation: list[TokenizedPrompt], generations: int, least: int = 2) -> list[int]:
    """Indices of the `generations` shortest evaluation prompts of at least `least` tokens."""
    by_length = sorted(range(len(evaluation)), key=lambda i: len(evaluation[i].input_ids))
    return [i for i in by_length if len(evaluation[i].input_ids) >= least][:generations]


def continued_prompts(
    policies: list[Policy],
    evaluation: list[TokenizedPrompt],
    long_evaluation: list[TokenizedPrompt] | None,
    generations: int,
) -> list[TokenizedPrompt]:
    """The prompts `run` continues greedily: where a policy runs on the evaluation prompts, their `generations`
    shortest of 2+ tokens; for the long-input policies, those of their set (`long_evaluation`, else the evaluation
    prompts) of `min_tokens`+ tokens."""
    long_policies = [p for p in policies if p.long_inputs]
    chosen = []
    if len(long_policies) < len(policies):
        chosen += [evaluation[i] for i in greedy_prompts(evaluation, generations, 2)]
    if long_policies:
        prompts = evaluation if long_evaluation is None else long_evaluation
        chosen += [prompts[i] for i in greedy_prompts(prompts, generations, long_policies[0].min_tokens)]
    return chosen


def greedy_generations(ctx: _Context, policy: Policy, new_tokens: int) -> Greedy:
    """Greedy agreement and mean common prefix with the unpatched continuations of the policy's evaluation set."""
    evaluation = ctx.evaluation(policy)
    agree, prefix = [], []
    for i, reference in evaluation.greedy.items():
        prompt_plan = plan(ctx, policy, evaluation.reference[i].stats[0])
        tokens = _greedy(ctx.loaded.model, prompt_plan, _ids(evaluation.prompts[i], ctx.device), new_tokens)
        same = (tokens == reference).long()
        agree.append(float(same.float().mean()))
        prefix.append(int(same.cumprod(0).sum()))
    return Greedy(sum(agree) / len(agree) if agree else None, sum(prefix) / len(prefix) if prefix else None)


def speed(
    ctx: _Context, policy: Policy, ids: torch.Tensor, stats: PromptStats | None, rounds: int
) -> tuple[SpeedResult, Ceilings]:
    """Speed of the policy's plan on the speed prompt, and its ceilings 1 / (1 - f a) and, in decode,
    1 / (1 - f a - f_g g) (`sink_eval.evals.speed`)."""
    shape = ctx.shape
    speed_plan = plan(ctx, policy, stats)
    measured = measure(ctx.loaded.model, speed_plan, ids, rounds=rounds)
    f_prefill = speed_plan.work_removed(shape, measured.tokens, 0)
    steps = range(1, measured.decode_steps + 1)
    f_decode = sum(speed_plan.work_removed(shape, measured.tokens + k, k) for k in steps) / measured.decode_steps
    f_groups = speed_plan.kv_groups_removed(shape) / (shape.layers * shape.kv_heads)
    growth = measured.decode_growth_share
    assert growth is not None, "a fresh measurement records its growth share"
    return measured, Ceilings(
        plan_fraction=speed_plan.fraction(shape.layers, shape.heads),
        prefill_removed=f_prefill,
        decode_removed=f_decode,
        decode_groups_removed=f_groups,
        prefill=ceiling(f_prefill, measured.prefill_share),
        decode=ceiling(f_decode, measured.decode_share, f_groups, growth),
    )


def kv_memory(measured: SpeedResult) -> KVMemory:
    """Bytes of the plan's KV cache against the model's own, after the decode run."""
    return KVMemory(
        unpatched_bytes=measured.kv_bytes_unpatched,
        patched_bytes=measured.kv_bytes_patched,
        saved_bytes=measured.kv_bytes_unpatched - measured.kv_bytes_patched,
    )


def _with_greedy(
    model, evaluation: EvaluationSet, generations: int, new_tokens: int, least: int, device
) -> EvaluationSet:
    """The set with the unpatched greedy continuations of its `generations` shortest prompts of `least`+ tokens."""
    for i in greedy_prompts(evaluation.prompts, generations, least):
        evaluation.greedy[i] = _greedy(model, CopyPlan(), _ids(evaluation.prompts[i], device), new_tokens)
    return evaluation


@torch.no_grad()
def run(
    loaded: LoadedModel,
    policies: list[Policy],
    calibration_prompts: list[TokenizedPrompt],
    evaluation: list[TokenizedPrompt],
    speed_prompt: TokenizedPrompt,
    generations: int = 8,
    new_tokens: int = 32,
    speed_rounds: int = 3,
    progress: bool = True,
    command: str = "",
    long: tuple[list[TokenizedPrompt], list[TokenizedPrompt], str] | None = None,
    long_tokens: int | None = None,
) -> PatchEvalResult:
    """Each policy's fidelity, greedy agreement, speed and KV memory (see the module doc). `long`: the long-input
    policies' extra calibration prompts, their evaluation prompts and that set's name ("long"), `long_tokens` their
    length cut; None: the long-input policies use the other policies' prompts ("given")."""
    model = loaded.model
    device = next(model.parameters()).device
    long_policies = [p for p in policies if p.long_inputs]
    calibration_stats = calibration.stats(loaded, calibration_prompts, policies, progress, "calibration prompts")
    default = EvaluationSet("default", evaluation, [])
    if len(long_policies) < len(policies) or (long_policies and long is None):  # a policy on the given prompts
        default.reference = _references(loaded, evaluation, "evaluation prompts", progress)
    if len(long_policies) < len(policies):
        default = _with_greedy(model, default, generations, new_tokens, 2, device)
    long_set, extra_stats = None, []
    extra_calibration: list[TokenizedPrompt] = []
    if long_policies:
        if long is None:
            long_set = EvaluationSet("given", evaluation, default.reference)
        else:
            extra_calibration, prompts, name = long
            long_set = EvaluationSet(
                name, prompts, _references(loaded, prompts, f"{name} evaluation prompts", progress)
            )
            extra_stats = calibration.stats(loaded, extra_calibration, long_policies, progress, f"{name} calibration")
        least = long_policies[0].min_tokens
        long_set = _with_greedy(model, long_set, generations, new_tokens, least, device)
    ctx = _Context(
        loaded=loaded,
        default=default,
        long=long_set,
        calibration=calibration_stats,
        long_calibration=extra_stats,
        device=device,
    )
    speed_ids = _ids(speed_prompt, device)
    speed_stats = probe(model, speed_ids).stats[0] if any(p.per_prompt for p in policies) else None
    rows = []
    for policy in policies:
        measured_fidelity = fidelity(ctx, policy, progress)
        greedy = greedy_generations(ctx, policy, new_tokens)
        measured, ceilings = speed(ctx, policy, speed_ids, speed_stats, speed_rounds)
        rows.append(
            PolicyRow(
                policy=policy.name,
                label=policy.label,
                kind=policy.kind,
                evaluation=ctx.evaluation(policy).name,
                options=asdict(policy.options),
                fidelity=measured_fidelity,
                greedy=greedy,
                speed=measured,
                ceilings=ceilings,
                kv=kv_memory(measured),
            )
        )
    return PatchEvalResult(
        model=loaded.info(),
        settings=PatchEvalSettings(
            kl_positions=KL_POSITIONS,
            greedy_prompts=[evaluation[i].prompt.id for i in default.greedy],
            new_tokens=new_tokens,
            speed_prompt=SpeedPrompt(speed_prompt.prompt.id, len(speed_prompt.input_ids)),
            speed_rounds=speed_rounds,
            calibration_prompts=[tp.prompt.id for tp in calibration_prompts],
            evaluation_prompts=[tp.prompt.id for tp in evaluation],
            calibration_sha256=prompt_set_sha256([tp.prompt for tp in calibration_prompts]),
            evaluation_sha256=prompt_set_sha256([tp.prompt for tp in evaluation]),
            threads=torch.get_num_threads(),
            device=str(device),
            long_tokens=long_tokens if long is not None and long_policies else None,
            long_calibration_prompts=[tp.prompt.id for tp in extra_calibration],
            long_evaluation_prompts=[tp.prompt.id for tp in long_set.prompts] if long_set else [],
            long_greedy_prompts=[long_set.prompts[i].prompt.id for i in long_set.greedy] if long_set else [],
        ),
        policies=rows,
        provenance=provenance(command),
    )
