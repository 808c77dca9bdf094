"""Test harness wiring: an offline environment, and real models loaded once per session."""

from __future__ import annotations

import os

# Set before transformers or huggingface_hub is imported anywhere: tests never reach a hub.
os.environ["HF_HUB_OFFLINE"] = "1"
os.environ["HF_DATASETS_OFFLINE"] = "1"
os.environ["TRANSFORMERS_OFFLINE"] = "1"

import pytest  # noqa: E402

REAL_MODELS = ("smollm2-135m", "gemma3-270m")


def pytest_addoption(parser):
    parser.addoption(
        "--update-baselines",
        action="store_true",
        help="re-measure and rewrite baselines/ (with provenance) instead of checking; prints what changed",
    )


@pytest.fixture(scope="session")
def bundled_model():
    """`bundled_model(name)` -> LoadedModel: each real model loaded (converted if need be) once."""
    from sink_eval.models import load_model

    loaded = {}

    def get(name: str):
        if name not in loaded:
            loaded[name] = load_model(name)
        return loaded[name]

    return get


@pytest.fixture(scope="session")
def analysis_result(bundled_model):
    """`analysis_result(name)` -> the `AnalysisResult` of the default prompt set at the default thresholds, once a
    session per model. With --update-baselines the model's baseline file is rewritten from it first."""
    from sink_eval.analysis import probe_prompts, results
    from sink_eval.prompts import default_prompts, tokenize
    from sink_eval.sinks import DEFAULT_THRESHOLDS

    computed = {}

    def get(name: str) -> dict:
        if name not in computed:
            loaded = bundled_model(name)
            probed = probe_prompts(loaded, tokenize(loaded.tokenizer, default_prompts()), progress=False)
            computed[name] = results(loaded, probed, DEFAULT_THRESHOLDS, command="pytest -m analysis")
        return computed[name]

    return get


def checked_baseline(pytestconfig, path, measured, kind):
    """The baseline stored at `path`, checked to be comparable with `measured` (this run's measurement as a baseline);
    with --update-baselines it is first rewritten from `measured`, and what changed is printed."""
    from sink_eval import baselines
    from sink_eval.errors import SinkEvalError

    if pytestconfig.getoption("--update-baselines"):
        try:
            old = baselines.read_baseline(path, kind)
        except SinkEvalError:  # none yet, or one of an older schema: nothing to diff against
            old = None
        baselines.write_baseline(path, measured)
        reporter = pytestconfig.pluginmanager.get_plugin("terminalreporter")
        reporter.write_line(f"\n{path}:\n{baselines.diff(old, measured)}")
    stored = baselines.read_baseline(path, kind)
    baselines.check_comparable(measured, stored, path, kind.identity)
    return stored
