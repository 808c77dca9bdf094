"""Probe a prompt set and summarise it: the results JSON of `sink-eval analyze` (schema in DESIGN.md).

Summary statistics, per length bin and threshold, over the prompts with at least two tokens (a one-token prompt has
no query to average: it is counted as trivial, never as 100 % sinks):
- prevalence = mean over prompts of the fraction of (layer, head) pairs that are sink heads;
- per-layer prevalence = the same per layer;
- first-layer agreement, base rate, lift and recall (`sink_eval.correlation`);
- standard errors by a seeded bootstrap over prompts (200 resamples).
"""

from __future__ import annotations

import sys
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime
from importlib.metadata import version

import torch
from tqdm import tqdm

from sink_eval.correlation import consistency, first_layer_agreement, layer_correlation, spearman
from sink_eval.models import LoadedModel
from sink_eval.probe import PromptStats, probe
from sink_eval.prompts import LENGTH_BINS, TokenizedPrompt, length_bin, prompt_set_sha256
from sink_eval.sinks import HEAD_CLASSES, head_classes, sink_heads, threshold_for

SCHEMA = "sink_eval.results/1"
MIN_SCORED_TOKENS = 2  # a one-token prompt has no query to average over: it is trivial
BOOTSTRAP_RESAMPLES = 200
TOP_HEADS = 10


@dataclass
class ProbedPrompt:
    prompt: TokenizedPrompt
    stats: PromptStats


def probe_prompts(loaded: LoadedModel, prompts: list[TokenizedPrompt], progress: bool = True) -> list[ProbedPrompt]:
    """Probe each prompt on its own (no padding), with a progress bar on stderr."""
    device = next(loaded.model.parameters()).device
    out = []
    for tp in tqdm(prompts, desc=f"probing {loaded.spec.name}", unit="prompt", disable=not progress, file=sys.stderr):
        stats = probe(loaded.model, torch.tensor([tp.input_ids], device=device)).stats[0]
        out.append(ProbedPrompt(tp, stats))
    return out


def bin_key(lo: int, hi: int) -> str:
    return f"{lo}-{hi}"


def summary_groups(summary: dict) -> list[tuple[str, dict]]:
    """(key, group) of one threshold's summary: each length bin, then the pooled "all"."""
    return [*summary["bins"].items(), ("all", summary["all"])]


def summary_group(summary: dict, key: str) -> dict:
    return summary["all"] if key == "all" else summary["bins"][key]


def _scored(items: list[ProbedPrompt]) -> list[ProbedPrompt]:
    return [p for p in items if p.stats.n_tokens >= MIN_SCORED_TOKENS]


def _sink_maps(items: list[ProbedPrompt], tau: float, chance_corrected: bool) -> torch.Tensor:
    return torch.stack(
        [sink_heads(p.stats.sink, threshold_for(tau, p.stats.n_tokens, chance_corrected)) for p in items]
    )


def bootstrap_se(sinks: torch.Tensor, statistic: Callable[[torch.Tensor], float | None]) -> float | None:
    """Standard deviation of `statistic` over prompts resampled with replacement (seeded, so repeatable)."""
    if len(sinks) < 2:
        return None
    gen = torch.Generator().manual_seed(0)
    values = []
    for _ in range(BOOTSTRAP_RESAMPLES):
        value = statistic(sinks[torch.randint(len(sinks), (len(sinks),), generator=gen)])
        if value is not None:
            values.append(value)
    return float(torch.tensor(values).std()) if len(values) > 1 else None


def _prevalence(sinks: torch.Tensor) -> float:
    return float(sinks.float().mean())


def _agreement(sinks: torch.Tensor) -> float | None:
    return first_layer_agreement(sinks).agreement


