"""What every plan kind promises (`sink_eval.patches.base.Plan`): an empty plan is the unpatched model; its fast
patch is its plain reference (`Plan.reference`: masked eager attention under `Plan.allowed`); decoding into its own
cache gives the reference's tokens; a plan that does not fit is refused and leaves the model as it was."""

from __future__ import annotations

import pytest
import torch
from helpers import SHAPES, padded_batch, random_model
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from transformers import AutoModelForCausalLM, MistralConfig

from sink_eval.core.errors import SinkEvalError
from sink_eval.core.shape import Shape
from sink_eval.patches.base import PLAN_KINDS, Plan
from sink_eval.patches.copy import CopyPlan
from sink_eval.patches.streaming.plan import StreamingPlan, streamed_share

KINDS = ["copy", "streaming"]


def drawn_plan(kind: str, model, data, sink: int = 2, window: int = 3) -> Plan:
    """A plan of `kind` with heads drawn by hypothesis over the kind's candidate layers."""
    cls = PLAN_KINDS[kind]
    heads = model.config.num_attention_heads
    chosen = {
        layer: data.draw(st.sets(st.integers(0, heads - 1)), label=f"layer {layer}")
        for layer in cls.candidate_layers(model)
    }
    return CopyPlan.of(chosen) if kind == "copy" else StreamingPlan.of(chosen, sink, window)


def greedy_under_reference(model, plan: Plan, ids: torch.Tensor, mask: torch.Tensor, steps: int) -> torch.Tensor:
    """Greedy decoding by full recomputation under the plan's reference at every step (no cache), the end-of-sequence
    token suppressed as generate's min_new_tokens does."""
    eos = model.generation_config.eos_token_id
    tokens, step_mask = ids, mask
    with torch.no_grad(), plan.reference(model):
        for _ in range(steps):
            logits = model(input_ids=tokens, attention_mask=step_mask, use_cache=False).logits[:, -1]
            if eos is not None:
                logits[..., eos] = -torch.inf
            token = logits.argmax(-1, keepdim=True)
            tokens = torch.cat([tokens, token], dim=1)
            step_mask = torch.cat([step_mask, torch.ones_like(token)], dim=1)
    return tokens


