"""Head-selection policies turn sink statistics into the plans their definitions say."""

from __future__ import annotations

import pytest
import torch

from sink_eval.cli import POLICY_NAMES
from sink_eval.errors import SinkEvalError
from sink_eval.policies import (
    POLICIES,
    PolicyOptions,
    check_disjoint,
    make_plan,
)
from sink_eval.probe import PromptStats
from sink_eval.prompts import Prompt


def _stats(sink: list[list[float]], n_tokens: int = 100) -> PromptStats:
    scores = torch.tensor(sink)
    return PromptStats(n_tokens, scores, torch.zeros_like(scores), torch.zeros_like(scores))


SINK = [[0.9, 0.1, 0.85], [0.95, 0.2, 0.5], [0.1, 0.9, 0.9]]


def test_first_layer_copies_layer_zero_sink_heads_in_every_layer():
    plan = make_plan("first_layer", PolicyOptions(threshold=0.8), _stats(SINK))
    assert plan.heads == {0: {0, 2}, 1: {0, 2}, 2: {0, 2}}


def test_oracle_copies_exactly_the_prompts_own_sink_heads():
    plan = make_plan("oracle", PolicyOptions(threshold=0.8), _stats(SINK))
    assert plan.heads == {0: {0, 2}, 1: {0}, 2: {1, 2}}


def test_calibrated_copies_heads_at_least_as_consistent_as_p():
    calibration = [_stats(SINK), _stats([[0.9, 0.9, 0.1], [0.1, 0.1, 0.1], [0.1, 0.9, 0.9]]), _stats(SINK, 1)]
    plan = make_plan("calibrated", PolicyOptions(threshold=0.8, consistency=1.0), None, calibration)
    assert plan.heads == {0: {0}, 2: {1, 2}}  # the one-token prompt is trivial and not counted
    loose = make_plan("calibrated", PolicyOptions(threshold=0.8, consistency=0.5), None, calibration)
    assert loose.heads == {0: {0, 1, 2}, 1: {0}, 2: {1, 2}}


def test_a_chance_corrected_threshold_is_higher_for_short_prompts():
    short = _stats([[0.85]], n_tokens=3)  # tau(3) = u + 0.8 (1 - u) = 0.883, u(3) = (1/2 + 1/3) / 2
    assert make_plan("oracle", PolicyOptions(threshold=0.8), short).heads == {0: {0}}
    assert make_plan("oracle", PolicyOptions(threshold=0.8, chance_corrected=True), short).heads == {}


def test_hybrid_limits_its_base_plan():
    options = PolicyOptions(threshold=0.8, base="oracle", max_tokens=64, decode_steps=4)
    plan = make_plan("hybrid", options, _stats(SINK))
    assert plan.heads == make_plan("oracle", options, _stats(SINK)).heads
    assert (plan.max_tokens, plan.decode_steps) == (64, 4)


@pytest.mark.parametrize(
    "name, options, message",
    [
        ("last_layer", PolicyOptions(), "unknown policy 'last_layer'"),
        ("hybrid", PolicyOptions(), "needs a limit"),
        ("hybrid", PolicyOptions(base="hybrid", max_tokens=8), "limits first_layer, calibrated or oracle"),
        ("oracle", PolicyOptions(threshold=1.5), r"threshold is in \(0, 1\]"),
        ("calibrated", PolicyOptions(consistency=0.0), r"consistency level p is in \(0, 1\]"),
    ],
)
def test_bad_policy_requests_are_refused(name, options, message):
    with pytest.raises(SinkEvalError, match=message):
        make_plan(name, options, _stats(SINK), [_stats(SINK)])


def test_per_prompt_policies_need_the_prompts_statistics():
    with pytest.raises(SinkEvalError, match="needs the prompt's own attention statistics"):
        make_plan("oracle", PolicyOptions(), None)


def test_a_calibration_set_overlapping_the_evaluation_set_is_refused():
    a, b = Prompt("a", "prose", "one text"), Prompt("b", "prose", "another text")
    check_disjoint([a], [b])
    with pytest.raises(SinkEvalError, match="overlap"):
        check_disjoint([a], [b, a])
    with pytest.raises(SinkEvalError, match="overlap"):
        check_disjoint([a], [Prompt("c", "prose", "one text")])


def test_the_cli_offers_exactly_the_policies_there_are():
    assert POLICY_NAMES == POLICIES
