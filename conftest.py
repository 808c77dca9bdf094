"""Test harness wiring: an offline environment, and real models loaded once per session."""

from __future__ import annotations

import os

# Set before transformers or huggingface_hub is imported anywhere: tests never reach a hub.
os.environ["HF_HUB_OFFLINE"] = "1"
os.environ["HF_DATASETS_OFFLINE"] = "1"
os.environ["TRANSFORMERS_OFFLINE"] = "1"

import gc  # noqa: E402

import pytest  # noqa: E402

# Smallest first. The test session holds one of them at a time (`bundled_model`), and the tests that take one as a
# parameter run grouped by model (`pytest_collection_modifyitems`), so each loads once per run.
REAL_MODELS = ("smollm2-135m", "gemma3-270m", "qwen2.5-coder-0.5b", "qwen2.5-coder-1.5b")
# CI-sized analysis: the 1.5B's prompts of more than 512 tokens (4 of the 88, but about half the set's tokens and most
# of its attention work) would cost CI about 10 minutes, so the suite checks it on the others. Its run on the whole
# set is committed as `<model>-full.json` and checked by `pytest -m analysis -k qwen2.5-coder-1.5b --full-prompt-set`.
CI_PROMPT_TOKENS = {"qwen2.5-coder-1.5b": 512}


REWRITTEN: list[str] = []  # baselines rewritten by --update-baselines in this session


def pytest_terminal_summary(terminalreporter) -> None:
    """Under --update-baselines the band tests compare each measurement with itself: say so, file by file."""
    if REWRITTEN:
        terminalreporter.section("baselines rewritten, not checked")
        for path in REWRITTEN:
            terminalreporter.write_line(f"{path}: rewritten from this run; its band tests passed by construction")


def pytest_addoption(parser):
    parser.addoption(
        "--update-baselines",
        action="store_true",
        help="re-measure and rewrite baselines/ (with provenance) instead of checking; prints what changed",
    )
    parser.addoption(
        "--full-prompt-set",
        action="store_true",
        help=f"analyse every model on the whole default prompt set (CI cuts {', '.join(CI_PROMPT_TOKENS)}'s), "
        "against the <model>-full.json baselines",
    )


def analysis_baseline_name(pytestconfig, model: str) -> str:
    """The analysis baseline file's stem: the model's name, with "-full" when a CI-cut model runs the whole set."""
    full = model in CI_PROMPT_TOKENS and pytestconfig.getoption("--full-prompt-set")
    return f"{model}-full" if full else model


def _real_model_of(item: pytest.Item) -> str | None:
    callspec = getattr(item, "callspec", None)
    params = callspec.params.values() if callspec is not None else ()
    return next((value for value in params if isinstance(value, str) and value in REAL_MODELS), None)


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """Run the tests parametrised by a real model grouped by that model, in REAL_MODELS order, after the rest
    (a stable sort: the order within each group is the collected one)."""
    items.sort(key=lambda item: -1 if (model := _real_model_of(item)) is None else REAL_MODELS.index(model))


@pytest.fixture(scope="session")
def bundled_model():
    """`bundled_model(name)` -> LoadedModel: the real model `name`, loaded (converted if need be) when first asked
    for. Only one is held at a time: asking for another releases the previous one first (the 1.5B alone takes 6 GB
    in float32), so a session never holds two large models."""
    from sink_eval.models.load import load_model

    held: dict = {}

    def get(name: str):
        if name not in held:
            held.clear()
            gc.collect()
            held[name] = load_model(name)
        return held[name]

    return get


@pytest.fixture(scope="session")
def probed(bundled_model):
    """`probed(name, prompts)` -> the `ProbedPrompt` of each `TokenizedPrompt` on the real model `name`, each prompt
    probed once a session: the analysis bands and the eval tests' calibration share them."""
    from sink_eval.measure.probe import probe_prompts

    done: dict = {}

    def get(name: str, prompts: list) -> list:
        def key(p) -> tuple:
            return name, p.prompt.id, tuple(p.input_ids)

        todo = [p for p in prompts if key(p) not in done]
        for probed_prompt in probe_prompts(bundled_model(name), todo, progress=False):
            done[key(probed_prompt.prompt)] = probed_prompt
        return [done[key(p)] for p in prompts]

    return get


def ci_cut(name: str, prompts: list) -> list:
    """The prompts CI analyses `name` on: those of at most CI_PROMPT_TOKENS[name] tokens (all, for the others)."""
    limit = CI_PROMPT_TOKENS.get(name)
    return [p for p in prompts if limit is None or len(p.input_ids) <= limit]


@pytest.fixture(scope="session")
def analysis_result(bundled_model, probed, pytestconfig):
    """`analysis_result(name)` -> the `AnalysisResult` of the default prompt set (a CI-cut model's prompts of at
    most CI_PROMPT_TOKENS tokens, unless --full-prompt-set) at the default thresholds, once a session per model."""
    from sink_eval.analyses.analyze import results
    from sink_eval.measure.sinks import DEFAULT_THRESHOLDS
    from sink_eval.prompts.prompt_set import default_prompts, tokenize

    computed = {}

    def get(name: str):
        if name not in computed:
            loaded = bundled_model(name)
            prompts = tokenize(loaded.tokenizer, default_prompts())
            command = "pytest -m analysis"
            if analysis_baseline_name(pytestconfig, name) == name:
                prompts = ci_cut(name, prompts)
            else:
                command += " --full-prompt-set"
            computed[name] = results(loaded, probed(name, prompts), DEFAULT_THRESHOLDS, command=command)
        return computed[name]

    return get


def checked_baseline(pytestconfig, path, measured, kind):
    """The baseline stored at `path`, checked to be comparable with `measured` (this run's measurement as a baseline);
    with --update-baselines it is first rewritten from `measured`, and what changed is printed."""
    from sink_eval import baselines
    from sink_eval.core.errors import SinkEvalError

    if pytestconfig.getoption("--update-baselines"):
        try:
            old = baselines.read_baseline(path, kind)
        except SinkEvalError:  # none yet, or one of an older schema: nothing to diff against
            old = None
        baselines.write_baseline(path, measured)
        REWRITTEN.append(str(path))
        reporter = pytestconfig.pluginmanager.get_plugin("terminalreporter")
        reporter.write_line(f"\n{path} (rewritten, not checked):\n{baselines.diff(old, measured)}")
    stored = baselines.read_baseline(path, kind)
    baselines.check_comparable(measured, stored, path, kind.identity)
    return stored
