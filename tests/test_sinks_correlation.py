"""The metric definitions of sinks.py and correlation.py, on hand-made sink maps."""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from sink_eval.measure.correlation import consistency, first_layer_agreement, layer_correlation, spearman
from sink_eval.measure.sinks import HEAD_CLASSES, head_classes, sink_heads, threshold_for, uniform_first_token_mass


def test_uniform_first_token_mass_is_one_half_for_two_tokens_and_vanishes_with_length():
    assert uniform_first_token_mass(2) == 0.5
    assert uniform_first_token_mass(3) == pytest.approx((1 / 2 + 1 / 3) / 2)
    assert uniform_first_token_mass(4096) < 0.003
    assert math.isnan(uniform_first_token_mass(1))


def test_chance_corrected_threshold_asks_for_tau_beyond_uniform_attention():
    assert threshold_for(0.8, 2, chance_corrected=True) == pytest.approx(0.9)
    assert threshold_for(0.8, 2) == 0.8
    assert threshold_for(0.8, 100_000, chance_corrected=True) == pytest.approx(0.8, abs=1e-3)


def test_nan_scores_of_trivial_prompts_are_never_sinks():
    assert not sink_heads(torch.tensor([[float("nan"), 0.9]]), 0.8)[0, 0]
    assert sink_heads(torch.tensor([[0.8]]), 0.8)[0, 0], "the threshold is inclusive: score >= tau"


def test_head_classes_follow_sink_self_previous_precedence():
    sink = torch.tensor([[0.9, 0.1, 0.1, 0.1]])
    self_ = torch.tensor([[0.9, 0.9, 0.1, 0.1]])
    prev = torch.tensor([[0.9, 0.9, 0.9, 0.1]])
    assert [HEAD_CLASSES[i] for i in head_classes(sink, self_, prev, 0.8)[0]] == ["sink", "self", "previous", "mixed"]


def test_first_layer_agreement_counts_later_layers_of_layer0_sink_heads_against_base_rate():
    # one prompt, 3 layers x 2 heads; head 0 is a sink in layer 0 and in layer 2 only; head 1 sinks in layer 1
    sinks = torch.tensor([[[True, False], [False, True], [True, False]]])
    result = first_layer_agreement(sinks)
    assert result.agreement == 0.5  # head 0: sink in 1 of 2 later layers
    assert result.base_rate == 0.5  # 2 sinks among 4 later (layer, head) pairs
    assert result.lift == 1.0
    assert result.recall == 0.5  # of the 2 later sinks, 1 sits on a layer-0 sink head
    assert result.prompts_with_layer0_sink == 1


def test_first_layer_agreement_is_undefined_without_a_layer0_sink():
    result = first_layer_agreement(torch.tensor([[[False, False], [True, True]]]))
    assert result.agreement is None and result.lift is None and result.base_rate == 1.0


def test_consistency_is_the_fraction_of_prompts_where_a_head_is_a_sink():
    sinks = torch.tensor([[[True, False]], [[True, True]], [[False, False]], [[True, False]]])
    torch.testing.assert_close(consistency(sinks), torch.tensor([[0.75, 0.25]]))


def test_layer_correlation_is_one_on_the_diagonal_and_sign_of_linear_relation():
    base = torch.rand(5, 1, 4, generator=torch.Generator().manual_seed(0))
    scores = torch.cat([base, 2 * base + 1, -base], dim=1)
    corr = layer_correlation(scores)
    torch.testing.assert_close(torch.diagonal(corr), torch.ones(3))
    assert corr[0, 1] == pytest.approx(1.0, abs=1e-5) and corr[0, 2] == pytest.approx(-1.0, abs=1e-5)


@given(st.lists(st.integers(-1000, 1000), min_size=3, max_size=30, unique=True))
def test_spearman_is_one_for_any_increasing_transform(xs):
    x = torch.tensor(xs, dtype=torch.float64)
    assert spearman(x, x**3) == pytest.approx(1.0)
    assert spearman(x, -x) == pytest.approx(-1.0)


def test_spearman_averages_tied_ranks_and_is_undefined_for_few_or_constant_points():
    assert spearman(torch.tensor([1.0, 2.0, 2.0, 3.0]), torch.tensor([1.0, 2.0, 3.0, 4.0])) == pytest.approx(
        0.9486833, abs=1e-6
    )
    assert spearman(torch.tensor([1.0, 2.0]), torch.tensor([2.0, 1.0])) is None
    assert spearman(torch.tensor([1.0, 1.0, 1.0]), torch.tensor([1.0, 2.0, 3.0])) is None
