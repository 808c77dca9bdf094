"""`sink-eval patch-eval`: what each copy policy costs in fidelity and buys in speed and KV memory, in one run.

Fidelity, per policy, over the evaluation prompts (never the calibration prompts):
- fraction copied = mean over prompts of the fraction of (layer, head) pairs the prompt's plan copies;
- KL = mean over prompts of the mean over up to `KL_POSITIONS` evenly spaced positions of
  KL(p_unpatched || p_patched) of the next-token distributions, in nats; top-1 = fraction of those positions whose
  argmax agrees. The unpatched reference is the probe's pass (exact eager attention; equal to SDPA within 1e-4 in
  the logits, tested), which also gives the per-prompt policies their statistics;
- layer error = per-layer relative error of the attention output (`sink_eval.patch.layer_errors`), mean over prompts;
- greedy agreement = fraction of the `new_tokens` greedy tokens that equal the unpatched model's at the same step,
  and the common prefix length, over the shortest evaluation prompts.
Speed (`sink_eval.speed.measure`) on one real prompt of `speed_tokens` tokens, with its ceilings.
"""

from __future__ import annotations

import sys
from dataclasses import asdict, dataclass
from typing import Any, ClassVar

import torch
from tqdm import tqdm

from sink_eval.analysis import bootstrap_se, model_info
from sink_eval.models import LoadedModel
from sink_eval.patch import CopyPlan, generate, layer_errors, patched, plan_applies
from sink_eval.policies import Policy, make_plan
from sink_eval.probe import ProbeResult, PromptStats, probe
from sink_eval.prompts import TokenizedPrompt, prompt_set_sha256
from sink_eval.results import ModelInfo, Provenance, TopLevel, provenance
from sink_eval.shape import Shape, model_shape
from sink_eval.speed import SpeedResult, ceiling, measure

SCHEMA = "sink_eval.patch_eval/2"
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


def _probe_all(loaded: LoadedModel, prompts: list[TokenizedPrompt], what: str, progress: bool) -> list[ProbeResult]:
    device = next(loaded.model.parameters()).device
    out = []
    for tp in tqdm(prompts, desc=f"probing {what}", unit="prompt", disable=not progress, file=sys.stderr):
        out.append(probe(loaded.model, _ids(tp, device), logits_to_keep=positions(len(tp.input_ids))))
    return out


def _greedy(model, plan: CopyPlan, ids: torch.Tensor, new_tokens: int) -> torch.Tensor:
    return generate(model, plan, ids, max_new_tokens=new_tokens)[0][0, ids.shape[1] :]


@dataclass
class Fidelity:
    fraction_copied: float
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
    plan_fraction: float  # fraction of heads the speed prompt's plan copies
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


@dataclass
class PatchEvalResult(TopLevel):
    SCHEMA: ClassVar[str] = SCHEMA
    model: ModelInfo
    settings: PatchEvalSettings
    policies: list[PolicyRow]
    provenance: Provenance


@dataclass
class _Context:
    """What every policy is measured against: the model, its reference passes and the calibration statistics."""

    loaded: LoadedModel
    evaluation: list[TokenizedPrompt]
    reference: list[ProbeResult]  # the unpatched probe pass of each evaluation prompt
    calibration: list[PromptStats]
    device: torch.device

    @property
    def shape(self) -> Shape:
        return model_shape(self.loaded.model)


def calibrate(loaded: LoadedModel, policies: list[Policy], calibration: list[TokenizedPrompt], progress: bool):
    """Sink statistics of the calibration prompts (none when every policy plans per prompt)."""
    if all(p.per_prompt() for p in policies):
        return []
    return [r.stats[0] for r in _probe_all(loaded, calibration, "calibration prompts", progress)]


def plan(ctx: _Context, policy: Policy, stats: PromptStats | None) -> CopyPlan:
    """The policy's copy plan for a prompt of these statistics (None: a static policy's own plan)."""
    return make_plan(policy.name, policy.options, stats, ctx.calibration)


def fidelity(ctx: _Context, policy: Policy, progress: bool) -> Fidelity:
    """Fraction copied, KL, top-1 and layer error over the non-trivial evaluation prompts (see the module doc)."""
    model, shape = ctx.loaded.model, ctx.shape
    fractions, per_layer, kls, top1s, errors = [], [], [], [], []
    for i, tp in enumerate(
        tqdm(ctx.evaluation, desc=policy.label, unit="prompt", disable=not progress, file=sys.stderr)
    ):
        if len(tp.input_ids) < 2:
            continue
        prompt_plan = plan(ctx, policy, ctx.reference[i].stats[0])
        ids = _ids(tp, ctx.device)
        fractions.append(prompt_plan.fraction(shape.layers, shape.heads))
        per_layer.append([n / shape.heads for n in prompt_plan.per_layer(shape.layers)])
        with patched(model, prompt_plan):
            logits = model(input_ids=ids, use_cache=False, logits_to_keep=positions(len(tp.input_ids))).logits
        kl, top1 = kl_and_top1(ctx.reference[i].logits, logits)
        kls.append(kl)
        top1s.append(top1)
        layer_err = layer_errors(model, prompt_plan, ids)
        errors.append([layer_err.get(layer, 0.0) for layer in range(shape.layers)])
    kl_t = torch.tensor(kls)
    return Fidelity(
        fraction_copied=sum(fractions) / len(fractions),
        per_layer_fraction=torch.tensor(per_layer).mean(0).tolist(),
        kl=float(kl_t.mean()),
        kl_se=bootstrap_se(kl_t, lambda x: float(x.mean())),
        top1=sum(top1s) / len(top1s),
        layer_error=torch.tensor(errors).mean(0).tolist(),
    )


