"""Speed gates of the streaming plans a user would deploy: no such plan may be slower than the model it patches.

The plans are the ones the committed long-context baselines measured (`baselines/longctx/<model>-*/results.json`,
their `plan`, chosen by `sink-eval longctx` on the calibration passages): the calibrated plan, every head whose
streaming score is at least p = 0.9 (`streaming p=0.9`: mostly single heads, few whole KV groups), and DuoAttention's
rule, the top half of the KV groups by their weakest head's score (`streaming q=0.5`: whole groups only).

Each is timed on the whole model, paired with the unpatched model round by round (`sink_eval.evals.speed.paired`):
prefill (one forward over N tokens of real text, batch 1) and decode (`DECODE_STEPS` greedy steps over a cache of N
random keys and values, batch 1 and 8), beside the region with attention returning at once (the attention share a)
and, in decode, that over a preallocated cache (the growth share g). The ceiling is 1 / (1 − f a − f_g g):
f = `Plan.work_removed`, f_g the fraction of KV groups streamed whole (`sink_eval.evals.speed.ceiling`). Gate
(`sink_eval.evals.speed.deployable`), on the lower quartile of the paired ratios: at least 0.97 where the ceiling is
below 1.05, else at least 80 % of what the ceiling allows saved.
"""

from __future__ import annotations

import json
from contextlib import nullcontext
from pathlib import Path

import pytest
import torch
from bench_regions import DECODE_STEPS, decode, decode_references, prefill, real_ids
from transformers import Cache

from sink_eval.core.shape import model_shape
from sink_eval.evals.speed import Paired, attention_share, ceiling, deployable, growth_share, paired, without_attention
from sink_eval.patches.streaming.plan import StreamingPlan
from sink_eval.prompts.prompt_set import long_passages

pytestmark = pytest.mark.bench

LONGCTX = Path(__file__).resolve().parents[2] / "baselines" / "longctx"
PLANS = {  # label -> (baseline directory suffix, the run's label in it)
    "p0.9": ("calibrated-streaming-p0.9", "streaming p=0.9 (s=4, w=256)"),
    "q0.5": ("streaming-q0.5", "streaming q=0.5 (s=4, w=256)"),
}
ROUNDS = 5  # the gate reads the lower quartile of the paired ratios


def committed_plan(model_name: str, label: str) -> StreamingPlan:
    """The plan that the committed long-context baseline of `model_name` ran under `label` (`PLANS`)."""
    directory, run_label = PLANS[label]
    results = json.loads((LONGCTX / f"{model_name}-{directory}" / "results.json").read_text())
    (run,) = [run for run in results["runs"] if run["label"] == run_label]
    plan = run["plan"]
    return StreamingPlan.of({int(layer): heads for layer, heads in plan["heads"].items()}, plan["sink"], plan["window"])


def judged(benchmark, what: str, timings: dict[str, Paired], fraction: float, groups: float) -> dict:
    """The plan's paired speed-up beside its ceiling and the gate's verdict; recorded in extra_info and printed."""
    share = attention_share(timings["without"])
    growth = growth_share(timings["without"], timings["static"]) if "static" in timings else 0.0
    t = timings["plan"]
    c = ceiling(fraction, share, groups, growth)
    row = {
        "what": what,
        "work_removed": fraction,
        "kv_groups_removed": groups,
        "attention_share": share,
        "growth_share": growth,
        "ceiling": c,
        "speedup": t.speedup,
        "speedup_lower_quartile": t.lower_quartile,
        "ratios": t.ratios,
        "unpatched_s": t.unpatched_s,
        "patched_s": t.variant_s,
        "gate": deployable(t.lower_quartile, c),
    }
    print(
        f"\n{what}: {t.unpatched_s:.4f} s -> {t.variant_s:.4f} s, paired speed-up {t.speedup:.3f} (lower quartile "
        f"{t.lower_quartile:.3f}); ceiling {c:.3f} (f={fraction:.3f}, a={share:.3f}, f_g={groups:.3f}, g={growth:.3f}) "
        f"gate {'pass' if row['gate'] else 'FAIL'}"
    )
    benchmark.extra_info.update(row)
    return row


CASES = [
    (model, label, tokens)
    for model, lengths in (("smollm2-135m", (2048, 4096, 8192)), ("qwen2.5-coder-0.5b", (2048, 4096)))
    for label in PLANS
    for tokens in lengths
]


@pytest.mark.parametrize("model_name, label, tokens", CASES)
def test_a_deployed_streaming_plan_prefills_no_slower_than_its_model(benchmark, sink_model, model_name, label, tokens):
    loaded = sink_model(model_name)
    model = loaded.model
    shape = model_shape(model)
    plan = committed_plan(model_name, label)
    region = prefill(model, real_ids(loaded.tokenizer, [p.text for p in long_passages()], tokens))
    variants = {"without": region(lambda: without_attention(model)), "plan": region(lambda: plan.patched(model))}
    timings = benchmark.pedantic(
        lambda: paired(region(nullcontext), variants, ROUNDS, device=model.device), rounds=1, iterations=1
    )
    what = f"{model_name} {label} prefill {tokens} tokens"
    row = judged(benchmark, what, timings, plan.work_removed(shape, tokens, 0), 0.0)
    assert row["gate"], row


@pytest.mark.parametrize("batch", [1, 8])
@pytest.mark.parametrize("model_name, label, tokens", CASES)
def test_a_deployed_streaming_plan_decodes_no_slower_than_its_model(
    benchmark, sink_model, model_name, label, tokens, batch
):
    loaded = sink_model(model_name)
    model = loaded.model
    shape = model_shape(model)
    plan = committed_plan(model_name, label)
    caches: dict[str, Cache] = {}
    region = decode(model, tokens, caches, batch)
    unpatched, variants = decode_references(region, model, tokens)
    mask = torch.ones(batch, tokens, dtype=torch.long)
    variants["plan"] = region("plan", lambda: plan.new_cache(model, mask), lambda cache: plan.patched(model, cache))
    timings = benchmark.pedantic(
        lambda: paired(unpatched, variants, ROUNDS, device=model.device), rounds=1, iterations=1
    )
    context = tokens + DECODE_STEPS // 2  # the mean cache length over the timed steps
    groups = plan.kv_groups_removed(shape) / (shape.layers * shape.kv_heads)
    what = f"{model_name} {label} decode {tokens} tokens batch {batch}"
    row = judged(benchmark, what, timings, plan.work_removed(shape, context, 1), groups)
    assert row["gate"], row
