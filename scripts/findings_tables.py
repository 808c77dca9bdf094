"""Print the README's headline tables from the committed baselines (so that the README shows what they hold).

    python scripts/findings_tables.py

Reads baselines/analysis/<model>.json (sink prevalence and first-layer agreement bands; <model>-full.json, the whole
prompt set, where CI checks a cut of it), baselines/patch/<model>-cpu-2threads.json (patch-eval results, of the
models that have one) and baselines/longctx/<model>-<policies>/results.json (the long-context grids).
"""

from __future__ import annotations

import json
from pathlib import Path

from sink_eval.baselines import read_baseline, value_key
from sink_eval.evals.longctx import LongctxResult, Run
from sink_eval.evals.patch_eval import PatchEvalResult
from sink_eval.prompts.prompt_set import LENGTH_BINS

BASELINES = Path(__file__).resolve().parents[1] / "baselines"
MODELS = ("smollm2-135m", "gemma3-270m", "qwen2.5-coder-0.5b", "qwen2.5-coder-1.5b")


def _analysis_path(model: str) -> Path:
    full = BASELINES / "analysis" / f"{model}-full.json"
    return full if full.exists() else BASELINES / "analysis" / f"{model}.json"


def _pct(value: float | None, se: float | None = None) -> str:
    if value is None:
        return "undefined"
    return f"{100 * value:.1f} %" + (f" ± {100 * se:.1f}" if se else "")


def prevalence_table(tau: float) -> str:
    """Sink prevalence by length bin at threshold `tau`, one column per model."""
    loaded = {m: read_baseline(_analysis_path(m)) for m in MODELS}
    rows = [f"| tokens | {' | '.join(MODELS)} |", "| --- |" + " --- |" * len(MODELS)]
    for tokens in [f"{lo}-{hi}" for lo, hi in LENGTH_BINS] + ["all"]:
        cells = [loaded[m].values[value_key("prevalence", tau, tokens)] for m in MODELS]
        rows.append(f"| {tokens} | " + " | ".join(_pct(c.value, c.se) for c in cells) + " |")
    return "\n".join(rows)


def patch_table() -> str:
    """Per model and policy: heads copied, KL, top-1, greedy agreement, speed-ups (ceilings), KV saved."""
    rows = [
        "| model | policy | heads copied | KL (nats) | top-1 | greedy agree / prefix | prefill × (ceiling) "
        "| decode × (ceiling) | KV saved |",
        "| --- |" + " --- |" * 8,
    ]
    for model in MODELS:
        path = BASELINES / "patch" / f"{model}-cpu-2threads.json"
        if not path.exists():
            rows.append(f"| {model} | (no patch-eval baseline) |" + " |" * 7)
            continue
        res = PatchEvalResult.from_json(json.loads(path.read_text()), path)
        for row in res.policies:
            f, g, s, c, kv = row.fidelity, row.greedy, row.speed, row.ceilings, row.kv
            rows.append(
                f"| {model} | {row.label} | {_pct(f.fraction_heads)} | {max(f.kl, 0.0):.4f} | {_pct(f.top1)} "
                f"| {_pct(g.agreement)} / {g.prefix:.1f} | {s.prefill_speedup:.2f} ({c.prefill:.2f}) "
                f"| {s.decode_speedup:.2f} ({c.decode:.2f}) | {kv.saved_bytes / 1024:+.0f} KB of "
                f"{kv.unpatched_bytes / 2**20:.1f} MiB |"
            )
    return "\n".join(rows)


def _ratio(run: Run, i: int) -> float:
    ratio = run.lengths[i].perplexity_ratio
    assert ratio is not None, "a plan's run has a perplexity ratio"
    return ratio


def _speed(value: float | None) -> str:
    return "-" if value is None else f"{value:.2f}"


def longctx_table(res: LongctxResult) -> str:
    """Per policy and length: passkey accuracy (informative cells) of the policy, the unpatched model and the mean of
    the controls; perplexity ratio of the policy and of its controls (mean, range over seeds); KV groups and bytes
    saved; prefill / decode speed-ups of the passkey calls."""
    rows = [
        "| policy | L | passkey: policy / unpatched / controls | ppl ratio | controls' ppl ratio: mean [range] "
        "| KV groups | KV saved | speed-up prefill / decode |",
        "| --- |" + " --- |" * 7,
    ]
    unpatched = res.run("unpatched")
    for policy in (r for r in res.runs if r.role == "policy"):
        controls = [r for r in res.runs if r.control_of == policy.label]
        for i, row in enumerate(policy.lengths):
            base = unpatched.lengths[i]
            if row.accuracy is None:
                passkey = "uninformative"
            else:
                mean = sum(c.lengths[i].accuracy or 0.0 for c in controls) / max(len(controls), 1)
                passkey = (
                    f"{100 * row.accuracy:.0f} % ± {100 * (row.accuracy_se or 0.0):.0f} / "
                    f"{100 * (base.accuracy or 0.0):.0f} % / {100 * mean:.0f} %"
                )
            ratios = [_ratio(c, i) for c in controls]
            spread = f"{sum(ratios) / len(ratios):.4f} [{min(ratios):.4f}, {max(ratios):.4f}]" if ratios else "(none)"
            saved = row.kv_saved_bytes / (row.kv_bytes + row.kv_saved_bytes)
            rows.append(
                f"| {policy.label} | {row.length} | {passkey} | {_ratio(policy, i):.4f} ± "
                f"{row.perplexity_ratio_se or 0.0:.4f} | {spread} | {100 * policy.fraction_kv_groups:.1f} % "
                f"| {100 * saved:.1f} % ({row.kv_saved_bytes / 2**20:.1f} MiB) "
                f"| {_speed(row.prefill_speedup)} / {_speed(row.decode_speedup)} |"
            )
    return "\n".join(rows)


def longctx_tables() -> str:
    out = []
    for path in sorted(BASELINES.glob("longctx/*/results.json")):
        res = LongctxResult.from_json(json.loads(path.read_text()), path)
        out.append(f"{path.parent.name}\n\n{longctx_table(res)}\n")
    return "\n".join(out)


if __name__ == "__main__":
    print("Prevalence, tau = 0.8\n\n" + prevalence_table(0.8) + "\n")
    print("Prevalence, tau = 0.3\n\n" + prevalence_table(0.3) + "\n")
    print("Copy patch\n\n" + patch_table() + "\n")
    print("Long context\n\n" + longctx_tables())
