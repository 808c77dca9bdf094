"""The copy patch on the real models: exact when empty, consistent between prefill and cached decoding, and its
plan of the most consistent sink heads (measured in the same session) barely moves the next-token distribution."""

from __future__ import annotations

import pytest
import torch

from sink_eval.evals.patch_eval import kl_and_top1
from sink_eval.patches.copy import CopyPlan

pytestmark = pytest.mark.analysis

PROMPTS = ["The capital of France is", "def add(a, b):\n    return", "Once upon a time, in a small village by the sea,"]


def most_consistent_plan(sink_analysis, name: str, k: int = 2) -> CopyPlan:
    """A plan worth testing: the k most consistent sink heads at tau = 0.8, as this session measures them on the
    default prompt set (the analysis result's `top_consistent_heads`)."""
    top = sink_analysis(name).at(0.8).top_consistent_heads[:k]
    assert len(top) == k, f"{name}: the analysis result lists {len(top)} consistent heads, fewer than {k}"
    heads: dict[int, list[int]] = {}
    for entry in top:
        heads.setdefault(entry.layer, []).append(entry.head)
    return CopyPlan.of(heads)


def _batch(loaded):
    tokenizer = loaded.tokenizer
    tokenizer.padding_side = "left"
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer(PROMPTS, return_tensors="pt", padding=True)


def test_an_empty_plan_leaves_a_real_model_exactly_unchanged(sink_model, sink_model_name):
    loaded = sink_model(sink_model_name)
    batch = _batch(loaded)
    with torch.no_grad():
        reference = loaded.model(**batch).logits
        with CopyPlan().patched(loaded.model):
            out = loaded.model(**batch).logits
    assert torch.equal(out[batch["attention_mask"].bool()], reference[batch["attention_mask"].bool()])


def test_cached_generation_under_a_plan_matches_its_full_forward(sink_model, sink_analysis, sink_model_name):
    """Greedy tokens from the plan's KV cache (copied KV groups dropped) are the argmax of a full patched forward."""
    loaded = sink_model(sink_model_name)
    batch = _batch(loaded)
    plan = most_consistent_plan(sink_analysis, sink_model_name)
    ids, cache = plan.generate(loaded.model, batch["input_ids"], batch["attention_mask"], max_new_tokens=8)
    mask = torch.cat([batch["attention_mask"], torch.ones(len(PROMPTS), 8, dtype=torch.long)], dim=1)
    with torch.no_grad(), plan.patched(loaded.model):
        full = loaded.model(input_ids=ids[:, :-1], attention_mask=mask[:, :-1]).logits
    prompt_len = batch["input_ids"].shape[1]
    assert torch.equal(full[:, prompt_len - 1 :].argmax(-1), ids[:, prompt_len:])
    assert cache.get_seq_length() == ids.shape[1] - 1


def test_copying_the_most_consistent_sink_heads_barely_changes_the_next_token(
    sink_model, sink_analysis, sink_model_name
):
    loaded = sink_model(sink_model_name)
    batch = _batch(loaded)
    plan = most_consistent_plan(sink_analysis, sink_model_name)
    with torch.no_grad():
        reference = loaded.model(**batch).logits[:, -1:]
        with plan.patched(loaded.model):
            out = loaded.model(**batch).logits[:, -1:]
        with CopyPlan.of({layer: range(4) for layer in range(4)}).patched(loaded.model):
            damaged = loaded.model(**batch).logits[:, -1:]
    kl, top1 = kl_and_top1(reference, out)
    kl_damaged, _ = kl_and_top1(reference, damaged)
    assert kl < 0.05 and top1 == 1.0
    assert kl_damaged > 10 * kl  # the check can fail: copying non-sink heads does change the output
