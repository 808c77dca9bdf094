"""The timed regions of the speed gates (`tests/bench`), shared by the copy and the streaming patch's gates.

Each builder takes what the region runs on and returns `region(context)`, a function of no arguments that runs the
region once under `context` (a patch, `sink_eval.evals.speed.without_attention`, or nothing): what
`sink_eval.evals.speed.paired` times. Real models only for speed, never for a fidelity figure.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from contextlib import AbstractContextManager, nullcontext

import torch
from transformers import Cache, DynamicCache

from sink_eval.evals.speed import clock, growth_free_cache, without_attention
from sink_eval.patches.streaming.cache import StreamingCache, StreamingLayer

NOISE = 0.15  # how far a measured speed-up may exceed its ceiling before the measurement is called wrong
DECODE_STEPS = 8

Context = Callable[[], AbstractContextManager]
CacheContext = Callable[[Cache], AbstractContextManager]


def real_ids(tokenizer, texts: Sequence[str], tokens: int) -> torch.Tensor:
    """`texts` joined by blank lines, tokenised and cut to `tokens` tokens: [1, tokens]."""
    ids = tokenizer("\n\n".join(texts))["input_ids"]
    assert len(ids) >= tokens, f"the texts give {len(ids)} tokens, fewer than {tokens}"
    return torch.tensor([ids[:tokens]])


def attention_layers(model, ids: torch.Tensor, layers: list[int]) -> Callable[[Context], Callable[[], None]]:
    """The attention modules (projections, RoPE, attention, output) of `layers`, each fed the same real hidden states
    of `ids` [1, N] (the embeddings after the layer's input norm)."""
    with torch.no_grad():
        hidden = model.model.embed_tokens(ids)  # [1, N, hidden]
        position_embeddings = model.model.rotary_emb(hidden, position_ids=torch.arange(ids.shape[1])[None])
        inputs = [model.model.layers[layer].input_layernorm(hidden) for layer in layers]

    def region(context: Context) -> Callable[[], None]:
        def run() -> None:
            with torch.no_grad(), context():
                for layer, x in zip(layers, inputs, strict=True):
                    model.model.layers[layer].self_attn(x, position_embeddings=position_embeddings)

        return run

    return region


def prefill(model, ids: torch.Tensor) -> Callable[[Context], Callable[[], None]]:
    """One forward of the whole model over `ids` [1, N] without a cache, the last position's logits only."""

    def region(context: Context) -> Callable[[], None]:
        def run() -> None:
            with torch.no_grad(), context():
                model(input_ids=ids, use_cache=False, logits_to_keep=1)

        return run

    return region


def filled(cache: Cache, model, tokens: int, batch: int = 1) -> Cache:
    """`cache` holding `tokens` positions of `batch` rows of seeded random keys and values in every layer (only its
    size matters for speed)."""
    config = model.config
    gen = torch.Generator().manual_seed(0)
    with cache.in_use() if isinstance(cache, StreamingCache) else nullcontext():
        for layer in range(config.num_hidden_layers):
            shape = (batch, config.num_key_value_heads, tokens, config.head_dim)
            cache.update(torch.randn(shape, generator=gen), torch.randn(shape, generator=gen), layer)
            if isinstance(cache.layers[layer], StreamingLayer):
                cache.layers[layer].release_step()
    return cache


def decode(
    model, tokens: int, caches: dict[str, Cache], batch: int = 1
) -> Callable[[str, Callable[[], Cache], CacheContext], Callable[[], float]]:
    """`region(name, make_cache, context)`: `DECODE_STEPS` greedy decode steps of the whole model, `batch` rows, over
    a fresh `make_cache()` filled with `tokens` positions, under `context(cache)`; it returns the seconds per step,
    timed around the steps alone, and leaves its cache in `caches[name]` (for the KV bytes)."""

    def region(name: str, make_cache: Callable[[], Cache], context: CacheContext) -> Callable[[], float]:
        def run() -> float:
            cache = caches[name] = filled(make_cache(), model, tokens, batch)
            token = torch.ones(batch, 1, dtype=torch.long)
            with torch.no_grad(), context(cache):
                start = clock(model.device)
                for _ in range(DECODE_STEPS):
                    token = model(input_ids=token, cache=cache, logits_to_keep=1).logits.argmax(-1)
                return (clock(model.device) - start) / DECODE_STEPS

        return run

    return region


def decode_references(
    region: Callable[[str, Callable[[], Cache], CacheContext], Callable[[], float]], model, tokens: int
) -> tuple[Callable[[], float], dict[str, Callable[[], float]]]:
    """Of a `decode` region: the unpatched region, and the two that every decode gate times beside its plans:
    "without" (attention returns at once: the attention share) and "static" (that, over a preallocated cache: the
    growth share)."""

    def plain() -> DynamicCache:
        return DynamicCache(config=model.config)

    references = {
        "without": region("without", plain, lambda cache: without_attention(model)),
        "static": region(
            "static", lambda: growth_free_cache(model, tokens + DECODE_STEPS), lambda cache: without_attention(model)
        ),
    }
    return region("unpatched", plain, lambda cache: nullcontext()), references


def assert_within_ceilings(rows: dict[str, dict]) -> None:
    """No plan's speed-up above its ceiling by more than `NOISE` (that would mean the share or the timing is
    wrong)."""
    above = {
        label: (row["speedup"], row["ceiling"])
        for label, row in rows.items()
        if row["speedup"] > row["ceiling"] * (1 + NOISE)
    }
    assert not above, f"speed-ups above their ceiling + {NOISE:.0%} (speed-up, ceiling): {above}"
