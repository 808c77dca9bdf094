"""The streaming plan's own promises: banded cost (no N x N scores), a constant-size cache of s + w entries per streamed
group, full-attention layers only. (What every plan kind promises, the reference included: `test_plans.py`.)"""

from __future__ import annotations

import pytest
import torch
from helpers import SHAPES, padded_batch, random_model
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from transformers import DynamicCache

from sink_eval.core.errors import SinkEvalError
from sink_eval.patches.base import kv_cache_bytes
from sink_eval.patches.streaming import banded
from sink_eval.patches.streaming.cache import StreamingCache, StreamingLayer
from sink_eval.patches.streaming.plan import StreamingPlan, streamed_share


def _plan(model, data, sink: int, window: int) -> StreamingPlan:
    heads = model.config.num_attention_heads
    chosen = {
        layer: data.draw(st.sets(st.integers(0, heads - 1)), label=f"layer {layer}")
        for layer in StreamingPlan.candidate_layers(model)
    }
    return StreamingPlan.of(chosen, sink, window)


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    shape=SHAPES,
    length=st.integers(1, 30),
    pads=st.lists(st.integers(0, 10), min_size=1, max_size=3),
    sink=st.integers(0, 4),
    extra=st.integers(0, 5),
    data=st.data(),
)
def test_a_window_covering_the_prompt_is_the_unpatched_model(shape, length, pads, sink, extra, data):
    """w >= N: every query's window covers its whole context."""
    model = random_model(*shape)
    plan = _plan(model, data, sink, length + extra)
    ids, mask = padded_batch(len(pads), length, pads, seed=length)
    with torch.no_grad():
        exact = model(input_ids=ids, attention_mask=mask).logits
        with plan.patched(model):
            out = model(input_ids=ids, attention_mask=mask).logits
    assert (out - exact)[mask.bool()].abs().max() <= 1e-6


def test_generate_inside_the_patch_with_transformers_own_cache_gives_the_same_tokens():
    model = random_model("llama", kv_heads=2, groups=2, head_dim=8, window=4)
    plan = StreamingPlan.of({0: [0, 1, 3], 1: [2, 3]}, sink=2, window=3)
    ids, mask = padded_batch(2, 9, [0, 3], seed=4)
    constant, _ = plan.generate(model, ids, mask, max_new_tokens=8)
    with torch.no_grad(), plan.patched(model):
        full = model.generate(
            input_ids=ids, attention_mask=mask, max_new_tokens=8, min_new_tokens=8, do_sample=False, pad_token_id=0
        )
    assert torch.equal(constant, full)


@settings(max_examples=15, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    length=st.integers(1, 20),
    steps=st.integers(1, 20),
    sink=st.integers(0, 4),
    window=st.integers(1, 8),
    pads=st.lists(st.integers(0, 6), min_size=1, max_size=2),
)
def test_a_streamed_group_holds_exactly_s_plus_w_entries_after_any_number_of_steps(length, steps, sink, window, pads):
    """Layer 0 streams KV group 0 whole (group 1 kept in full: a mixed layer); layer 1 streams one head of group 1,
    which keeps its full cache. KV bytes = 4 bytes x D x (K and V) x rows x held entries."""
    model = random_model("llama", kv_heads=2, groups=2, head_dim=8, window=4)
    plan = StreamingPlan.of({0: [0, 1], 1: [3]}, sink=sink, window=window)
    ids, mask = padded_batch(len(pads), length, pads, seed=steps)
    _, cache = plan.generate(model, ids, mask, max_new_tokens=steps)
    positions = length + steps - 1  # the last generated token is never fed back
    layer = cache.layers[0]
    assert isinstance(layer, StreamingLayer) and layer.step is None
    assert layer.stream_keys is not None and layer.stream_keys.shape[2] == sink + window
    assert layer.keys is not None and layer.keys.shape[1:3] == (1, positions)
    assert not isinstance(cache.layers[1], StreamingLayer)
    rows, row_bytes = len(pads), 2 * 8 * 4
    held = (sink + window) + positions + 2 * positions  # layer 0: streamed + kept group; layer 1: both groups
    assert kv_cache_bytes(cache) == rows * row_bytes * held


