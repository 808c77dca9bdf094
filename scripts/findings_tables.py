"""Print the README's headline tables from the committed baselines (so that the README shows what they hold).

    python scripts/findings_tables.py

Reads baselines/analysis/<model>.json (sink prevalence and first-layer agreement bands; <model>-full.json, the whole
prompt set, where CI checks a cut of it) and baselines/patch/<model>-cpu-2threads.json (patch-eval results).
"""

from __future__ import annotations

import json
from pathlib import Path

from sink_eval.baselines import read_baseline, value_key
from sink_eval.patch_eval import PatchEvalResult
from sink_eval.prompts import LENGTH_BINS

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


if __name__ == "__main__":
    print("Prevalence, tau = 0.8\n\n" + prevalence_table(0.8) + "\n")
    print("Prevalence, tau = 0.3\n\n" + prevalence_table(0.3) + "\n")
    print("Copy patch\n\n" + patch_table())
