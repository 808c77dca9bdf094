"""The streaming patch: the model under an explicit sink + window mask, at banded cost, with a constant-size cache."""

from __future__ import annotations

import pytest
import torch
from helpers import random_model
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from transformers.masking_utils import sdpa_mask

from sink_eval.core import attention
from sink_eval.core.errors import SinkEvalError
from sink_eval.core.shape import Shape
from sink_eval.patches.copy import CopyPlan, kv_cache_bytes
from sink_eval.patches.copy import patched as copy_patched
from sink_eval.patches.plans import streamed_share, work_removed
from sink_eval.patches.streaming import banded
from sink_eval.patches.streaming.cache import StreamingCache, StreamingLayer
from sink_eval.patches.streaming.patch import STREAM_ATTENTION, generate, layer_errors, new_cache, patched
from sink_eval.patches.streaming.plan import StreamingPlan, candidate_layers

SHAPES = st.tuples(
    st.sampled_from(["llama", "qwen2", "gemma3"]),
    st.integers(1, 3),  # KV heads
    st.integers(1, 3),  # query heads per KV head
    st.sampled_from([4, 8]),  # head dim
    st.integers(2, 12),  # sliding window (gemma3's first layer)
)
REFERENCE = "test_sink_window_eager"


def _batch(rows: int, length: int, pads: list[int], seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    ids = torch.randint(1, 64, (rows, length), generator=gen)
    mask = torch.ones_like(ids)
    for row, pad in enumerate(pads):
        mask[row, : min(pad, length - 1)] = 0
    return ids, mask


def _plan(model, data, sink: int, window: int) -> StreamingPlan:
    heads = model.config.num_attention_heads
    chosen = {
        layer: data.draw(st.sets(st.integers(0, heads - 1)), label=f"layer {layer}")
        for layer in candidate_layers(model)
    }
    return StreamingPlan.of(chosen, sink, window)


def reference(model, plan: StreamingPlan, attention_mask: torch.Tensor):
    """Context manager: `model` with eager attention (softmax(QK^T / sqrt(d) + M) V, every key scored) whose mask M is
    transformers' own (causal, padding, sliding window) and, on the plan's heads, also blocks every key outside
    [first, first + s) ∪ (i − w, i]; `attention_mask` (B, N) is the 2D mask of the full pass."""
    first = attention_mask.long().argmax(dim=-1)

    def eager(module, query, key, value, mask, dropout=0.0, scaling=None, **kwargs):
        batch, heads, t_len, dim = query.shape
        s_len = key.shape[2]
        groups = heads // key.shape[1]
        key, value = key.repeat_interleave(groups, 1), value.repeat_interleave(groups, 1)
        i = torch.arange(s_len - t_len, s_len).view(1, 1, -1, 1)
        j = torch.arange(s_len).view(1, 1, 1, -1)
        keep = (j <= i) if mask is None else mask
        keep = keep.expand(batch, heads, t_len, s_len).clone()
        planned = sorted(plan.heads.get(module.layer_idx, ()))
        inside = ((j - first.view(-1, 1, 1, 1)) < plan.sink) | (j > i - plan.window)
        keep[:, planned] &= inside.expand(batch, 1, t_len, s_len)
        scores = query @ key.transpose(-1, -2) * (dim**-0.5 if scaling is None else scaling)
        scores = scores.masked_fill(~keep, torch.finfo(scores.dtype).min)
        return (torch.softmax(scores, dim=-1) @ value).transpose(1, 2), None

    return attention.use(model, REFERENCE, eager, sdpa_mask)


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
    ids, mask = _batch(len(pads), length, pads, seed=length)
    with torch.no_grad():
        exact = model(input_ids=ids, attention_mask=mask).logits
        with patched(model, plan):
            out = model(input_ids=ids, attention_mask=mask).logits
    assert (out - exact)[mask.bool()].abs().max() <= 1e-6


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    shape=SHAPES,
    length=st.integers(2, 90),
    pads=st.lists(st.integers(0, 10), min_size=1, max_size=3),
    sink=st.integers(0, 4),
    window=st.integers(1, 12),
    data=st.data(),
)
def test_the_patch_equals_the_model_under_an_explicit_sink_window_mask(shape, length, pads, sink, window, data):
    """Up to 90 tokens: more than one block of the banded kernel (`banded.BLOCK` = 64 queries)."""
    model = random_model(*shape)
    plan = _plan(model, data, sink, window)
    ids, mask = _batch(len(pads), length, pads, seed=length)
    with torch.no_grad():
        with reference(model, plan, mask):
            expected = model(input_ids=ids, attention_mask=mask).logits
        with patched(model, plan):
            out = model(input_ids=ids, attention_mask=mask).logits
    assert (out - expected)[mask.bool()].abs().max() <= 1e-6


