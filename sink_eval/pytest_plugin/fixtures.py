"""The plugin's session fixtures: one model held at a time, each prompt probed once, each measurement made once and
checked against (or, with --update-baselines, written to) its baseline. Heavy modules are imported inside the
fixtures, so that a test session that does not use them does not pay for them."""

from __future__ import annotations

import dataclasses
import gc
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from sink_eval.pytest_plugin.config import SinkConfig

REWRITTEN = pytest.StashKey[dict[str, str]]()  # path -> what changed, of the baselines rewritten in this session
CONFIG = pytest.StashKey["SinkConfig | None"]()


def session_config(config: pytest.Config) -> SinkConfig:
    """The project's `[tool.sink_eval]`; a test that needs it is skipped where the project has none."""
    found = config.stash.get(CONFIG, None)
    if found is None:
        pytest.skip("no [tool.sink_eval] table in pyproject.toml: `sink-eval init` writes one")
    return found


def full_prompt_set(config: pytest.Config, sink_config: SinkConfig, model: str) -> bool:
    """Whether `model` is analysed on every prompt although its config leaves long ones out (--full-prompt-set)."""
    return model in sink_config.analysis.max_prompt_tokens and bool(config.getoption("--full-prompt-set"))


@pytest.fixture(scope="session")
def sink_config(pytestconfig: pytest.Config) -> SinkConfig:
    return session_config(pytestconfig)


@pytest.fixture(scope="session")
def sink_model(sink_config: SinkConfig) -> Callable[[str], Any]:
    """`sink_model(name)` -> LoadedModel: model `name` (a `[tool.sink_eval] models` entry), loaded when first asked
    for. One is held at a time: asking for another releases the previous one first, so a session never holds two
    large models."""
    from sink_eval.models.load import load_model

    held: dict[str, Any] = {}

    def get(name: str) -> Any:
        if name not in held:
            held.clear()
            gc.collect()
            loaded = load_model(sink_config.model_path(name))
            loaded.spec = dataclasses.replace(loaded.spec, name=name)  # as configured, not the resolved path
            held[name] = loaded
        return held[name]

    return get


@pytest.fixture(scope="session")
def sink_probed(sink_model: Callable[[str], Any]) -> Callable[[str, list], list]:
    """`sink_probed(name, prompts)` -> the `ProbedPrompt` of each `TokenizedPrompt` on model `name`, each prompt probed
    once a session (the analysis, the eval calibration and the longctx calibration share them)."""
    from sink_eval.measure.probe import probe_prompts

    done: dict[tuple, Any] = {}

    def get(name: str, prompts: list) -> list:
        def key(p: Any) -> tuple:
            return name, p.prompt.id, tuple(p.input_ids)

        todo = [p for p in prompts if key(p) not in done]
        for probed_prompt in probe_prompts(sink_model(name), todo, progress=False):
            done[key(probed_prompt.prompt)] = probed_prompt
        return [done[key(p)] for p in prompts]

    return get


@pytest.fixture(scope="session")
def sink_analysis(sink_model, sink_probed, sink_config: SinkConfig, pytestconfig: pytest.Config):
    """`sink_analysis(name)` -> the `AnalysisResult` of the configured prompts (the committed set by default; a prompt
    longer than the model's context cut to it) at the configured thresholds; a model with `max_prompt_tokens` leaves its
    longer prompts out unless --full-prompt-set. Measured once a session per model."""
    from sink_eval.analyses.analyze import results
    from sink_eval.prompts.prompt_set import (
        DEFAULT_MAX_TOKENS,
        default_prompts,
        model_context,
        read_prompt_file,
        tokenize,
    )

    computed: dict[str, Any] = {}

    def get(name: str) -> Any:
        if name not in computed:
            loaded = sink_model(name)
            given = Path(sink_config.root) / sink_config.prompts if sink_config.prompts else None
            context = model_context(loaded.model) or DEFAULT_MAX_TOKENS
            texts = read_prompt_file(given) if given else default_prompts()
            prompts = tokenize(loaded.tokenizer, texts, context, truncate=True)  # longer than the context: cut to it
            command = "pytest -m analysis"
            limit = sink_config.analysis.max_prompt_tokens.get(name)
            if full_prompt_set(pytestconfig, sink_config, name):
                command += " --full-prompt-set"
            elif limit is not None:
                prompts = [p for p in prompts if len(p.input_ids) <= limit]
            thresholds = tuple(sink_config.thresholds)
            computed[name] = results(loaded, sink_probed(name, prompts), thresholds, command=command)
        return computed[name]

    return get


def policies(specs: list[dict[str, Any]]) -> list:
    """Policies from `{name = …, <option> = …}` entries of the configuration."""
    from sink_eval.policies.registry import make_policy

    return [make_policy(spec["name"], **{k: v for k, v in spec.items() if k != "name"}) for spec in specs]


