"""The attention probe: its statistics equal eager attention's full matrices, and it changes nothing."""

from __future__ import annotations

import pytest
import torch
from helpers import random_model
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from sink_eval.core.errors import SinkEvalError
from sink_eval.measure.probe import probe
from sink_eval.models.load import load_model


def _eager_reference(model, ids, mask):
    """Sink, self and previous-token scores computed from eager attention's full N x N matrices."""
    model.set_attn_implementation("eager")
    try:
        out = model(input_ids=ids, attention_mask=mask, use_cache=False, output_attentions=True)
    finally:
        model.set_attn_implementation("sdpa")
    attn = torch.stack(out.attentions, dim=1)  # (B, L, H, T, T)
    refs = []
    for b in range(ids.shape[0]):
        first = int((mask[b] == 0).sum())
        q = torch.arange(first + 1, ids.shape[1])
        a = attn[b]
        refs.append((a[:, :, q, first].mean(-1), a[:, :, q, q].mean(-1), a[:, :, q, q - 1].mean(-1), out.logits[b]))
    return refs


@settings(max_examples=30, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    arch=st.sampled_from(["llama", "qwen2", "gemma3"]),
    kv_heads=st.integers(1, 3),
    groups=st.integers(1, 3),
    head_dim=st.sampled_from([8, 16]),
    window=st.integers(2, 40),
    lengths=st.lists(st.integers(1, 300), min_size=1, max_size=3),
    chunk_bytes=st.sampled_from([1, 4096, 1 << 26]),
    seed=st.integers(0, 2**16),
)
def test_probe_statistics_equal_eager_attention_matrices(
    arch, kv_heads, groups, head_dim, window, lengths, chunk_bytes, seed
):
    model = random_model(arch, kv_heads, groups, head_dim, window)
    gen = torch.Generator().manual_seed(seed)
    width = max(lengths)
    ids = torch.randint(1, 64, (len(lengths), width), generator=gen)
    mask = torch.zeros_like(ids)
    for b, n in enumerate(lengths):
        mask[b, width - n :] = 1
    ids = ids * mask  # left padding with the pad id

    result = probe(model, ids, mask, logits_to_keep=0, chunk_bytes=chunk_bytes)
    for b, (sink, self_, prev, logits) in enumerate(_eager_reference(model, ids, mask)):
        stats = result.stats[b]
        assert stats.n_tokens == lengths[b]
        if lengths[b] == 1:
            assert torch.isnan(stats.sink).all(), "a one-token prompt has no defined sink score"
            continue
        torch.testing.assert_close(stats.sink, sink, atol=1e-5, rtol=0)
        torch.testing.assert_close(stats.self_, self_, atol=1e-5, rtol=0)
        torch.testing.assert_close(stats.prev, prev, atol=1e-5, rtol=0)
        real = slice(width - lengths[b], None)
        torch.testing.assert_close(result.logits[b, real], logits[real], atol=1e-4, rtol=0)


def _eager_window_and_offset_scores(model, ids, mask, windows, offsets):
    """Streaming and offset scores from eager attention's full matrices, by the definitions, query by query."""
    model.set_attn_implementation("eager")
    try:
        attn = torch.stack(model(input_ids=ids, attention_mask=mask, output_attentions=True).attentions, dim=1)
    finally:
        model.set_attn_implementation("sdpa")
    refs = []
    for b in range(ids.shape[0]):
        first = int((mask[b] == 0).sum())
        a = attn[b, :, :, first:, first:]  # (L, H, n, n), positions from the first real token
        n = a.shape[-1]
        streaming = {}
        for s, w in windows:
            rows = [a[:, :, i, :s].sum(-1) + a[:, :, i, i - w + 1 : i + 1].sum(-1) for i in range(s + w, n)]
            streaming[(s, w)] = torch.stack(rows, -1).mean(-1) if rows else torch.full(a.shape[:2], float("nan"))
        offset = {}
        for k in offsets:
            rows = [a[:, :, i, i - k] for i in range(k + 1, n)]
            offset[k] = torch.stack(rows, -1).mean(-1) if rows else torch.full(a.shape[:2], float("nan"))
        refs.append((streaming, offset))
    return refs


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    arch=st.sampled_from(["llama", "qwen2", "gemma3"]),
    kv_heads=st.integers(1, 2),
    groups=st.integers(1, 3),
    window=st.integers(2, 12),
    lengths=st.lists(st.integers(1, 60), min_size=1, max_size=3),
    windows=st.lists(st.tuples(st.integers(0, 5), st.integers(1, 40)), min_size=1, max_size=3, unique=True),
    offsets=st.lists(st.integers(1, 30), max_size=3, unique=True),
    chunk_bytes=st.sampled_from([1, 4096, 1 << 26]),
    seed=st.integers(0, 2**16),
)
def test_streaming_and_offset_scores_equal_their_definitions_on_eager_matrices(
    arch, kv_heads, groups, window, lengths, windows, offsets, chunk_bytes, seed
):
    model = random_model(arch, kv_heads, groups, 8, window)
    gen = torch.Generator().manual_seed(seed)
    width = max(lengths)
    mask = torch.stack([torch.arange(width) >= width - n for n in lengths]).long()
    ids = torch.randint(1, 64, (len(lengths), width), generator=gen) * mask
    result = probe(model, ids, mask, chunk_bytes=chunk_bytes, windows=windows, offsets=offsets)
    for stats, (streaming, offset) in zip(
        result.stats, _eager_window_and_offset_scores(model, ids, mask, windows, offsets), strict=True
    ):
        for key, expected in [*streaming.items(), *offset.items()]:
            got = stats.streaming[key] if isinstance(key, tuple) else stats.offset[key]
            torch.testing.assert_close(got, expected, atol=1e-5, rtol=0, equal_nan=True)


