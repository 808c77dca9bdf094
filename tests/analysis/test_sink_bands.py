"""Sink prevalence and first-layer agreement of the real models, held to the measured bands in baselines/analysis."""

from __future__ import annotations

from pathlib import Path

import pytest

from conftest import REAL_MODELS
from sink_eval import baselines
from sink_eval.analysis import AnalysisResult, bin_key
from sink_eval.errors import SinkEvalError
from sink_eval.prompts import LENGTH_BINS
from sink_eval.sinks import DEFAULT_THRESHOLDS

pytestmark = pytest.mark.analysis

BASELINE_DIR = Path(__file__).resolve().parents[2] / "baselines" / "analysis"
GROUPS = [bin_key(*b) for b in LENGTH_BINS] + ["all"]


@pytest.fixture(scope="module")
def baseline_for(analysis_result, pytestconfig):
    """The checked baseline of a model; with --update-baselines, rewritten from this run's measurement first."""
    loaded = {}

    def get(name: str) -> tuple[AnalysisResult, baselines.AnalysisBaseline]:
        res = analysis_result(name)
        path = BASELINE_DIR / f"{name}.json"
        if name not in loaded:
            measured = baselines.make_baseline(res, "pytest -m analysis --update-baselines")
            if pytestconfig.getoption("--update-baselines"):
                try:
                    old = baselines.read_baseline(path)
                except SinkEvalError:  # none yet, or one of an older schema: nothing to diff against
                    old = None
                baselines.write_baseline(path, measured)
                reporter = pytestconfig.pluginmanager.get_plugin("terminalreporter")
                reporter.write_line(f"\n{path}:\n{baselines.diff(old, measured)}")
            loaded[name] = baselines.read_baseline(path)
            baselines.check_comparable(measured, loaded[name], path, baselines.ANALYSIS.identity)
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


@pytest.mark.parametrize("model", REAL_MODELS)
def test_one_token_prompts_are_trivial_never_counted_as_sinks(analysis_result, model):
    res = analysis_result(model)
    one_token = [p for p in res.prompts if p.n_tokens == 1]
    assert all(all(v is None for row in p.sink_score for v in row) for p in one_token)
    trivial = res.at(0.8).group("1-3").n_trivial
    assert trivial == len(one_token)