def calibrated_plans(loaded: Any, probed: Callable[[str, list], list], name: str, chosen: list) -> list:
    """Each static policy's plan, calibrated on the default calibration prompts: from the session's probes where no
    policy needs streaming windows, else probed with their windows (`policies.calibration.static_plans`)."""
    from sink_eval.policies import calibration
    from sink_eval.policies.base import Target

    if any(p.windows for p in chosen):
        return calibration.static_plans(loaded, chosen, progress=False)
    stats = [p.stats for p in probed(name, calibration.default_calibration(loaded))]
    return [p.plan(Target.of(loaded.model, p.kind), None, stats) for p in chosen]


@pytest.fixture(scope="session")
def sink_eval_result(sink_model, sink_probed, sink_config: SinkConfig):
    """`sink_eval_result(name)` -> the `EvalResult` of the configured tasks, limit and policies (static plans
    calibrated on the session's probes), measured once a session per model."""
    from sink_eval.evals.accuracy import run_eval
    from sink_eval.policies.calibration import default_calibration

    computed: dict[str, Any] = {}

    def get(name: str) -> Any:
        if name not in computed:
            loaded = sink_model(name)
            chosen = policies(sink_config.eval.policies)
            stats = [p.stats for p in sink_probed(name, default_calibration(loaded))]
            tasks, limit = sink_config.eval.tasks_of(name), sink_config.eval.limit_of(name)
            computed[name] = run_eval(loaded, chosen, tasks, limit, command="pytest -m eval", calibration=stats)
        return computed[name]

    return get


@pytest.fixture(scope="session")
def sink_longctx_result(sink_model, sink_probed, sink_config: SinkConfig):
    """`sink_longctx_result(name)` -> (the `LongctxResult` of the unpatched model and each configured policy's
    plan at the configured lengths, depths and trials; its wall seconds), measured once a session per model. No
    controls and no warm-up: speed is not held here (timings on shared CI cores are noise)."""
    from sink_eval.evals.longctx import NamedPlan, check_static, run

    computed: dict[str, Any] = {}

    def get(name: str) -> Any:
        if name not in computed:
            loaded = sink_model(name)
            chosen = policies(sink_config.longctx.policies)
            check_static(chosen)
            plans = calibrated_plans(loaded, sink_probed, name, chosen)
            named = [NamedPlan(p.label, p.name, plan) for p, plan in zip(chosen, plans, strict=True)]
            c = sink_config.longctx
            start = time.perf_counter()
            res = run(loaded, named, c.lengths, c.depths, c.trials, [], progress=False, command="pytest -m longctx",
                      warm_up=False)  # fmt: skip
            computed[name] = res, time.perf_counter() - start
        return computed[name]

    return get


def _baseline_path(sink_config: SinkConfig, pytestconfig: pytest.Config, kind: Any, name: str) -> Path:
    """Where the baseline of `kind` for model `name` is stored (an analysis of the full prompt set: `<name>-full`)."""
    from sink_eval import baselines

    full = kind is baselines.ANALYSIS and full_prompt_set(pytestconfig, sink_config, name)
    return sink_config.baseline(kind.marker, name, "-full" if full else "")


@pytest.fixture(scope="session")
def sink_same_weights(sink_model, sink_config: SinkConfig, pytestconfig: pytest.Config):
    """`sink_same_weights(kind, name)`: fail at once where the stored baseline of `kind` for model `name` was measured
    on other weights than the loaded model's (named by fingerprint), so a swapped checkpoint costs a model load, not
    a measurement. Nothing to check under --update-baselines or where none is stored yet (`sink_baseline` says so)."""
    from sink_eval import baselines

    def check(kind: Any, name: str) -> None:
        path = _baseline_path(sink_config, pytestconfig, kind, name)
        if not pytestconfig.getoption("--update-baselines") and path.is_file():
            baselines.check_weights(baselines.read_baseline(path, kind), sink_model(name).fingerprint, path)

    return check


@pytest.fixture(scope="session")
def sink_baseline(sink_config: SinkConfig, pytestconfig: pytest.Config):
    """`sink_baseline(kind, name, measured)` -> the stored baseline of `kind` (`baselines.ANALYSIS`, `EVAL`,
    `LONGCTX`) for model `name`, checked to be comparable with `measured` (this run as a baseline: other weights are
    named first, by fingerprint); with --update-baselines it is first rewritten from `measured` (refused where a band
    could not fail on a broken model) and reported as rewritten, not checked."""
    from sink_eval import baselines
    from sink_eval.core.errors import SinkEvalError

    def get(kind: Any, name: str, measured: Any) -> Any:
        path = _baseline_path(sink_config, pytestconfig, kind, name)
        rewritten = pytestconfig.stash.setdefault(REWRITTEN, {})
        if pytestconfig.getoption("--update-baselines") and str(path) not in rewritten:
            try:
                old = baselines.read_baseline(path, kind)
            except SinkEvalError:  # none yet, or one of an older schema: nothing to diff against
                old = None
            baselines.check_discriminates(measured, path)
            baselines.write_baseline(path, measured)
            rewritten[str(path)] = baselines.diff(old, measured)
        stored = baselines.read_baseline(path, kind)
        baselines.check_comparable(measured, stored, path, kind.identity)
        return stored

    return get