@pytest.mark.parametrize("kind", KINDS)
@settings(max_examples=15, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(shape=SHAPES, length=st.integers(1, 30), pads=st.lists(st.integers(0, 10), min_size=1, max_size=3))
def test_an_empty_plan_is_the_unpatched_model(kind, shape, length, pads):
    model = random_model(*shape)
    ids, mask = padded_batch(len(pads), length, pads, seed=length)
    with torch.no_grad():
        reference = model(input_ids=ids, attention_mask=mask).logits
        with PLAN_KINDS[kind]().patched(model):
            out = model(input_ids=ids, attention_mask=mask).logits
    assert (out - reference)[mask.bool()].abs().max() <= 1e-6


@pytest.mark.parametrize("kind", KINDS)
@settings(max_examples=30, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    shape=SHAPES,
    length=st.integers(2, 90),
    pads=st.lists(st.integers(0, 10), min_size=1, max_size=3),
    sink=st.integers(0, 4),
    window=st.integers(1, 12),
    data=st.data(),
)
def test_the_fast_patch_equals_the_plans_reference(kind, shape, length, pads, sink, window, data):
    """Up to 90 tokens: more than one block of the streaming kernel (`banded.BLOCK` = 64 queries); GQA, left
    padding, Gemma 3's sliding-window layer."""
    model = random_model(*shape)
    plan = drawn_plan(kind, model, data, sink, window)
    ids, mask = padded_batch(len(pads), length, pads, seed=length)
    with torch.no_grad():
        with plan.reference(model):
            expected = model(input_ids=ids, attention_mask=mask).logits
        with plan.patched(model):
            out = model(input_ids=ids, attention_mask=mask).logits
    assert (out - expected)[mask.bool()].abs().max() <= 1e-5


@pytest.mark.parametrize("kind", KINDS)
@settings(max_examples=15, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    shape=SHAPES,
    length=st.integers(1, 20),
    pads=st.lists(st.integers(0, 6), min_size=1, max_size=3),
    sink=st.integers(0, 3),
    window=st.integers(1, 8),
    data=st.data(),
)
def test_generating_into_the_plans_cache_gives_the_references_tokens(kind, shape, length, pads, sink, window, data):
    """generate() with the plan's own cache (the copy plan's dropped groups; the streaming plan's ring buffer,
    wrapping) against full recomputation under the reference at every step."""
    model = random_model(*shape)
    plan = drawn_plan(kind, model, data, sink, window)
    ids, mask = padded_batch(len(pads), length, pads, seed=length)
    generated, _ = plan.generate(model, ids, mask, max_new_tokens=8)
    assert torch.equal(generated, greedy_under_reference(model, plan, ids, mask, 8))


@pytest.mark.parametrize(
    "plan, covering",
    [(CopyPlan.of({1: [0]}), None), (StreamingPlan.of({1: [0]}, sink=1, window=2), StreamingPlan.of({1: [0]}, 1, 24))],
)
def test_layer_errors_are_positive_where_a_plan_changes_attention_and_none_elsewhere(plan, covering):
    model = random_model("llama", kv_heads=1, groups=2, head_dim=8, window=4)
    ids, _ = padded_batch(1, 24, [0], seed=2)
    assert type(plan)().layer_errors(model, ids) == {}
    errors = plan.layer_errors(model, ids)
    assert list(errors) == [1] and errors[1] > 0.01
    if covering is not None:  # a window covering the prompt changes nothing
        assert covering.layer_errors(model, ids)[1] <= 1e-6


@pytest.mark.parametrize(
    "plan, message",
    [
        (CopyPlan.of({2: [0]}), "layer 2"),
        (CopyPlan.of({0: [4]}), r"head\(s\) \[4\]"),
        (CopyPlan.of({0: [-1]}), r"head\(s\) \[-1\]"),
        (CopyPlan.of({0: [0]}, max_tokens=0), "max_tokens must be at least 1"),
        (StreamingPlan.of({2: [0]}), "layer 2"),
        (StreamingPlan.of({0: [4]}), r"head\(s\) \[4\]"),
    ],
)
def test_a_plan_that_does_not_fit_the_model_is_refused_and_leaves_it_unpatched(plan, message):
    model = random_model("llama", kv_heads=2, groups=2, head_dim=8, window=4)
    with pytest.raises(SinkEvalError, match=message), plan.patched(model):
        pass
    assert model.config._attn_implementation == "sdpa"


@pytest.mark.parametrize(
    "make, message",
    [
        (lambda: CopyPlan.of({0: [True]}), "a copy plan's heads are ints"),
        (lambda: CopyPlan.of({"0": [1]}), "a copy plan's layers are ints"),
        (lambda: StreamingPlan.of({0: "01"}), "a streaming plan maps each layer to a collection"),
        (lambda: StreamingPlan.of({0: [0]}, sink=-1, window=4), r"s >= 0 sink tokens and w >= 1 keys, not \(-1, 4\)"),
        (lambda: StreamingPlan.of({0: [0]}, sink=4, window=0), r"s >= 0 sink tokens and w >= 1 keys, not \(4, 0\)"),
    ],
)
def test_a_malformed_plan_is_refused_as_it_is_made(make, message):
    with pytest.raises(SinkEvalError, match=message):
        make()


@pytest.mark.parametrize("kind", KINDS)
def test_an_exception_inside_the_patch_restores_the_attention(kind):
    model = random_model("gemma3", kv_heads=1, groups=2, head_dim=8, window=4)
    plan = PLAN_KINDS[kind].of({1: [1]})
    with pytest.raises(ValueError), plan.patched(model):
        assert model.config._attn_implementation == plan.attention_name
        raise ValueError("boom")
    assert model.config._attn_implementation == "sdpa"


@pytest.mark.parametrize("kind", KINDS)
def test_an_unsupported_architecture_is_refused(kind):
    config = MistralConfig(
        vocab_size=64, hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2,
        num_key_value_heads=1,
    )  # fmt: skip
    model = AutoModelForCausalLM.from_config(config)
    with pytest.raises(SinkEvalError, match="supports llama, gemma3_text, qwen2 models, not 'mistral'"):
        with PLAN_KINDS[kind]().patched(model):
            pass


def test_plans_of_two_kinds_do_not_nest_so_no_head_is_both():
    model = random_model("llama", kv_heads=1, groups=2, head_dim=8, window=4)
    with StreamingPlan.of({0: [0]}).patched(model):
        with pytest.raises(SinkEvalError, match="already runs under the 'sink_streaming' patch; patches do not nest"):
            with CopyPlan.of({0: [0]}).patched(model):
                pass
        assert model.config._attn_implementation == "sink_streaming"
    with CopyPlan.of({0: [0]}).patched(model):
        with pytest.raises(SinkEvalError, match="already runs under the 'sink_copy' patch"):
            with StreamingPlan.of({0: [1]}).patched(model):
                pass
    assert model.config._attn_implementation == "sdpa"


@pytest.mark.parametrize("kind", KINDS)
def test_right_padding_is_refused(kind):
    model = random_model("llama", kv_heads=1, groups=2, head_dim=8, window=4)
    with pytest.raises(SinkEvalError, match="left padding"):
        PLAN_KINDS[kind]().generate(model, torch.ones(1, 4, dtype=torch.long), torch.tensor([[1, 1, 1, 0]]))


def test_work_removed_is_the_fraction_copied_or_streamed_times_what_streaming_skips():
    shape = Shape(layers=2, heads=4, kv_heads=2, model_type="llama")
    stream = StreamingPlan.of({0: [0, 1]}, sink=1, window=4)
    assert stream.work_removed(shape, 100, 0) == pytest.approx(0.25 * (1 - streamed_share(100, 1, 4, decode=False)))
    assert stream.work_removed(shape, 5, 0) == 0.0  # N <= s + w: the plan is the unpatched model
    assert CopyPlan.of({0: [0, 1]}, max_tokens=64).work_removed(shape, 100, 0) == 0.0
    assert CopyPlan.of({0: [0, 1]}).work_removed(shape, 100, 3) == 0.25


def test_a_control_plan_keeps_the_kind_and_its_settings():
    assert StreamingPlan.of({0: [1]}, 2, 5).with_heads({1: [0]}) == StreamingPlan.of({1: [0]}, 2, 5)
    assert CopyPlan.of({0: [1]}, max_tokens=8).with_heads({1: [0]}) == CopyPlan.of({1: [0]}, max_tokens=8)
    assert CopyPlan.of({1: [2, 0], 0: []}).to_json() == {
        "heads": {"1": [0, 2]},
        "max_tokens": None,
        "decode_steps": None,
    }
