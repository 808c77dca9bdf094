"""Speed and memory gates of the streaming patch on smollm2-135m: half the KV groups streaming, s = 4, w = 256.

As in `test_patch_speed.py`, each variant is timed right after the unpatched region, round by round
(`sink_eval.evals.speed.paired`), and the attention share a comes from the region with attention returning at once. The
plan streams half of the KV groups whole (every query head of a chosen group), spread evenly over the layers, so
that half the heads stream and half the cache shrinks to s + w entries. Its ceiling is 1 / (1 − a f (1 − ρ)): f the
fraction of heads streamed, ρ the share of a head's attention work a streamed head still does
(`sink_eval.patches.streaming.plan.streamed_share`: scored pairs Σ min(i + 1, s + w) / Σ (i + 1) in a full pass, keys
read (s + w) / N in a decode step). The ceiling with ρ = (s + w) / N in a full pass as well (each query scoring N keys)
is recorded beside it as `ceiling_all_keys`.

- attention layers: the attention modules of layers 0-3, fed the same real hidden states, at 2048 and 8192 tokens;
  gated at 8192 (a streamed head's band is 260 of 8192 keys): the patch saves at least 80 % of what the ceiling
  allows, judged on the lower quartile of the paired ratios (`sink_eval.evals.speed.gate_passes`).
- whole model, prefill and decode (a cache of 2048 / 8192 random keys and values, then `DECODE_STEPS` greedy steps),
  reported with their ceilings; a speed-up must stay within its ceiling plus `NOISE`. In decode, a streamed group
  saves attention *and* the growth of its cache: transformers' `DynamicCache` appends each step's key and value by
  concatenation, copying the whole cache (at 8192 tokens, 377 MB a step on smollm2-135m), where the constant-size
  cache writes one slot. So decode's ceiling is 1 / (1 − a f (1 − ρ) − g f_g), g the growth share measured with a
  preallocated cache (`sink_eval.evals.speed.growth_share`) and f_g the fraction of KV groups streamed whole (here f_g =
  f). With attention alone the ceiling (1.17) was below the measured speed-up (1.36). Decode is gated on memory at
  8192: the constant-size cache holds at most 55 % of the unpatched cache's KV bytes, both measured from the cache
  objects (`sink_eval.patches.base.kv_cache_bytes`), and exactly what the plan keeps.
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
from sink_eval.patches.streaming.plan import StreamingPlan, streamed_share
from sink_eval.prompts.prompt_set import long_passages

pytestmark = pytest.mark.bench

SINK, WINDOW = 4, 256
FRACTION = 0.5  # of the KV groups, streamed whole
ATTENTION_LAYERS = 4
GATED_ROUNDS = 15  # the gate reads the lower quartile; with 7 rounds it moved from 1.47 to 1.37 between two runs
ROUNDS = 3
KV_GATE = 0.55  # the constant-size cache's KV bytes against the unpatched cache's, at 8192 tokens


def half_groups_plan(layers: list[int], kv_heads: int, group_size: int, fraction: float = FRACTION) -> StreamingPlan:
    """Stream round(f * len(layers) * kv_heads) KV groups whole, spread evenly over the layers (round-robin)."""
    chosen: dict[int, list[int]] = {layer: [] for layer in layers}
    for k in range(round(fraction * len(layers) * kv_heads)):
        layer = layers[k % len(layers)]
        group = len(chosen[layer]) // group_size
        chosen[layer] += [group * group_size + i for i in range(group_size)]
    return StreamingPlan.of(chosen, SINK, WINDOW)


def passage_ids(tokenizer, tokens: int) -> torch.Tensor:
    """Real text: the long passages, joined, cut to `tokens` tokens: [1, tokens]."""
    return real_ids(tokenizer, [p.text for p in long_passages()], tokens)


def report(
    benchmark, what: str, tokens: int, fraction: float, rho: float, timings: dict[str, Paired], gated: bool = False
) -> dict:
    """Paired speed-up, attention share (and, with a "static" timing, growth share), ceilings and whether it saves 80 %
    of what its ceiling allows (the gate where `gated`, else reported only); recorded in extra_info and printed."""
    share = attention_share(timings["without"])
    growth = growth_share(timings["without"], timings["static"]) if "static" in timings else 0.0
    t = timings["streaming"]
    c = ceiling(fraction * (1 - rho), share, fraction, growth)
    row = {
        "fraction": fraction,
        "streamed_share": rho,
        "speedup": t.speedup,
        "speedup_lower_quartile": t.lower_quartile,
        "speedup_iqr": t.iqr,
        "ceiling": c,
        "ceiling_all_keys": ceiling(fraction * (1 - (SINK + WINDOW) / tokens), share, fraction, growth),
        "growth_share": growth,
        "gated": gated,
        "gate": gate_passes(t.lower_quartile, c),
        "unpatched_s": t.unpatched_s,
        "patched_s": t.variant_s,
        "ratios": t.ratios,
    }
    print(
        f"{what} {tokens:>5} tokens streaming f={fraction:.3f} rho={rho:.4f}: {t.unpatched_s:.4f} s -> "
        f"{t.variant_s:.4f} s, paired speed-up {t.speedup:.2f} (IQR {t.iqr:.2f}, lower quartile "
        f"{t.lower_quartile:.2f}; ceiling {c:.2f}, all-keys ceiling {row['ceiling_all_keys']:.2f}, a={share:.3f}, "
        f"g={growth:.3f}) "
        + (
            f"gate {'pass' if row['gate'] else 'FAIL'}"
            if gated
            else f"80 % of ceiling: {'yes' if row['gate'] else 'no'}"
        )
    )
    benchmark.extra_info.update(
        {"what": what, "tokens": tokens, "sink": SINK, "window": WINDOW, "attention_share": share, "plan": row}
    )
    return row


@pytest.fixture(scope="module")
def smollm(sink_model):
    return sink_model("smollm2-135m")


@pytest.mark.parametrize("tokens", [2048, 8192])
def test_attention_layer_streaming_speedup_saves_80_percent_of_its_ceiling(benchmark, smollm, tokens):
    model = smollm.model
    shape = model_shape(model)
    layers = list(range(ATTENTION_LAYERS))
    region = attention_layers(model, passage_ids(smollm.tokenizer, tokens), layers)
    plan = half_groups_plan(layers, shape.kv_heads, shape.group_size)
    variants = {"without": region(lambda: without_attention(model)), "streaming": region(lambda: plan.patched(model))}
    timings = benchmark.pedantic(
        lambda: paired(region(nullcontext), variants, GATED_ROUNDS, device=model.device),
        rounds=1,
        iterations=1,
    )
    fraction = plan.n_heads() / (len(layers) * shape.heads)
    rho = streamed_share(tokens, SINK, WINDOW, False)
    row = report(benchmark, "attention layers", tokens, fraction, rho, timings, gated=tokens == 8192)
    if tokens == 8192:
        assert row["gate"], f"gate failed at {tokens} tokens (on the lower quartile of the paired ratios): {row}"


@pytest.mark.parametrize("tokens, rounds, warmup", [(2048, 3, True), (8192, 3, False)])
def test_whole_model_streaming_prefill_never_exceeds_its_ceiling(benchmark, smollm, tokens, rounds, warmup):
    """8192 tokens: no warm-up (about 40 s a forward here); one round proved too noisy to hold its ceiling (patched
    25-33 s over two runs)."""
    model = smollm.model
    shape = model_shape(model)
    region = prefill(model, passage_ids(smollm.tokenizer, tokens))
    plan = half_groups_plan(list(range(shape.layers)), shape.kv_heads, shape.group_size)
    variants = {"without": region(lambda: without_attention(model)), "streaming": region(lambda: plan.patched(model))}
    timings = benchmark.pedantic(
        lambda: paired(region(nullcontext), variants, rounds, warmup, device=model.device), rounds=1, iterations=1
    )
    fraction = plan.fraction(shape.layers, shape.heads)
    row = report(benchmark, "prefill", tokens, fraction, streamed_share(tokens, SINK, WINDOW, False), timings)
    assert_within_ceilings({"streaming": row})


def planned_kv_bytes(model, plan: StreamingPlan, positions: int) -> int:
    """The KV bytes the plan's cache holds after `positions` positions, from the plan alone: per layer, K and V of
    `positions` entries for every kept KV group and s + w for every streamed group."""
    shape = model_shape(model)
    row = model.config.head_dim * torch.finfo(model.dtype).bits // 8
    streamed = plan.whole_groups(shape)
    total = 0
    for layer in range(shape.layers):
        n = len(streamed.get(layer, ()))
        total += 2 * row * ((shape.kv_heads - n) * positions + n * (plan.sink + plan.window))
    return total


@pytest.mark.parametrize("tokens", [2048, 8192])
def test_whole_model_streaming_decode_with_its_ceiling_and_constant_cache(benchmark, smollm, tokens):
    model = smollm.model
    shape = model_shape(model)
    mask = torch.ones(1, tokens, dtype=torch.long)
    plan = half_groups_plan(list(range(shape.layers)), shape.kv_heads, shape.group_size)
    caches: dict[str, Cache] = {}
    region = decode(model, tokens, caches)
    unpatched, variants = decode_references(region, model, tokens)
    variants["streaming"] = region(
        "streaming", lambda: plan.new_cache(model, mask), lambda cache: plan.patched(model, cache)
    )
    timings = benchmark.pedantic(
        lambda: paired(unpatched, variants, ROUNDS, device=model.device), rounds=1, iterations=1
    )
    fraction = plan.fraction(shape.layers, shape.heads)
    context = tokens + DECODE_STEPS // 2  # the mean cache length over the timed steps
    row = report(benchmark, "decode", tokens, fraction, streamed_share(context, SINK, WINDOW, True), timings)
    assert_within_ceilings({"streaming": row})
    held, full = kv_cache_bytes(caches["streaming"]), kv_cache_bytes(caches["unpatched"])
    benchmark.extra_info["kv_bytes"] = {"streaming": held, "unpatched": full, "ratio": held / full}
    print(f"decode {tokens:>5} tokens: KV bytes {held} of {full} unpatched ({held / full:.1%})")
    positions = tokens + DECODE_STEPS
    assert held == planned_kv_bytes(model, plan, positions)
    if tokens == 8192:
        assert held <= KV_GATE * full, f"the constant-size cache holds {held / full:.1%} of the unpatched KV bytes"