def _manual_greedy(model, plan: StreamingPlan, ids, mask, steps: int) -> torch.Tensor:
    """Greedy decode by full recomputation under the reference mask at every step (no cache at all)."""
    eos = model.generation_config.eos_token_id
    tokens, step_mask = ids, mask
    with torch.no_grad():
        for _ in range(steps):
            with reference(model, plan, step_mask):
                logits = model(input_ids=tokens, attention_mask=step_mask, use_cache=False).logits[:, -1]
            if eos is not None:
                logits[..., eos] = -torch.inf
            token = logits.argmax(-1, keepdim=True)
            tokens = torch.cat([tokens, token], dim=1)
            step_mask = torch.cat([step_mask, torch.ones_like(token)], dim=1)
    return tokens


@settings(max_examples=20, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    shape=SHAPES,
    length=st.integers(1, 20),
    pads=st.lists(st.integers(0, 6), min_size=1, max_size=3),
    sink=st.integers(0, 3),
    window=st.integers(1, 8),
    data=st.data(),
)
def test_generate_with_the_constant_cache_equals_a_step_by_step_decode_under_the_mask(
    shape, length, pads, sink, window, data
):
    """model.generate with the StreamingCache (left padding, ring buffer wrapping) against full recomputation."""
    model = random_model(*shape)
    plan = _plan(model, data, sink, window)
    ids, mask = _batch(len(pads), length, pads, seed=length)
    steps = 10
    generated, _ = generate(model, plan, ids, mask, max_new_tokens=steps)
    assert torch.equal(generated, _manual_greedy(model, plan, ids, mask, steps))


def test_generate_inside_the_patch_with_transformers_own_cache_gives_the_same_tokens():
    model = random_model("llama", kv_heads=2, groups=2, head_dim=8, window=4)
    plan = StreamingPlan.of({0: [0, 1, 3], 1: [2, 3]}, sink=2, window=3)
    ids, mask = _batch(2, 9, [0, 3], seed=4)
    constant, _ = generate(model, plan, ids, mask, max_new_tokens=8)
    with torch.no_grad(), patched(model, plan):
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
    ids, mask = _batch(len(pads), length, pads, seed=steps)
    _, cache = generate(model, plan, ids, mask, max_new_tokens=steps)
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
    ids, mask = _batch(1, 300, [0], seed=0)
    with torch.no_grad(), patched(model, plan):
        model(input_ids=ids, attention_mask=mask)
    assert seen and max(seen) <= 2 + banded.BLOCK + 8 - 1


def test_layer_errors_are_zero_where_the_window_covers_the_prompt_and_positive_otherwise():
    model = random_model("llama", kv_heads=1, groups=2, head_dim=8, window=4)
    ids, _ = _batch(1, 24, [0], seed=2)
    covering = layer_errors(model, StreamingPlan.of({1: [0]}, sink=1, window=24), ids)
    assert list(covering) == [1] and covering[1] <= 1e-6
    assert layer_errors(model, StreamingPlan.of({1: [0]}, sink=1, window=2), ids)[1] > 0.01


