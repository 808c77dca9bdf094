"""Speed gates of the copy patch on smollm2-135m: forced plans copying a fraction f of the heads.

Each test times, round by round, each variant right after the unpatched region (`sink_eval.evals.speed.paired`: the
speed-up is the median of those back-to-back ratios, their spread the IQR): the region patched with each plan, and
the region with attention returning at once (for the attention share a). The gate of a plan copying a fraction f:
the patch saves at least 80 % of the time that the ceiling 1 / (1 - f a) says can be saved
(`sink_eval.evals.speed.gate_passes`), judged on the lower quartile of the paired ratios, so that a gate passes only
when three rounds in four clear it, not when the median happens to. Speed-ups, their IQR and the absolute medians (for
reference only) go to the benchmark's extra_info; `--benchmark-json baselines/bench/<file>.json` keeps a run.

- attention layers: the attention modules (projections, RoPE, attention, output) of layers 0-3, each fed the same
  real hidden states; f is exact over their 36 heads. Gated at 2048 and 8192 tokens for f >= 0.25.
- whole model: prefill (512, 2048; 8192 with f = 0.5 only, one round without warm-up: about 100 s a forward here)
  and decode steps over a KV cache of 512 / 2048 / 8192 tokens (random K/V: only its size matters for speed); decode's
  ceiling is 1 / (1 - f a - f_g g), f_g the fraction of KV groups a plan drops whole, whose cache stops growing, and
  g the growth share (`sink_eval.evals.speed`).
  Not gated on speed (the attention share of a whole model is too small here for the gate to rise above the
  noise): a speed-up must stay within its ceiling plus `NOISE` (more would mean the share or the timing is wrong),
  and the plan's decode cache must hold exactly the KV bytes the plan keeps.
"""

from __future__ import annotations

from contextlib import nullcontext

import pytest
import torch
from bench_regions import (
    DECODE_STEPS,
    assert_within_ceilings,
    attention_layers,
    decode,
    decode_references,
    prefill,
    real_ids,
)
from transformers import Cache

from sink_eval.core.shape import model_shape
from sink_eval.evals.speed import Paired, attention_share, ceiling, gate_passes, growth_share, paired, without_attention
from sink_eval.patches.base import kv_cache_bytes
from sink_eval.patches.copy import CopyPlan
from sink_eval.prompts.prompt_set import default_prompts

pytestmark = pytest.mark.bench

FRACTIONS = (0.0, 0.25, 0.5, 0.75, 1.0)
ATTENTION_LAYERS = 4
ROUNDS = 3
GATED_ROUNDS = 7  # the attention-layer gate's lower quartile needs more than three rounds


def forced_plan(layers: list[int], heads: int, fraction: float) -> CopyPlan:
    """Copy round(f * len(layers) * heads) heads, spread evenly over the layers (round-robin)."""
    total = round(fraction * len(layers) * heads)
    chosen: dict[int, list[int]] = {layer: [] for layer in layers}
    for k in range(total):
        layer = layers[k % len(layers)]
        chosen[layer].append(len(chosen[layer]))
    return CopyPlan.of(chosen)


def prompt_ids(tokenizer, tokens: int) -> torch.Tensor:
    """The default prompt set's prose, code and QA prompts, joined, cut to `tokens` tokens: [1, tokens]."""
    return real_ids(tokenizer, [p.text for p in default_prompts() if p.domain in ("prose", "code", "qa")], tokens)


def report(
    benchmark,
    what: str,
    tokens: int,
    fractions: dict[float, float],
    timings: dict[str, Paired],
    groups: dict[float, float] | None = None,
) -> dict:
    """Paired speed-up, attention share, ceiling and gate per plan; recorded in extra_info and printed. In decode,
    `groups` holds each plan's fraction of KV groups dropped whole, whose cache no longer grows, and the "static"
    timing gives the growth share g (`sink_eval.evals.speed`)."""
    share = attention_share(timings["without"])
    growth = growth_share(timings["without"], timings["static"]) if groups is not None else 0.0
    rows = {}
    for label, f in fractions.items():
        t = timings[f"f={label:g}"]
        c = ceiling(f, share, groups[label] if groups is not None else 0.0, growth)
        row = {
            "fraction": f,
            "speedup": t.speedup,
            "speedup_lower_quartile": t.lower_quartile,
            "speedup_iqr": t.iqr,
            "ceiling": c,
            "gate": gate_passes(t.lower_quartile, c),
            "unpatched_s": t.unpatched_s,
            "patched_s": t.variant_s,
        }
        rows[f"f={label:g}"] = row
        print(
            f"{what} {tokens:>5} tokens f={f:.3f}: {t.unpatched_s:.4f} s -> {t.variant_s:.4f} s, paired speed-up "
            f"{t.speedup:.2f} (IQR {t.iqr:.2f}, lower quartile {t.lower_quartile:.2f}; ceiling {c:.2f}, "
            f"a={share:.3f}, g={growth:.3f}) gate {'pass' if row['gate'] else 'FAIL'}"
        )
    benchmark.extra_info.update(
        {
            "what": what,
            "tokens": tokens,
            "attention_share": share,
            "growth_share": growth,
            "share_iqr": timings["without"].iqr,
            "plans": rows,
        }
    )
    return rows


