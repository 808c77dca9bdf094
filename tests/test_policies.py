"""Head-selection policies turn sink statistics into the plans their definitions say."""

from __future__ import annotations

import pytest
import torch

from sink_eval.core.errors import SinkEvalError
from sink_eval.core.shape import Shape
from sink_eval.measure.probe import PromptStats
from sink_eval.patches.streaming.plan import StreamingPlan
from sink_eval.policies.base import Target, check_disjoint
from sink_eval.policies.registry import BUILT_IN, make_policy, names, policy_class
from sink_eval.prompts.prompt_set import Prompt


def _stats(sink: list[list[float]], n_tokens: int = 100) -> PromptStats:
    scores = torch.tensor(sink)
    return PromptStats(n_tokens, scores, torch.zeros_like(scores), torch.zeros_like(scores))


SINK = [[0.9, 0.1, 0.85], [0.95, 0.2, 0.5], [0.1, 0.9, 0.9]]
COPY_TARGET = Target(Shape(layers=3, heads=3, kv_heads=3, model_type="llama"), layers=(0, 1, 2))


def make_plan(name: str, options: dict, prompt=None, calibration=(), target: Target = COPY_TARGET):
    return make_policy(name, **options).plan(target, prompt, calibration)


def test_first_layer_copies_layer_zero_sink_heads_in_every_layer():
    plan = make_plan("first_layer", dict(threshold=0.8), _stats(SINK))
    assert plan.heads == {0: {0, 2}, 1: {0, 2}, 2: {0, 2}}


def test_oracle_copies_exactly_the_prompts_own_sink_heads():
    plan = make_plan("oracle", dict(threshold=0.8), _stats(SINK))
    assert plan.heads == {0: {0, 2}, 1: {0}, 2: {1, 2}}


def test_calibrated_copies_heads_at_least_as_consistent_as_p():
    calibration = [_stats(SINK), _stats([[0.9, 0.9, 0.1], [0.1, 0.1, 0.1], [0.1, 0.9, 0.9]]), _stats(SINK, 1)]
    plan = make_plan("calibrated", dict(threshold=0.8, consistency=1.0), None, calibration)
    assert plan.heads == {0: {0}, 2: {1, 2}}  # the one-token prompt is trivial and not counted
    loose = make_plan("calibrated", dict(threshold=0.8, consistency=0.5), None, calibration)
    assert loose.heads == {0: {0, 1, 2}, 1: {0}, 2: {1, 2}}


def test_a_chance_corrected_threshold_is_higher_for_short_prompts():
    short = _stats([[0.85]], n_tokens=3)  # tau(3) = u + 0.8 (1 - u) = 0.883, u(3) = (1/2 + 1/3) / 2
    assert make_plan("oracle", dict(threshold=0.8), short).heads == {0: {0}}
    assert make_plan("oracle", dict(threshold=0.8, chance_corrected=True), short).heads == {}


def test_hybrid_limits_its_base_plan():
    options = dict(threshold=0.8, base="oracle", max_tokens=64, decode_steps=4)
    plan = make_plan("hybrid", options, _stats(SINK))
    assert plan.heads == make_plan("oracle", dict(threshold=0.8), _stats(SINK)).heads
    assert (plan.max_tokens, plan.decode_steps) == (64, 4)


@pytest.mark.parametrize(
    "name, options, message",
    [
        ("last_layer", {}, "unknown policy 'last_layer'; choose one of first_layer, calibrated"),
        ("hybrid", {}, "needs a limit"),
        ("hybrid", dict(base="hybrid", max_tokens=8), "limits first_layer, calibrated or oracle"),
        ("oracle", dict(threshold=1.5), r"threshold is in \(0, 1\]"),
        ("calibrated", dict(consistency=0.0), r"consistency level p is in \(0, 1\]"),
    ],
)
def test_bad_policy_requests_are_refused(name, options, message):
    with pytest.raises(SinkEvalError, match=message):
        make_plan(name, options, _stats(SINK), [_stats(SINK)])


def test_per_prompt_policies_need_the_prompts_statistics():
    with pytest.raises(SinkEvalError, match="needs the prompt's own attention statistics"):
        make_plan("oracle", {}, None)


def test_a_calibration_set_overlapping_the_evaluation_set_is_refused():
    a, b = Prompt("a", "prose", "one text"), Prompt("b", "prose", "another text")
    check_disjoint([a], [b])
    with pytest.raises(SinkEvalError, match="overlap"):
        check_disjoint([a], [b, a])
    with pytest.raises(SinkEvalError, match="overlap"):
        check_disjoint([a], [Prompt("c", "prose", "one text")])


def test_the_registry_lists_every_built_in_policy_by_the_name_its_class_carries():
    assert names()[: len(BUILT_IN)] == list(BUILT_IN)
    assert all(policy_class(name).name == name for name in BUILT_IN)


