"""Speed gates of the copy patch on smollm2-135m: forced plans copying a fraction f of the heads.

Each test times, round by round, each variant right after the unpatched region (`sink_eval.speed.paired`: the
speed-up is the median of those back-to-back ratios): the region patched with each plan, and the region with
attention returning at once (for the attention share a). The gate of a plan copying a fraction f:
the patch saves at least 80 % of the time that the ceiling 1 / (1 - f a) says can be saved
(`sink_eval.speed.gate_passes`). Absolute medians go to the benchmark's extra_info, for reference only;
`--benchmark-json baselines/bench/<file>.json` keeps a run.

- attention layers: the attention modules (projections, RoPE, attention, output) of layers 0-3, each fed the same
  real hidden states; f is exact over their 36 heads. Gated at 2048 and 8192 tokens for f >= 0.25, and f = 0.5 must
  be at least 1.6x faster at 8192 tokens.
- whole model: prefill (512, 2048; 8192 with f = 0.5 only, one round without warm-up: about 100 s a forward here)
  and decode steps over a KV cache of 512 / 2048 / 8192 tokens (random K/V: only its size matters for speed).
  Reported with their ceilings, not gated.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from contextlib import nullcontext

import pytest
import torch
from transformers import DynamicCache

from sink_eval.patch import CopyPlan, new_cache, patched
from sink_eval.prompts import default_prompts
from sink_eval.speed import Paired, ceiling, gate_passes, paired, without_attention

pytestmark = pytest.mark.bench

FRACTIONS = (0.0, 0.25, 0.5, 0.75, 1.0)
ATTENTION_LAYERS = 4
ROUNDS = 3
DECODE_STEPS = 8


def forced_plan(layers: list[int], heads: int, fraction: float) -> CopyPlan:
    """Copy round(f * len(layers) * heads) heads, spread evenly over the layers (round-robin)."""
    total = round(fraction * len(layers) * heads)
    chosen: dict[int, list[int]] = {layer: [] for layer in layers}
    for k in range(total):
        layer = layers[k % len(layers)]
        chosen[layer].append(len(chosen[layer]))
    return CopyPlan.of(chosen)


def real_ids(tokenizer, tokens: int) -> torch.Tensor:
    text = "\n\n".join(p.text for p in default_prompts() if p.domain in ("prose", "code", "qa"))
    ids = tokenizer(text)["input_ids"]
    assert len(ids) >= tokens, f"the default prompt set gives {len(ids)} tokens, fewer than {tokens}"
    return torch.tensor([ids[:tokens]])


def report(benchmark, what: str, tokens: int, fractions: dict[float, float], timings: dict[str, Paired]) -> dict:
    """Paired speed-up, attention share, ceiling and gate per plan; recorded in extra_info and printed."""
    share = max(0.0, 1 - 1 / timings["without"].speedup)
    rows = {}
    for label, f in fractions.items():
        t = timings[f"f={label:g}"]
        c = ceiling(f, share)
        row = {
            "fraction": f,
            "speedup": t.speedup,
            "ceiling": c,
            "gate": gate_passes(t.speedup, c),
            "unpatched_s": t.unpatched_s,
            "patched_s": t.variant_s,
        }
        rows[f"f={label:g}"] = row
        print(
            f"{what} {tokens:>5} tokens f={f:.3f}: {t.unpatched_s:.4f} s -> {t.variant_s:.4f} s, paired speed-up "
            f"{t.speedup:.2f} (ceiling {c:.2f}, a={share:.3f}) gate {'pass' if row['gate'] else 'FAIL'}"
        )
    benchmark.extra_info.update({"what": what, "tokens": tokens, "attention_share": share, "plans": rows})
    return rows


@pytest.fixture(scope="module")
def smollm(bundled_model):
    return bundled_model("smollm2-135m")


@pytest.mark.parametrize("tokens", [512, 2048, 8192])
def test_attention_layer_speedup_saves_80_percent_of_its_ceiling(benchmark, smollm, tokens):
    model = smollm.model
    heads = model.config.num_attention_heads
    layers = list(range(ATTENTION_LAYERS))
    ids = real_ids(smollm.tokenizer, tokens)
    with torch.no_grad():
        hidden = model.model.embed_tokens(ids)
        position_embeddings = model.model.rotary_emb(hidden, position_ids=torch.arange(tokens)[None])
        inputs = [model.model.layers[layer].input_layernorm(hidden) for layer in layers]

    def attention_layers(context) -> Callable[[], None]:
        def run() -> None:
            with torch.no_grad(), context():
                for layer, x in zip(layers, inputs, strict=True):
                    model.model.layers[layer].self_attn(x, position_embeddings=position_embeddings)

        return run

    plans = {f: forced_plan(layers, heads, f) for f in FRACTIONS}
    variants = {"without": attention_layers(lambda: without_attention(model))}
    for f, plan in plans.items():
        variants[f"f={f:g}"] = attention_layers(lambda plan=plan: patched(model, plan))
    unpatched = attention_layers(nullcontext)
    timings = benchmark.pedantic(lambda: paired(unpatched, variants, ROUNDS), rounds=1, iterations=1)
    fractions = {f: plan.n_copied() / (len(layers) * heads) for f, plan in plans.items()}
    rows = report(benchmark, "attention layers", tokens, fractions, timings)
    if tokens >= 2048:
        failed = [label for label, row in rows.items() if row["fraction"] >= 0.25 and not row["gate"]]
        assert not failed, f"gates failed at {tokens} tokens: {failed}"
    if tokens == 8192:
        assert rows["f=0.5"]["speedup"] >= 1.6


@pytest.mark.parametrize(
    "tokens, fractions, rounds, warmup",
    [(512, FRACTIONS, 3, True), (2048, FRACTIONS, 1, True), (8192, (0.5,), 1, False)],
)
def test_whole_model_prefill_speedup_with_its_ceiling(benchmark, smollm, tokens, fractions, rounds, warmup):
    model = smollm.model
    layers = list(range(model.config.num_hidden_layers))
    heads = model.config.num_attention_heads
    ids = real_ids(smollm.tokenizer, tokens)

    def prefill(context) -> Callable[[], None]:
        def run() -> None:
            with torch.no_grad(), context():
                model(input_ids=ids, use_cache=False, logits_to_keep=1)

        return run

    plans = {f: forced_plan(layers, heads, f) for f in fractions}
    variants = {"without": prefill(lambda: without_attention(model))}
    for f, plan in plans.items():
        variants[f"f={f:g}"] = prefill(lambda plan=plan: patched(model, plan))
    unpatched = prefill(nullcontext)
    timings = benchmark.pedantic(lambda: paired(unpatched, variants, rounds, warmup), rounds=1, iterations=1)
    report(benchmark, "prefill", tokens, {f: p.n_copied() / (len(layers) * heads) for f, p in plans.items()}, timings)


def _filled(cache: DynamicCache, model, tokens: int) -> DynamicCache:
    """`cache` holding `tokens` positions of random keys and values in every layer."""
    config = model.config
    gen = torch.Generator().manual_seed(0)
    for layer in range(config.num_hidden_layers):
        shape = (1, config.num_key_value_heads, tokens, config.head_dim)
        cache.update(torch.randn(shape, generator=gen), torch.randn(shape, generator=gen), layer)
    return cache


@pytest.mark.parametrize("tokens", [512, 2048, 8192])
def test_whole_model_decode_speedup_with_its_ceiling(benchmark, smollm, tokens):
    model = smollm.model
    layers = list(range(model.config.num_hidden_layers))
    heads = model.config.num_attention_heads
    mask = torch.ones(1, tokens, dtype=torch.long)

    def decode(make_cache, context) -> Callable[[], float]:
        def run() -> float:
            cache = _filled(make_cache(), model, tokens)
            token = torch.tensor([[1]])
            with torch.no_grad(), context(cache):
                start = time.perf_counter()
                for _ in range(DECODE_STEPS):
                    token = model(input_ids=token, past_key_values=cache, logits_to_keep=1).logits.argmax(-1)
                return (time.perf_counter() - start) / DECODE_STEPS

        return run

    def plain() -> DynamicCache:
        return DynamicCache(config=model.config)

    plans = {f: forced_plan(layers, heads, f) for f in FRACTIONS}
    variants = {"without": decode(plain, lambda cache: without_attention(model))}
    for f, plan in plans.items():
        variants[f"f={f:g}"] = decode(
            lambda plan=plan: new_cache(model, plan, mask), lambda cache, plan=plan: patched(model, plan, cache)
        )
    unpatched = decode(plain, lambda cache: nullcontext())
    timings = benchmark.pedantic(lambda: paired(unpatched, variants, ROUNDS), rounds=1, iterations=1)
    report(benchmark, "decode", tokens, {f: p.n_copied() / (len(layers) * heads) for f, p in plans.items()}, timings)