def greedy_prompts(evaluation: list[TokenizedPrompt], generations: int) -> list[int]:
    """Indices of the `generations` shortest non-trivial evaluation prompts."""
    by_length = sorted(range(len(evaluation)), key=lambda i: len(evaluation[i].input_ids))
    return [i for i in by_length if len(evaluation[i].input_ids) >= 2][:generations]


def greedy_generations(ctx: _Context, policy: Policy, unpatched: dict[int, torch.Tensor], new_tokens: int) -> Greedy:
    """Greedy agreement and mean common prefix with the unpatched continuations `unpatched` (by prompt index)."""
    agree, prefix = [], []
    for i, reference in unpatched.items():
        prompt_plan = plan(ctx, policy, ctx.reference[i].stats[0])
        tokens = _greedy(ctx.loaded.model, prompt_plan, _ids(ctx.evaluation[i], ctx.device), new_tokens)
        same = (tokens == reference).long()
        agree.append(float(same.float().mean()))
        prefix.append(int(same.cumprod(0).sum()))
    return Greedy(sum(agree) / len(agree) if agree else None, sum(prefix) / len(prefix) if prefix else None)


def speed(
    ctx: _Context, policy: Policy, ids: torch.Tensor, stats: PromptStats | None, rounds: int
) -> tuple[SpeedResult, Ceilings]:
    """Speed of the policy's plan on the speed prompt, and its ceilings 1 / (1 - f a)."""
    shape = ctx.shape
    speed_plan = plan(ctx, policy, stats)
    measured = measure(ctx.loaded.model, speed_plan, ids, rounds=rounds)
    f_speed = speed_plan.fraction(shape.layers, shape.heads)
    f_prefill = f_speed * plan_applies(speed_plan, measured.tokens, 0)
    f_decode = f_speed * _decode_fraction(speed_plan, measured.tokens, measured.decode_steps)
    return measured, Ceilings(
        plan_fraction=f_speed,
        prefill=ceiling(f_prefill, measured.prefill_share),
        decode=ceiling(f_decode, measured.decode_share),
    )


def kv_memory(measured: SpeedResult) -> KVMemory:
    """Bytes of the plan's KV cache against the model's own, after the decode run."""
    return KVMemory(
        unpatched_bytes=measured.kv_bytes_unpatched,
        patched_bytes=measured.kv_bytes_patched,
        saved_bytes=measured.kv_bytes_unpatched - measured.kv_bytes_patched,
    )


@torch.no_grad()
def run(
    loaded: LoadedModel,
    policies: list[Policy],
    calibration: list[TokenizedPrompt],
    evaluation: list[TokenizedPrompt],
    speed_prompt: TokenizedPrompt,
    generations: int = 8,
    new_tokens: int = 32,
    speed_rounds: int = 3,
    progress: bool = True,
    command: str = "",
) -> PatchEvalResult:
    """Each policy's fidelity, greedy agreement, speed and KV memory (see the module doc)."""
    model = loaded.model
    device = next(model.parameters()).device
    ctx = _Context(
        loaded=loaded,
        evaluation=evaluation,
        calibration=calibrate(loaded, policies, calibration, progress),
        reference=_probe_all(loaded, evaluation, "evaluation prompts", progress),
        device=device,
    )
    chosen = greedy_prompts(evaluation, generations)
    unpatched = {i: _greedy(model, CopyPlan(), _ids(evaluation[i], device), new_tokens) for i in chosen}
    speed_ids = _ids(speed_prompt, device)
    speed_stats = probe(model, speed_ids).stats[0] if any(p.per_prompt() for p in policies) else None
    rows = []
    for policy in policies:
        measured_fidelity = fidelity(ctx, policy, progress)
        greedy = greedy_generations(ctx, policy, unpatched, new_tokens)
        measured, ceilings = speed(ctx, policy, speed_ids, speed_stats, speed_rounds)
        rows.append(
            PolicyRow(
                policy=policy.name,
                label=policy.label,
                options=asdict(policy.options),
                fidelity=measured_fidelity,
                greedy=greedy,
                speed=measured,
                ceilings=ceilings,
                kv=kv_memory(measured),
            )
        )
    return PatchEvalResult(
        model=model_info(loaded),
        settings=PatchEvalSettings(
            kl_positions=KL_POSITIONS,
            greedy_prompts=[evaluation[i].prompt.id for i in chosen],
            new_tokens=new_tokens,
            speed_prompt=SpeedPrompt(speed_prompt.prompt.id, len(speed_prompt.input_ids)),
            speed_rounds=speed_rounds,
            calibration_prompts=[tp.prompt.id for tp in calibration],
            evaluation_prompts=[tp.prompt.id for tp in evaluation],
            calibration_sha256=prompt_set_sha256([tp.prompt for tp in calibration]),
            evaluation_sha256=prompt_set_sha256([tp.prompt for tp in evaluation]),
            threads=torch.get_num_threads(),
            device=str(device),
        ),
        policies=rows,
        provenance=provenance(command),
    )


def _decode_fraction(plan: CopyPlan, tokens: int, steps: int) -> float:
    """Fraction of the timed decode steps in which the plan copies."""
    return sum(plan_applies(plan, tokens + step, step) for step in range(1, steps + 1)) / steps
