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
from dataclasses import asdict
from datetime import UTC, datetime
from importlib.metadata import version

import torch
from tqdm import tqdm

from sink_eval.analysis import bootstrap_se
from sink_eval.models import LoadedModel
from sink_eval.patch import CopyPlan, generate, layer_errors, patched, plan_applies
from sink_eval.policies import Policy, make_plan
from sink_eval.probe import PromptStats, probe
from sink_eval.prompts import TokenizedPrompt, prompt_set_sha256
from sink_eval.shape import model_shape
from sink_eval.speed import ceiling, measure

SCHEMA = "sink_eval.patch_eval/1"
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


def _probe_all(loaded: LoadedModel, prompts: list[TokenizedPrompt], what: str, progress: bool) -> list:
    device = next(loaded.model.parameters()).device
    out = []
    for tp in tqdm(prompts, desc=f"probing {what}", unit="prompt", disable=not progress, file=sys.stderr):
        out.append(probe(loaded.model, _ids(tp, device), logits_to_keep=positions(len(tp.input_ids))))
    return out


def _greedy(model, plan: CopyPlan, ids: torch.Tensor, new_tokens: int) -> torch.Tensor:
    return generate(model, plan, ids, max_new_tokens=new_tokens)[0][0, ids.shape[1] :]


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
) -> dict:
    """The patch-eval results JSON (schema `sink_eval.patch_eval/1`)."""
    model = loaded.model
    device = next(model.parameters()).device
    shape = model_shape(model)
    needs_calibration = any(not p.per_prompt() for p in policies)
    calib_stats: list[PromptStats] = (
        [r.stats[0] for r in _probe_all(loaded, calibration, "calibration prompts", progress)]
        if needs_calibration
        else []
    )
    reference = _probe_all(loaded, evaluation, "evaluation prompts", progress)

    def plan_for(policy: Policy, stats: PromptStats | None) -> CopyPlan:
        return make_plan(policy.name, policy.options, stats, calib_stats)

    by_length = sorted(range(len(evaluation)), key=lambda i: len(evaluation[i].input_ids))
    greedy_prompts = [i for i in by_length if len(evaluation[i].input_ids) >= 2][:generations]
    unpatched_greedy = {i: _greedy(model, CopyPlan(), _ids(evaluation[i], device), new_tokens) for i in greedy_prompts}
    speed_ids = _ids(speed_prompt, device)
    speed_stats = probe(model, speed_ids).stats[0] if any(p.per_prompt() for p in policies) else None

    rows = []
    for policy in policies:
        fractions, per_layer, kls, top1s, errors = [], [], [], [], []
        for i, tp in enumerate(
            tqdm(evaluation, desc=policy.label, unit="prompt", disable=not progress, file=sys.stderr)
        ):
            if len(tp.input_ids) < 2:
                continue
            plan = plan_for(policy, reference[i].stats[0])
            ids = _ids(tp, device)
            fractions.append(plan.fraction(shape.layers, shape.heads))
            per_layer.append([n / shape.heads for n in plan.per_layer(shape.layers)])
            with patched(model, plan):
                logits = model(input_ids=ids, use_cache=False, logits_to_keep=positions(len(tp.input_ids))).logits
            kl, top1 = kl_and_top1(reference[i].logits, logits)
            kls.append(kl)
            top1s.append(top1)
            layer_err = layer_errors(model, plan, ids)
            errors.append([layer_err.get(layer, 0.0) for layer in range(shape.layers)])
        agree, prefix = [], []
        for i in greedy_prompts:
            tokens = _greedy(model, plan_for(policy, reference[i].stats[0]), _ids(evaluation[i], device), new_tokens)
            same = (tokens == unpatched_greedy[i]).long()
            agree.append(float(same.float().mean()))
            prefix.append(int(same.cumprod(0).sum()))
        speed_plan = plan_for(policy, speed_stats)
        speed = measure(model, speed_plan, speed_ids, rounds=speed_rounds)
        f_speed = speed_plan.fraction(shape.layers, shape.heads)
        f_prefill = f_speed * plan_applies(speed_plan, speed.tokens, 0)
        f_decode = f_speed * _decode_fraction(speed_plan, speed.tokens, speed.decode_steps)
        kl_t = torch.tensor(kls)
        rows.append(
            {
                "policy": policy.name,
                "label": policy.label,
                "options": asdict(policy.options),
                "fraction_copied": sum(fractions) / len(fractions),
                "per_layer_fraction": torch.tensor(per_layer).mean(0).tolist(),
                "kl": float(kl_t.mean()),
                "kl_se": bootstrap_se(kl_t, lambda x: float(x.mean())),
                "top1": sum(top1s) / len(top1s),
                "layer_error": torch.tensor(errors).mean(0).tolist(),
                "greedy_agreement": sum(agree) / len(agree) if agree else None,
                "greedy_prefix": sum(prefix) / len(prefix) if prefix else None,
                "speed": speed.as_dict()
                | {
                    "plan_fraction": f_speed,
                    "prefill_ceiling": ceiling(f_prefill, speed.prefill_share),
                    "decode_ceiling": ceiling(f_decode, speed.decode_share),
                    "kv_bytes_saved": speed.kv_bytes_unpatched - speed.kv_bytes_patched,
                },
            }
        )
    return {
        "schema": SCHEMA,
        "model": {
            "name": loaded.spec.name,
            "fingerprint": loaded.fingerprint,
            "layers": shape.layers,
            "heads": shape.heads,
            "kv_heads": shape.kv_heads,
            "dtype": str(model.dtype).removeprefix("torch."),
        },
        "settings": {
            "kl_positions": KL_POSITIONS,
            "greedy_prompts": [evaluation[i].prompt.id for i in greedy_prompts],
            "new_tokens": new_tokens,
            "speed_prompt": {"id": speed_prompt.prompt.id, "tokens": len(speed_prompt.input_ids)},
            "speed_rounds": speed_rounds,
            "calibration_prompts": [tp.prompt.id for tp in calibration],
            "evaluation_prompts": [tp.prompt.id for tp in evaluation],
            "calibration_sha256": prompt_set_sha256([tp.prompt for tp in calibration]),
            "evaluation_sha256": prompt_set_sha256([tp.prompt for tp in evaluation]),
            "threads": torch.get_num_threads(),
            "device": str(device),
        },
        "policies": rows,
        "versions": {name: version(name) for name in ("sink_eval", "torch", "transformers")},
        "provenance": {"date": datetime.now(UTC).isoformat(timespec="seconds"), "command": command},
    }


def _decode_fraction(plan: CopyPlan, tokens: int, steps: int) -> float:
    """Fraction of the timed decode steps in which the plan copies."""
    return sum(plan_applies(plan, tokens + step, step) for step in range(1, steps + 1)) / steps