def test_an_option_a_policy_does_not_read_is_refused():
    with pytest.raises(SinkEvalError, match="the streaming policy does not read threshold"):
        make_policy("streaming", threshold=0.5)
    with pytest.raises(SinkEvalError, match="the oracle policy does not read consistency"):
        make_policy("oracle", consistency=0.5)


WINDOW = dict(sink=1, window=4)  # calibration prompts of at least 4 (s + w) = 20 tokens count
TARGET = Target(Shape(layers=2, heads=4, kv_heads=2, model_type="llama"), layers=(0, 1))  # groups {0, 1}, {2, 3}


def _streaming(scores: list[list[float]], n_tokens: int = 20) -> PromptStats:
    stats = _stats([[0.0] * 4] * 2, n_tokens)
    stats.streaming[(1, 4)] = torch.tensor(scores)
    return stats


CALIBRATION = [
    _streaming([[0.95, 0.91, 0.80, 0.99], [0.50, 0.97, 0.93, 0.95]]),
    _streaming([[0.93, 0.95, 0.99, 0.99], [0.60, 0.99, 0.91, 0.97]]),
    _streaming([[0.0, 0.0, 0.0, 0.0], [0.0, 0.0, 0.0, 0.0]], n_tokens=19),  # shorter than 4 (s + w): not counted
]


def test_streaming_streams_the_heads_whose_calibrated_score_reaches_p():
    """Mean scores: layer 0 (0.94, 0.93, 0.895, 0.99), layer 1 (0.55, 0.98, 0.92, 0.96)."""
    plan = make_plan("streaming", WINDOW, None, CALIBRATION, TARGET)
    assert isinstance(plan, StreamingPlan) and (plan.sink, plan.window) == (1, 4)
    assert plan.heads == {0: {0, 1, 3}, 1: {1, 2, 3}}
    assert plan.n_heads() == 6 and plan.whole_groups(TARGET.shape) == {0: {0}, 1: {1}}  # both counts reported


def test_streaming_with_a_fraction_streams_the_top_kv_groups_by_their_weakest_head():
    """Group scores (weakest head): L0G0 0.93, L0G1 0.895, L1G0 0.55, L1G1 0.92; q = 0.5 of 4 groups -> 2."""
    options = dict(sink=1, window=4, fraction=0.5)
    plan = make_plan("streaming", options, None, CALIBRATION, TARGET)
    assert plan.heads == {0: {0, 1}, 1: {2, 3}}


def test_random_draws_as_many_kv_groups_from_the_candidate_layers_with_its_seed():
    gemma_like = Target(TARGET.shape, layers=(1,))
    options = dict(sink=1, window=4, fraction=0.5)
    plans = [make_plan("random", {**options, "seed": seed}, None, CALIBRATION, gemma_like) for seed in range(8)]
    assert all(set(p.heads) <= {1} and p.n_whole_groups(TARGET.shape) == 1 == p.n_heads() // 2 for p in plans)
    assert len({frozenset(p.heads[1]) for p in plans}) == 2  # both groups of layer 1 come up over the seeds
    assert make_plan("random", options, None, CALIBRATION, gemma_like) == plans[0]  # the seed decides
    as_streaming = make_plan("random", WINDOW, None, CALIBRATION, TARGET)  # no q: as many as streaming streams whole
    assert as_streaming.n_whole_groups(TARGET.shape) == 2 == as_streaming.n_heads() // 2


def test_streaming_llm_streams_every_head_of_every_candidate_layer():
    plan = make_plan("streaming_llm", WINDOW, None, (), Target(TARGET.shape, layers=(1,)))
    assert plan.heads == {1: {0, 1, 2, 3}}


def test_streaming_policies_calibrate_only_on_prompts_of_at_least_four_spans():
    with pytest.raises(SinkEvalError, match=r"at least 4 \(s \+ w\) = 20 tokens; none of the 1 calibration prompts"):
        make_plan("streaming", WINDOW, None, CALIBRATION[2:], TARGET)


@pytest.mark.parametrize(
    "name, options, message",
    [
        ("streaming", dict(sink=-1), r"s >= 0 sink tokens and w >= 1 keys, not \(-1, 256\)"),
        ("random", dict(window=0), r"s >= 0 sink tokens and w >= 1 keys, not \(4, 0\)"),
        ("streaming", dict(streaming_score=0.0), r"streaming score threshold p is in \(0, 1\]"),
        ("random", dict(fraction=1.5), r"fraction q of the KV groups is in \(0, 1\]"),
    ],
)
def test_bad_streaming_requests_are_refused(name, options, message):
    with pytest.raises(SinkEvalError, match=message):
        make_plan(name, options, None, CALIBRATION, TARGET)