def test_a_prompt_too_short_for_a_window_has_no_streaming_score_not_a_perfect_one():
    model = random_model("llama", 1, 2, 8, 4)
    stats = probe(model, torch.ones(1, 8, dtype=torch.long), windows=[(4, 4), (1, 2)], offsets=[7, 2]).stats[0]
    assert torch.isnan(stats.streaming[(4, 4)]).all() and torch.isnan(stats.offset[7]).all()
    assert not torch.isnan(stats.streaming[(1, 2)]).any() and not torch.isnan(stats.offset[2]).any()


@pytest.mark.parametrize("windows", [[(-1, 4)], [(0, 0)], [(1.5, 4)]])
def test_a_window_with_negative_sinks_or_no_keys_is_refused(windows):
    with pytest.raises(SinkEvalError, match="s >= 0 sink tokens and w >= 1 keys"):
        probe(random_model("llama", 1, 1, 8, 4), torch.ones(1, 4, dtype=torch.long), windows=windows)


@pytest.mark.parametrize("name", ["tiny-llama", "tiny-gemma3", "tiny-qwen2"])
def test_probe_leaves_logits_of_the_plain_sdpa_forward_unchanged(name):
    model = load_model(name).model
    ids = torch.randint(3, 259, (1, 50), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        plain = model(input_ids=ids, use_cache=False).logits
    torch.testing.assert_close(probe(model, ids, logits_to_keep=0).logits, plain, atol=1e-4, rtol=0)
    assert model.config._attn_implementation == "sdpa", "the probe must restore the attention implementation"


def test_probe_restores_attention_implementation_after_an_error():
    model = load_model("tiny-llama").model
    with pytest.raises(IndexError):
        probe(model, torch.tensor([[5, 6, 10_000]]))
    assert model.config._attn_implementation == "sdpa"


def test_two_token_prompt_splits_its_one_query_between_sink_and_self():
    stats = probe(load_model("tiny-llama").model, torch.tensor([[7, 8]])).stats[0]
    torch.testing.assert_close(stats.sink + stats.self_, torch.ones_like(stats.sink), atol=1e-6, rtol=0)
    torch.testing.assert_close(stats.prev, stats.sink, atol=0, rtol=0)
    assert not torch.isnan(stats.sink).any()


@pytest.mark.parametrize(
    ("ids", "mask", "message"),
    [
        (torch.zeros((1, 0), dtype=torch.long), None, "non-empty"),
        (torch.tensor([[5, 6, 0]]), torch.tensor([[1, 1, 0]]), "left padding"),
        (torch.tensor([[0, 0], [5, 6]]), torch.tensor([[0, 0], [1, 1]]), "no tokens"),
    ],
)
def test_probe_rejects_bad_batches_with_a_message(ids, mask, message):
    with pytest.raises(SinkEvalError, match=message):
        probe(load_model("tiny-llama").model, ids, mask)


@pytest.mark.parametrize("arch", ["llama", "qwen2", "gemma3"])
def test_probing_the_first_layers_only_measures_them_and_stops_there(arch):
    model = random_model(arch, 2, 2, 4, 3)
    ids = torch.randint(1, 64, (2, 9), generator=torch.Generator().manual_seed(1))
    full = probe(model, ids).stats
    first = probe(model, ids, layers=1)
    assert first.logits is None
    for whole, part in zip(full, first.stats, strict=True):
        assert torch.equal(part.sink[0], whole.sink[0]) and torch.equal(part.prev[0], whole.prev[0])
        assert part.sink[1:].isnan().all() and part.sink.shape == whole.sink.shape
    with pytest.raises(SinkEvalError, match="takes 1..2"):
        probe(model, ids, layers=3)
