"""The CI-sized long-context case (`pytest -m longctx`): smollm2-135m at 1 024 tokens, the unpatched model and one
copy plan, passkey accuracy and one-pass perplexity held to the bands of `baselines/longctx/smollm2-135m.json`.

The copy plan is the eval baseline's calibrated p = 0.9, tau = 0.3 plan (`baselines/eval/smollm2-135m.json`,
provenance.plans): the plan whose accuracy cost that suite measures, read from its committed provenance rather than
re-calibrated here (calibration probes 46 prompts: most of this case's time budget). Beside the bands, a regression
check: every passage's mean token NLL within `baselines.LOGLIK_TOLERANCE` of the baseline run's. No warm-up call:
the speed-up is not held here (timings on shared CI cores are noise).
"""

from __future__ import annotations

import time
from pathlib import Path

import pytest

from conftest import checked_baseline
from sink_eval import baselines

pytestmark = pytest.mark.longctx

MODEL = "smollm2-135m"
LENGTH = 1024
DEPTHS = (0.1, 0.5, 0.9)
TRIALS = 2
PLAN = "calibrated p=0.9 tau=0.3"
ROOT = Path(__file__).resolve().parents[2] / "baselines"
COMMAND = "pytest -m longctx"


@pytest.fixture(scope="module")
def measured(bundled_model):
    from sink_eval.evals.longctx import NamedPlan, run
    from sink_eval.patches.copy import CopyPlan

    eval_baseline = baselines.read_eval_baseline(ROOT / "eval" / f"{MODEL}.json")
    heads = eval_baseline.provenance.plans[PLAN]["heads"]
    plan = CopyPlan.of({int(layer): h for layer, h in heads.items()})
    loaded = bundled_model(MODEL)
    start = time.perf_counter()
    plans = [NamedPlan(PLAN, "calibrated", plan)]
    res = run(loaded, plans, [LENGTH], DEPTHS, TRIALS, [], progress=False, command=COMMAND, warm_up=False)
    return res, baselines.make_longctx_baseline(res, COMMAND, time.perf_counter() - start)


def test_passkey_accuracy_and_perplexity_at_1k_hold_their_bands(measured, pytestconfig):
    res, measurement = measured
    path = ROOT / "longctx" / f"{MODEL}.json"
    stored = checked_baseline(pytestconfig, path, measurement, baselines.LONGCTX)
    assert isinstance(stored, baselines.LongctxBaseline)
    values = baselines.longctx_values(res)
    problems = {k: baselines.outside_band(values[k], band) for k, band in stored.values.items()}
    assert not {k: p for k, p in problems.items() if p}, problems


def test_every_passage_nll_equals_the_baseline_runs(measured, pytestconfig):
    _, measurement = measured
    stored = baselines.read_baseline(ROOT / "longctx" / f"{MODEL}.json", baselines.LONGCTX)
    assert isinstance(stored, baselines.LongctxBaseline)
    moved = [
        f"{label} L={length} passage {i}: {before:.6f} -> {now:.6f}"
        for label, by_length in stored.passage_nll.items()
        for length, nll in by_length.items()
        for i, (before, now) in enumerate(zip(nll, measurement.passage_nll[label][length], strict=True))
        if abs(before - now) > baselines.LOGLIK_TOLERANCE
    ]
    assert not moved, "\n".join(moved)