def test_streamed_heads_never_score_more_than_their_band(monkeypatch):
    """In a full pass over N = 300 tokens every SDPA call of a layer whose heads all stream sees at most
    s + BLOCK + w - 1 keys per query block: no N x N score matrix."""
    model = random_model("llama", kv_heads=1, groups=2, head_dim=8, window=4)
    plan = StreamingPlan.of({0: [0, 1], 1: [0, 1]}, sink=2, window=8)
    seen = []
    sdpa = torch.nn.functional.scaled_dot_product_attention

    def spy(query, key, value, **kwargs):
        seen.append(key.shape[-2])
        return sdpa(query, key, value, **kwargs)

    monkeypatch.setattr(banded.F, "scaled_dot_product_attention", spy)
    ids, mask = padded_batch(1, 300, [0], seed=0)
    with torch.no_grad(), plan.patched(model):
        model(input_ids=ids, attention_mask=mask)
    assert seen and max(seen) <= 2 + banded.BLOCK + 8 - 1


def test_only_full_attention_layers_are_candidates():
    assert StreamingPlan.candidate_layers(random_model("llama", 1, 2, 8, 4)) == [0, 1]
    gemma = random_model("gemma3", 1, 2, 8, 4)
    assert StreamingPlan.candidate_layers(gemma) == [1]
    with pytest.raises(SinkEvalError, match=r"layer 0 is a sliding-window layer.*full-attention layers \[1\]"):
        with StreamingPlan.of({0: [0]}).patched(gemma):
            pass


def test_the_constant_cache_is_used_only_inside_its_own_patch():
    model = random_model("llama", kv_heads=2, groups=2, head_dim=8, window=4)
    plan = StreamingPlan.of({0: [0, 1]}, sink=1, window=2)
    ids, mask = padded_batch(1, 6, [0], seed=1)
    cache = plan.new_cache(model, mask)
    with torch.no_grad(), pytest.raises(SinkEvalError, match="updated only inside"):
        model(input_ids=ids, attention_mask=mask, cache=cache)
    with pytest.raises(SinkEvalError, match="made for another plan"), StreamingPlan.of({1: [0]}).patched(model, cache):
        pass


def test_the_constant_cache_needs_left_padding():
    model = random_model("llama", kv_heads=1, groups=2, head_dim=8, window=4)
    mask = torch.tensor([[1, 1, 0]])
    with pytest.raises(SinkEvalError, match="need left padding"):
        StreamingCache(model, StreamingPlan.of({0: [0, 1]}), mask)


def test_the_streamed_share_counts_scored_pairs_in_a_full_pass_and_keys_read_in_a_decode_step():
    assert streamed_share(5, 1, 4, decode=False) == 1.0 == streamed_share(5, 1, 4, decode=True)
    assert streamed_share(6, 1, 4, decode=False) == (15 + 5) / 21  # queries 0..4 score all, query 5 scores 5 of 6
    assert streamed_share(8192, 4, 256, decode=True) == 260 / 8192
    assert streamed_share(8192, 4, 256, decode=False) == pytest.approx(2 * 260 / 8192, rel=0.02)


@settings(max_examples=60, deadline=None)
@given(
    n=st.integers(1, 200),
    sink=st.integers(0, 5),
    window=st.integers(1, 80),
    block=st.sampled_from([1, 3, 8, 64]),
    kv_heads=st.integers(1, 2),
    groups=st.integers(1, 3),
    firsts=st.lists(st.integers(0, 40), min_size=1, max_size=3),
)
def test_the_banded_kernel_equals_sdpa_under_the_explicit_mask(n, sink, window, block, kv_heads, groups, firsts):
    """Any block size, band longer or shorter than N, rows with different first real tokens (finite everywhere)."""
    gen = torch.Generator().manual_seed(n)
    heads = kv_heads * groups
    first = torch.tensor([min(f, n - 1) for f in firsts])
    query = torch.randn(len(firsts), heads, n, 8, generator=gen)
    key, value = (torch.randn(len(firsts), kv_heads, n, 8, generator=gen) for _ in range(2))
    layout = banded.band_layout(n, first, sink, window, query.dtype, block)
    out = banded.banded_attention(query, key, value, layout, None)
    i, j = torch.arange(n).view(-1, 1), torch.arange(n).view(1, -1)
    f = first.view(-1, 1, 1, 1)
    keep = (j >= f) & (j <= i) & ((j - f < sink) | (j > i - window))
    keep = keep | ((i < f) & (j == i))  # a padding query sees itself
    exact = torch.nn.functional.scaled_dot_product_attention(
        query, key.repeat_interleave(groups, 1), value.repeat_interleave(groups, 1), attn_mask=keep
    ).transpose(1, 2)
    assert torch.isfinite(out).all() and (out - exact).abs().max() <= 1e-6