@pytest.fixture(scope="module")
def smollm(sink_model):
    return sink_model("smollm2-135m")


@pytest.mark.parametrize("tokens", [512, 2048, 8192])
def test_attention_layer_speedup_saves_80_percent_of_its_ceiling(benchmark, smollm, tokens):
    model = smollm.model
    heads = model.config.num_attention_heads
    layers = list(range(ATTENTION_LAYERS))
    region = attention_layers(model, prompt_ids(smollm.tokenizer, tokens), layers)
    plans = {f: forced_plan(layers, heads, f) for f in FRACTIONS}
    variants = {"without": region(lambda: without_attention(model))}
    for f, plan in plans.items():
        variants[f"f={f:g}"] = region(lambda plan=plan: plan.patched(model))
    unpatched = region(nullcontext)
    timings = benchmark.pedantic(
        lambda: paired(unpatched, variants, GATED_ROUNDS, device=model.device), rounds=1, iterations=1
    )
    fractions = {f: plan.n_heads() / (len(layers) * heads) for f, plan in plans.items()}
    rows = report(benchmark, "attention layers", tokens, fractions, timings)
    if tokens >= 2048:
        failed = [label for label, row in rows.items() if row["fraction"] >= 0.25 and not row["gate"]]
        assert not failed, f"gates failed at {tokens} tokens (on the lower quartile of the paired ratios): {failed}"


@pytest.mark.parametrize(
    "tokens, fractions, rounds, warmup",
    [(512, FRACTIONS, 3, True), (2048, FRACTIONS, 1, True), (8192, (0.5,), 1, False)],
)
def test_whole_model_prefill_speedup_never_exceeds_its_ceiling(benchmark, smollm, tokens, fractions, rounds, warmup):
    model = smollm.model
    layers = list(range(model.config.num_hidden_layers))
    heads = model.config.num_attention_heads
    region = prefill(model, prompt_ids(smollm.tokenizer, tokens))
    plans = {f: forced_plan(layers, heads, f) for f in fractions}
    variants = {"without": region(lambda: without_attention(model))}
    for f, plan in plans.items():
        variants[f"f={f:g}"] = region(lambda plan=plan: plan.patched(model))
    unpatched = region(nullcontext)
    timings = benchmark.pedantic(
        lambda: paired(unpatched, variants, rounds, warmup, device=model.device), rounds=1, iterations=1
    )
    fractions = {f: p.n_heads() / (len(layers) * heads) for f, p in plans.items()}
    assert_within_ceilings(report(benchmark, "prefill", tokens, fractions, timings))


def planned_kv_bytes(model, plan: CopyPlan, positions: int) -> int:
    """The KV bytes a plan's cache holds after `positions` positions, from the plan alone: per layer, K and V of
    every KV group that some head still attends with, plus the first token's value of every KV group."""
    config = model.config
    group = config.num_attention_heads // config.num_key_value_heads
    row = config.head_dim * torch.finfo(model.dtype).bits // 8  # bytes of one head's vector at one position
    total = 0
    for layer in range(config.num_hidden_layers):
        copied = plan.heads.get(layer, frozenset())
        kept = {h // group for h in range(config.num_attention_heads) if h not in copied}
        total += 2 * len(kept) * positions * row + config.num_key_value_heads * row
    return total


@pytest.mark.parametrize("tokens", [512, 2048, 8192])
def test_whole_model_decode_speedup_with_its_ceiling(benchmark, smollm, tokens):
    model = smollm.model
    layers = list(range(model.config.num_hidden_layers))
    heads = model.config.num_attention_heads
    mask = torch.ones(1, tokens, dtype=torch.long)
    caches: dict[str, Cache] = {}
    region = decode(model, tokens, caches)
    unpatched, variants = decode_references(region, model, tokens)
    plans = {f: forced_plan(layers, heads, f) for f in FRACTIONS}
    for f, plan in plans.items():
        variants[f"f={f:g}"] = region(
            f"f={f:g}",
            lambda plan=plan: plan.new_cache(model, mask),
            lambda cache, plan=plan: plan.patched(model, cache),
        )
    timings = benchmark.pedantic(
        lambda: paired(unpatched, variants, ROUNDS, device=model.device), rounds=1, iterations=1
    )
    fractions = {f: p.n_heads() / (len(layers) * heads) for f, p in plans.items()}
    shape = model_shape(model)
    groups = {f: shape.n_whole_groups(p.heads) / (shape.layers * shape.kv_heads) for f, p in plans.items()}
    assert_within_ceilings(report(benchmark, "decode", tokens, fractions, timings, groups))
    kv_bytes = {f"f={f:g}": kv_cache_bytes(caches[f"f={f:g}"]) for f in plans}
    benchmark.extra_info["kv_bytes"] = kv_bytes | {"unpatched": kv_cache_bytes(caches["unpatched"])}
    positions = tokens + DECODE_STEPS
    assert kv_bytes == {f"f={f:g}": planned_kv_bytes(model, plan, positions) for f, plan in plans.items()}
