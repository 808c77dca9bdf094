"""The copy plan's own promises: a head attending one-hot to the first token is reproduced exactly; per-row plans;
dropped KV groups; hybrid limits. (What every plan kind promises: `test_plans.py`.)"""

from __future__ import annotations

import pytest
import torch
from helpers import SHAPES, padded_batch, random_model
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from transformers.integrations.sdpa_attention import sdpa_attention_forward

from sink_eval.core.errors import SinkEvalError
from sink_eval.patches.base import kv_cache_bytes, patch_attention
from sink_eval.patches.copy import CopyPlan, rows_patched


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    shape=SHAPES,
    length=st.integers(2, 40),
    pads=st.lists(st.integers(0, 10), min_size=1, max_size=3),
    data=st.data(),
)
def test_heads_attending_one_hot_to_the_first_token_are_reproduced_when_copied(shape, length, pads, data):
    """Queries aligned with the first token's key (and orthogonal to every other key) put all their attention on it;
    copying those heads gives the exact attention output, through the GQA mapping and with left padding."""
    model = random_model(*shape)
    attention = model.model.layers[1].self_attn  # a global layer (gemma3's layer 0 is sliding)
    heads, kv_heads, dim = model.config.num_attention_heads, model.config.num_key_value_heads, model.config.head_dim
    copied = data.draw(st.sets(st.integers(0, heads - 1), min_size=1))
    rows = len(pads)
    first = torch.tensor([min(p, length - 1) for p in pads])
    gen = torch.Generator().manual_seed(length)
    key = torch.randn(rows, kv_heads, length, dim, generator=gen)
    value = torch.randn(rows, kv_heads, length, dim, generator=gen)
    query = torch.randn(rows, heads, length, dim, generator=gen)
    for b in range(rows):
        key[b, :, first[b]] = 0
        key[b, :, first[b], 0] = 1.0
        key[b, :, first[b] + 1 :, 0] = 0  # later keys orthogonal to direction 0
    for h in copied:
        query[:, h] = 0
        query[:, h, :, 0] = 1e4  # score 1e4 * scale on the first token, 0 elsewhere: exp(-big) == 0
    positions = torch.arange(length)
    causal = positions[None, :] <= positions[:, None]
    mask = (causal[None] & (positions[None, None, :] >= first[:, None, None]))[:, None]
    with torch.no_grad():
        exact, _ = sdpa_attention_forward(attention, query, key, value, mask, scaling=dim**-0.5)
        with CopyPlan.of({1: copied}).patched(model):
            out, _ = patch_attention(attention, query, key, value, mask, scaling=dim**-0.5)
    real = positions[None, :] >= first[:, None]
    assert (out - exact)[real].abs().max() <= 1e-6


@settings(max_examples=20, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    shape=SHAPES,
    lengths=st.lists(st.integers(1, 20), min_size=1, max_size=4),
    padding=st.sampled_from(["left", "right"]),
    data=st.data(),
)
def test_per_row_plans_give_each_row_what_it_gets_alone_under_its_plan(shape, lengths, padding, data):
    """Right padding is lm-eval's (no mask: the causal mask keeps real tokens from seeing the pads after them)."""
    model = random_model(*shape)
    heads = model.config.num_attention_heads
    head_sets = st.sets(st.integers(0, heads - 1))
    plans = [CopyPlan.of({layer: data.draw(head_sets) for layer in range(2)}) for _ in lengths]
    width = max(lengths)
    gen = torch.Generator().manual_seed(width)
    rows = [torch.randint(1, 64, (n,), generator=gen) for n in lengths]
    ids = torch.zeros(len(rows), width, dtype=torch.long)
    mask = torch.zeros_like(ids)
    for b, row in enumerate(rows):
        span = slice(width - len(row), width) if padding == "left" else slice(0, len(row))
        ids[b, span], mask[b, span] = row, 1
    kwargs = {"attention_mask": mask} if padding == "left" else {}
    with torch.no_grad(), rows_patched(model, plans):
        out = model(input_ids=ids, **kwargs).logits
    for b, (row, plan) in enumerate(zip(rows, plans, strict=True)):
        with torch.no_grad(), plan.patched(model):
            alone = model(input_ids=row[None]).logits[0]
        span = slice(width - len(row), width) if padding == "left" else slice(0, len(row))
        assert (out[b, span] - alone).abs().max() <= 1e-5


def test_per_row_plans_must_be_unconditional_and_one_per_row():
    model = random_model("llama", 1, 2, 4, 4)
    with (
        pytest.raises(SinkEvalError, match="resolve a hybrid plan"),
        rows_patched(model, [CopyPlan.of({0: [0]}, max_tokens=4)]),
    ):
        pass
    with torch.no_grad(), rows_patched(model, [CopyPlan.of({0: [0]})]), pytest.raises(SinkEvalError, match="1 per-row"):
        model(input_ids=torch.ones(2, 3, dtype=torch.long))


def test_copying_every_head_of_a_kv_group_drops_it_from_the_cache():
    model = random_model("llama", kv_heads=2, groups=2, head_dim=8, window=4)
    ids, mask = padded_batch(1, 16, [0], seed=0)
    _, full = CopyPlan().generate(model, ids, mask, max_new_tokens=4)
    _, half = CopyPlan.of({0: [0, 1], 1: [0, 1]}).generate(model, ids, mask, max_new_tokens=4)
    _, partial = CopyPlan.of({0: [0], 1: [2]}).generate(model, ids, mask, max_new_tokens=4)
    first_values = 2 * 1 * 2 * 8 * 4  # layers x batch x KV heads x head dim x float32 bytes
    assert kv_cache_bytes(half) == (kv_cache_bytes(full) - first_values) // 2 + first_values
    assert kv_cache_bytes(partial) == kv_cache_bytes(full)


def test_a_hybrid_plan_copies_only_within_its_limit():
    model = random_model("llama", kv_heads=1, groups=2, head_dim=8, window=4)
    ids, mask = padded_batch(1, 12, [0], seed=1)
    heads = {0: [0], 1: [1]}
    with torch.no_grad():
        exact = model(input_ids=ids).logits
        with CopyPlan.of(heads).patched(model):
            always = model(input_ids=ids).logits
        with CopyPlan.of(heads, max_tokens=11).patched(model):
            too_long = model(input_ids=ids).logits
        with CopyPlan.of(heads, max_tokens=12).patched(model):
            within = model(input_ids=ids).logits
        with CopyPlan.of(heads, decode_steps=3).patched(model):
            prefill = model(input_ids=ids).logits
    assert not torch.allclose(always, exact)
    assert torch.equal(too_long, exact) and torch.equal(prefill, exact)
    assert torch.equal(within, always)


def test_decoding_with_a_foreign_cache_is_refused():
    model = random_model("llama", kv_heads=1, groups=2, head_dim=8, window=4)
    ids, _ = padded_batch(1, 6, [0], seed=3)
    with torch.no_grad(), CopyPlan.of({0: [0]}).patched(model):
        with pytest.raises(SinkEvalError, match=r"CopyPlan.generate\(\)"):
            model.generate(input_ids=ids, max_new_tokens=2, do_sample=False, pad_token_id=0)