STEP_TOKEN = 5  # the id fed at every decode step


def _decode_logits(model, plan: StreamingPlan, ids, mask, steps: int, constant: bool) -> torch.Tensor:
    """Next-token logits (steps, B, V) of `steps` decode steps (each feeding STEP_TOKEN) after the prompt, under the
    plan: into its constant-size cache where `constant`, else into transformers' own."""
    cache = plan.new_cache(model, mask) if constant else DynamicCache(config=model.config)
    token = torch.full((ids.shape[0], 1), STEP_TOKEN)
    out = []
    with torch.no_grad(), plan.patched(model, cache if constant else None):
        model(input_ids=ids, attention_mask=mask, cache=cache)
        for _ in range(steps):
            mask = torch.cat([mask, torch.ones_like(token)], dim=1)
            out.append(model(input_ids=token, attention_mask=mask, cache=cache).logits[:, -1])
    return torch.stack(out)


def _reference_logits(model, plan: StreamingPlan, ids, mask, steps: int) -> torch.Tensor:
    """The same logits (steps, B, V) from the plan's reference, recomputed over the whole sequence at every step."""
    token = torch.full((ids.shape[0], 1), STEP_TOKEN)
    out = []
    with torch.no_grad(), plan.reference(model):
        for _ in range(steps):
            ids, mask = torch.cat([ids, token], dim=1), torch.cat([mask, torch.ones_like(token)], dim=1)
            out.append(model(input_ids=ids, attention_mask=mask, use_cache=False).logits[:, -1])
    return torch.stack(out)


@pytest.mark.parametrize("constant", [True, False], ids=["constant cache", "transformers cache"])
@settings(max_examples=20, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    shape=SHAPES,
    length=st.integers(1, 16),
    steps=st.integers(1, 12),
    pads=st.lists(st.integers(0, 6), min_size=1, max_size=3),
    sink=st.integers(0, 3),
    window=st.integers(1, 8),
    data=st.data(),
)
def test_a_decode_step_equals_the_masked_reference(constant, shape, length, steps, pads, sink, window, data):
    """One SDPA call per key set with a mask row per head (partly streamed groups, mixed layers, left padding, a
    ring not yet full or wrapped): each step's logits within 1e-5 of the reference's."""
    model = random_model(*shape)
    plan = _plan(model, data, sink, window)
    ids, mask = padded_batch(len(pads), length, pads, seed=length)
    fast = _decode_logits(model, plan, ids, mask, steps, constant)
    assert (fast - _reference_logits(model, plan, ids, mask, steps)).abs().max() <= 1e-5


def test_one_patch_serves_decode_steps_of_different_batch_sizes():
    """A patch keeps one step's decode mask rows for its other layers; a pass with another batch size at the same
    length (no padding: no mask at all) must not reuse them. Two batches decoded inside one `patched` block, each
    against its reference."""
    model = random_model("llama", kv_heads=3, groups=2, head_dim=8, window=4)
    plan = StreamingPlan.of({0: [0, 2, 3], 1: [4, 5]}, sink=1, window=3)
    batches = [padded_batch(rows, 9, [0] * rows, seed=rows) for rows in (2, 3)]
    token = torch.full((1, 1), STEP_TOKEN)
    with torch.no_grad(), plan.patched(model):
        fast = []
        for ids, _ in batches:
            cache = DynamicCache(config=model.config)
            model(input_ids=ids, cache=cache)
            fast.append(model(input_ids=token.expand(len(ids), 1), cache=cache).logits[:, -1].unsqueeze(0))
    for (ids, mask), logits in zip(batches, fast, strict=True):
        assert (logits - _reference_logits(model, plan, ids, mask, 1)).abs().max() <= 1e-5