def test_only_full_attention_layers_are_candidates():
    assert candidate_layers(random_model("llama", 1, 2, 8, 4)) == [0, 1]
    gemma = random_model("gemma3", 1, 2, 8, 4)
    assert candidate_layers(gemma) == [1]
    with pytest.raises(SinkEvalError, match=r"layer 0 is a sliding-window layer.*full-attention layers \[1\]"):
        with patched(gemma, StreamingPlan.of({0: [0]})):
            pass


@pytest.mark.parametrize(
    "make, message",
    [
        (lambda: StreamingPlan.of({0: [0]}, sink=-1, window=4), r"s >= 0 sink tokens and w >= 1 keys, not \(-1, 4\)"),
        (lambda: StreamingPlan.of({0: [0]}, sink=4, window=0), r"s >= 0 sink tokens and w >= 1 keys, not \(4, 0\)"),
        (lambda: StreamingPlan.of({0: [True]}), "a streaming plan's heads are ints"),
        (lambda: StreamingPlan.of({0: "01"}), "a streaming plan maps each layer to a collection"),
    ],
)
def test_a_bad_streaming_plan_is_refused(make, message):
    with pytest.raises(SinkEvalError, match=message):
        make()


def test_a_plan_that_does_not_fit_the_model_is_refused_and_leaves_it_unpatched():
    model = random_model("llama", kv_heads=2, groups=2, head_dim=8, window=4)
    for plan, message in [(StreamingPlan.of({2: [0]}), "layer 2"), (StreamingPlan.of({0: [4]}), r"head\(s\) \[4\]")]:
        with pytest.raises(SinkEvalError, match=message), patched(model, plan):
            pass
        assert model.config._attn_implementation == "sdpa"


def test_copy_and_streaming_patches_do_not_nest_so_no_head_is_both():
    model = random_model("llama", kv_heads=1, groups=2, head_dim=8, window=4)
    with patched(model, StreamingPlan.of({0: [0]})):
        with pytest.raises(SinkEvalError, match="already runs under the 'sink_stream' patch; patches do not nest"):
            with copy_patched(model, CopyPlan.of({0: [0]})):
                pass
        assert model.config._attn_implementation == STREAM_ATTENTION
    with copy_patched(model, CopyPlan.of({0: [0]})):
        with pytest.raises(SinkEvalError, match="already runs under the 'sink_copy' patch"):
            with patched(model, StreamingPlan.of({0: [1]})):
                pass
    assert model.config._attn_implementation == "sdpa"


def test_the_constant_cache_is_used_only_inside_its_own_patch():
    model = random_model("llama", kv_heads=2, groups=2, head_dim=8, window=4)
    plan = StreamingPlan.of({0: [0, 1]}, sink=1, window=2)
    ids, mask = _batch(1, 6, [0], seed=1)
    cache = new_cache(model, plan, mask)
    with torch.no_grad(), pytest.raises(SinkEvalError, match="updated only inside"):
        model(input_ids=ids, attention_mask=mask, cache=cache)
    with pytest.raises(SinkEvalError, match="made for another plan"), patched(model, StreamingPlan.of({1: [0]}), cache):
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


def test_work_removed_is_the_fraction_copied_or_streamed_times_what_streaming_skips():
    shape = Shape(layers=2, heads=4, kv_heads=2, model_type="llama")
    stream = StreamingPlan.of({0: [0, 1]}, sink=1, window=4)
    assert work_removed(stream, shape, 100, 0) == pytest.approx(0.25 * (1 - streamed_share(100, 1, 4, decode=False)))
    assert work_removed(stream, shape, 5, 0) == 0.0  # N <= s + w: the plan is the unpatched model
    assert work_removed(CopyPlan.of({0: [0, 1]}, max_tokens=64), shape, 100, 0) == 0.0
    assert work_removed(CopyPlan.of({0: [0, 1]}), shape, 100, 3) == 0.25


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
