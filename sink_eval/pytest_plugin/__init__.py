"""sink_eval as a pytest plugin (entry point `pytest11`: "sink_eval.pytest_plugin"): a project holds its own models'
sink figures, patch fidelity and accuracy to baselines it commits, in its own CI.

What a test session gets:
- the markers analysis, eval, longctx, patch, bench and gpu;
- the options --update-baselines (re-measure and rewrite the baseline files; each is reported as rewritten, not
  checked), --sink-model M (check M instead of the configured models; repeat for several) and --full-prompt-set;
- the session fixtures of `sink_eval.pytest_plugin.fixtures` (`sink_model`, `sink_probed`, `sink_analysis`,
  `sink_eval_result`, `sink_longctx_result`, `sink_same_weights`, `sink_baseline`): one model held at a time;
- the ready-made checks of `sink_eval.pytest_plugin.checks`, run on each configured model (the `sink_model_name`
  parameter), which a project collects by importing them into a test module (`sink-eval init` writes one) and
  turns on in `[tool.sink_eval] checks` (`sink_eval.pytest_plugin.config`).
A project without `[tool.sink_eval]` gets the markers and the options, nothing else. The configuration is read and
checked as the session starts: a bad table is a one-line usage error.
"""

from __future__ import annotations

import os

import pytest

from sink_eval.core.errors import SinkEvalError
from sink_eval.pytest_plugin.config import CHECKS, SinkConfig, read_config, slug
from sink_eval.pytest_plugin.fixtures import (
    CONFIG,
    REWRITTEN,
    sink_analysis,
    sink_baseline,
    sink_config,
    sink_eval_result,
    sink_longctx_result,
    sink_model,
    sink_probed,
    sink_same_weights,
)

__all__ = [
    "sink_analysis",
    "sink_baseline",
    "sink_config",
    "sink_eval_result",
    "sink_longctx_result",
    "sink_model",
    "sink_probed",
    "sink_same_weights",
]

MARKERS = {
    "analysis": "sink figures of a real model held to baselines/analysis",
    "eval": "lm-evaluation-harness accuracy of a real model held to baselines/eval",
    "longctx": "long-context passkey and perplexity of a real model held to baselines/longctx",
    "patch": "plans on a real model: an empty plan changes nothing, each fast patch equals its reference",
    "bench": "pytest-benchmark speed gates",
    "gpu": "needs CUDA; skipped where there is none",
}


def pytest_addoption(parser: pytest.Parser) -> None:
    group = parser.getgroup("sink_eval")
    group.addoption(
        "--update-baselines",
        action="store_true",
        help="re-measure and rewrite the baseline files (with provenance) instead of checking; prints what changed",
    )
    group.addoption(
        "--sink-model",
        action="append",
        metavar="MODEL",
        help="check MODEL (zoo name, checkpoint directory or cached hub id) instead of [tool.sink_eval] models",
    )
    group.addoption(
        "--full-prompt-set",
        action="store_true",
        help="analyse every prompt, also of a model with max_prompt_tokens, against its <model>-full.json baseline",
    )


@pytest.hookimpl(tryfirst=True)
def pytest_load_initial_conftests(early_config: pytest.Config) -> None:
    """Read `[tool.sink_eval]` before any conftest imports a model library, and go offline where it says so."""
    try:
        config = read_config(early_config.rootpath)
    except SinkEvalError as err:
        raise pytest.UsageError(str(err)) from None
    early_config.stash[CONFIG] = config
    if config is not None and config.offline:
        for name in ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE", "TRANSFORMERS_OFFLINE"):
            os.environ[name] = "1"


def pytest_configure(config: pytest.Config) -> None:
    for name, what in MARKERS.items():
        config.addinivalue_line("markers", f"{name}: {what}")


def _check_of(metafunc: pytest.Metafunc) -> str | None:
    return next((m.name for m in metafunc.definition.iter_markers() if m.name in CHECKS), None)


def pytest_generate_tests(metafunc: pytest.Metafunc) -> None:
    """Run a test that takes `sink_model_name` on each model of its check (every configured model for a test of no
    check); --sink-model replaces them. A check that the configuration leaves off is skipped, saying so."""
    if "sink_model_name" not in metafunc.fixturenames:
        return
    config: SinkConfig | None = metafunc.config.stash.get(CONFIG, None)
    check = _check_of(metafunc)
    chosen = metafunc.config.getoption("--sink-model")
    if chosen:
        models = list(chosen)
    elif config is None:
        reason = "no [tool.sink_eval] table in pyproject.toml: `sink-eval init` writes one"
        metafunc.parametrize("sink_model_name", [pytest.param(None, marks=pytest.mark.skip(reason=reason))])
        return
    else:
        models = config.models_of(check) if check is not None else config.models
    if not models:
        reason = f"the {check} check is off: add it to [tool.sink_eval] checks"
        metafunc.parametrize("sink_model_name", [pytest.param(None, marks=pytest.mark.skip(reason=reason))])
        return
    metafunc.parametrize("sink_model_name", models, ids=[slug(m) for m in models])


def _model_of(item: pytest.Item) -> str | None:
    callspec = getattr(item, "callspec", None)
    return None if callspec is None else callspec.params.get("sink_model_name")


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """Run the tests of each model together, in the configured order, after the others (a stable sort), so that
    each model loads once a session."""
    sink = config.stash.get(CONFIG, None)
    order = list(config.getoption("--sink-model") or (sink.models if sink is not None else []))

    def rank(item: pytest.Item) -> int:
        model = _model_of(item)
        return -1 if model is None else order.index(model) if model in order else len(order)

    items.sort(key=rank)


def pytest_terminal_summary(terminalreporter: pytest.TerminalReporter, config: pytest.Config) -> None:
    """Under --update-baselines a band test compares a measurement with itself: say so, file by file, with what
    changed."""
    rewritten = config.stash.get(REWRITTEN, {})
    if rewritten:
        terminalreporter.section("baselines rewritten, not checked")
        for path, changed in rewritten.items():
            terminalreporter.write_line(f"{path}: rewritten from this run; its band tests passed by construction")
            terminalreporter.write_line("  " + changed.replace("\n", "\n  "))