def _group_summary(items: list[ProbedPrompt], tau: float, chance_corrected: bool) -> dict:
    scored = _scored(items)
    summary = {"n_prompts": len(items), "n_trivial": len(items) - len(scored)}
    if not scored:
        return summary | {"prevalence": None, "first_layer_agreement": None}
    sinks = _sink_maps(scored, tau, chance_corrected)
    fla = first_layer_agreement(sinks)
    classes = torch.stack(
        [
            head_classes(
                p.stats.sink, p.stats.self_, p.stats.prev, threshold_for(tau, p.stats.n_tokens, chance_corrected)
            )
            for p in scored
        ]
    )
    return summary | {
        "prevalence": _prevalence(sinks),
        "prevalence_se": bootstrap_se(sinks, _prevalence),
        "per_layer_prevalence": sinks.float().mean(dim=(0, 2)).tolist(),
        "first_layer_agreement": fla.agreement,
        "first_layer_agreement_se": bootstrap_se(sinks, _agreement) if fla.agreement is not None else None,
        "base_rate": fla.base_rate,
        "lift": fla.lift,
        "recall": fla.recall,
        "prompts_with_layer0_sink": fla.prompts_with_layer0_sink,
        "head_classes": {name: float((classes == i).float().mean()) for i, name in enumerate(HEAD_CLASSES)},
    }


def _top_heads(items: list[ProbedPrompt], tau: float, chance_corrected: bool) -> list[dict]:
    scored = _scored(items)
    if not scored:
        return []
    cons = consistency(_sink_maps(scored, tau, chance_corrected))
    mean_score = torch.stack([p.stats.sink for p in scored]).mean(dim=0)
    order = sorted(
        ((layer, head) for layer in range(cons.shape[0]) for head in range(cons.shape[1])),
        key=lambda lh: (-float(cons[lh]), -float(mean_score[lh]), lh),
    )
    return [
        {
            "layer": layer,
            "head": head,
            "consistency": float(cons[layer, head]),
            "mean_sink_score": float(mean_score[layer, head]),
        }
        for layer, head in order[:TOP_HEADS]
    ]


def summarize(probed: list[ProbedPrompt], thresholds: tuple[float, ...], chance_corrected: bool = False) -> dict:
    by_bin = {b: [p for p in probed if length_bin(p.stats.n_tokens) == b] for b in LENGTH_BINS}
    scored = _scored(probed)
    summary = {}
    for tau in thresholds:
        per_prompt = [float(s.float().mean()) for s in _sink_maps(scored, tau, chance_corrected)] if scored else []
        summary[f"tau={tau:g}"] = {
            "bins": {bin_key(*b): _group_summary(items, tau, chance_corrected) for b, items in by_bin.items()},
            "all": _group_summary(probed, tau, chance_corrected),
            "spearman_length_vs_prevalence": spearman(
                torch.tensor([float(p.stats.n_tokens) for p in scored]), torch.tensor(per_prompt)
            )
            if scored
            else None,
            "top_consistent_heads": _top_heads(probed, tau, chance_corrected),
        }
    if scored:
        scores = torch.stack([p.stats.sink for p in scored])
        summary["layer_correlation"] = torch.nan_to_num(layer_correlation(scores), nan=0.0).tolist()
    return summary


def _round(t: torch.Tensor) -> list:
    return [[None if v != v else round(v, 6) for v in row] for row in t.tolist()]


def results(
    loaded: LoadedModel,
    probed: list[ProbedPrompt],
    thresholds: tuple[float, ...],
    chance_corrected: bool = False,
    command: str = "",
) -> dict:
    """The results JSON: model, settings, per-prompt scores, summary, versions and provenance."""
    config = loaded.model.config
    prompts = [p.prompt.prompt for p in probed]
    return {
        "schema": SCHEMA,
        "model": {
            "name": loaded.spec.name,
            "fingerprint": loaded.fingerprint,
            "layers": config.num_hidden_layers,
            "heads": config.num_attention_heads,
            "kv_heads": config.num_key_value_heads,
            "dtype": str(loaded.model.dtype).removeprefix("torch."),
        },
        "settings": {
            "thresholds": list(thresholds),
            "chance_corrected_threshold": chance_corrected,
            "exclude_first_query": True,
            "length_bins": [list(b) for b in LENGTH_BINS],
            "prompt_set_sha256": prompt_set_sha256(prompts),
        },
        "prompts": [
            {
                "id": p.prompt.prompt.id,
                "domain": p.prompt.prompt.domain,
                "n_tokens": p.stats.n_tokens,
                "sink_score": _round(p.stats.sink),
                "self_score": _round(p.stats.self_),
                "prev_score": _round(p.stats.prev),
            }
            for p in probed
        ],
        "summary": summarize(probed, thresholds, chance_corrected),
        "versions": {name: version(name) for name in ("sink_eval", "torch", "transformers")},
        "provenance": {"date": datetime.now(UTC).isoformat(timespec="seconds"), "command": command},
    }
