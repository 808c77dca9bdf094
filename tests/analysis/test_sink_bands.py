"""Sink prevalence and first-layer agreement of the real models, held to the measured bands in baselines/analysis;
every prompt's per-head sink scores held to the baseline run's (the regression layer)."""

from __future__ import annotations

from pathlib import Path

import pytest

from conftest import REAL_MODELS, analysis_baseline_name, checked_baseline
from sink_eval import baselines
from sink_eval.analyses.analyze import AnalysisResult, bin_key, results
from sink_eval.measure.probe import probe_prompts
from sink_eval.measure.sinks import DEFAULT_THRESHOLDS
from sink_eval.prompts.prompt_set import LENGTH_BINS, Prompt, TokenizedPrompt

pytestmark = pytest.mark.analysis

BASELINE_DIR = Path(__file__).resolve().parents[2] / "baselines" / "analysis"
GROUPS = [bin_key(*b) for b in LENGTH_BINS] + ["all"]


@pytest.fixture(scope="module")
def baseline_for(analysis_result, pytestconfig):
    """The checked baseline of a model; with --update-baselines, rewritten from this run's measurement first."""
    loaded = {}

    def get(name: str) -> tuple[AnalysisResult, baselines.AnalysisBaseline]:
        res = analysis_result(name)
        path = BASELINE_DIR / f"{analysis_baseline_name(pytestconfig, name)}.json"
        if name not in loaded:
            measured = baselines.make_baseline(res, f"{res.provenance.command} --update-baselines")
            loaded[name] = checked_baseline(pytestconfig, path, measured, baselines.ANALYSIS)
        return res, loaded[name]

    return get


@pytest.mark.parametrize("group", GROUPS)
@pytest.mark.parametrize("tau", DEFAULT_THRESHOLDS)
@pytest.mark.parametrize("model", REAL_MODELS)
@pytest.mark.parametrize("metric", baselines.METRICS)
def test_measured_value_lies_in_its_baseline_band(baseline_for, model, tau, group, metric):
    res, baseline = baseline_for(model)
    key = baselines.value_key(metric, tau, group)
    measured = baselines.measured_values(res)[key]
    problem = baselines.outside_band(measured, baseline.values[key])
    assert problem is None, f"{model} {key}: {problem}"


def _all_none(scores: list[list[float | None]]) -> bool:
    return all(v is None for row in scores for v in row)


@pytest.mark.parametrize("model", REAL_MODELS)
def test_one_token_prompts_are_trivial_never_counted_as_sinks(bundled_model, analysis_result, model):
    """A hand-built one-token prompt, probed and summarised through the same path as the prompt set, has NaN scores
    (None in the JSON) and is counted trivial, while a two-token prompt beside it is scored; the prompt set's own
    one-token prompts, if it has any, have no scores either."""
    loaded = bundled_model(model)
    ids = loaded.tokenizer("The capital of France")["input_ids"]
    built = [TokenizedPrompt(Prompt(f"{n}-token", "test", "The capital of France"), ids[:n]) for n in (1, 2)]
    res = results(loaded, probe_prompts(loaded, built, progress=False), DEFAULT_THRESHOLDS)
    one, two = res.prompts
    assert (one.n_tokens, two.n_tokens) == (1, 2)
    assert _all_none(one.sink_score) and _all_none(one.self_score) and _all_none(one.prev_score)
    assert all(v is not None for row in two.sink_score for v in row)
    for tau in DEFAULT_THRESHOLDS:
        summary = res.at(tau)
        assert (summary.group("1-3").n_prompts, summary.group("1-3").n_trivial) == (2, 1)
        assert summary.all.n_trivial == 1
    assert all(_all_none(p.sink_score) for p in analysis_result(model).prompts if p.n_tokens == 1)


@pytest.mark.parametrize("model", REAL_MODELS)
def test_per_prompt_sink_scores_equal_the_baseline_run(baseline_for, model):
    """The regression layer: every head's sink score on every prompt is the baseline run's, to
    `SINK_SCORE_TOLERANCE` (the bands above would let a real change through)."""
    res, baseline = baseline_for(model)
    measured = {p.id: p.sink_score for p in res.prompts}
    moved = baselines.moved_prompts(measured, baseline.sink_scores)
    assert not moved, baselines.regression_message(
        baselines.ANALYSIS,
        f"{model} per-prompt sink scores",
        moved,
        baselines.SINK_SCORE_TOLERANCE,
        baseline.provenance.versions,
        res.provenance.versions,
    )
