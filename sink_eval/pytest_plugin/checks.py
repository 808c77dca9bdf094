"""The ready-made checks: a project collects them by importing them into one of its test modules
(`from sink_eval.pytest_plugin.checks import *`, as `sink-eval init` writes), and runs them on each configured
model with `pytest -m analysis` (or eval, longctx, patch). Each band check fails on any value outside its band;
each regression check fails on any per-prompt, per-request, per-passage or per-trial number that moved beyond
numerical noise since the baseline run, naming what moved. A baseline of other weights is refused by fingerprint
before any band is read."""

from __future__ import annotations

from typing import TYPE_CHECKING

import pytest

if TYPE_CHECKING:
    from sink_eval.analyses.analyze import AnalysisResult
    from sink_eval.baselines import AnalysisBaseline, EvalBaseline
    from sink_eval.evals.accuracy import EvalResult

__all__ = [
    "test_accuracy_lies_in_its_baseline_bands",
    "test_an_empty_plan_leaves_the_model_unchanged",
    "test_each_plans_fast_patch_equals_its_reference_on_real_text",
    "test_one_token_prompts_are_never_counted_as_sinks",
    "test_passkey_and_perplexity_lie_in_their_baseline_bands",
    "test_per_passage_nll_and_passkey_answers_equal_the_baseline_run",
    "test_per_prompt_sink_scores_equal_the_baseline_run",
    "test_per_request_loglikelihoods_equal_the_baseline_run",
    "test_sink_figures_lie_in_their_baseline_bands",
]


def _bands(measured: dict, stored: dict, model: str) -> None:
    """Fail on every measured value outside its stored band, and on a key missing on either side."""
    from sink_eval import baselines

    missing = sorted(set(stored) ^ set(measured))
    assert not missing, f"{model}: keys measured or stored on one side only: {missing[:5]}"
    problems = {k: baselines.outside_band(m, stored[k]) for k, m in measured.items()}
    failed = {k: p for k, p in problems.items() if p}
    assert not failed, f"{model}: " + "; ".join(f"{k}: {p}" for k, p in failed.items())


def _analysis(
    sink_model_name, sink_same_weights, sink_analysis, sink_baseline
) -> tuple[AnalysisResult, AnalysisBaseline]:
    """The model's analysis and its stored baseline, the weights checked first; measured as the baseline
    `--update-baselines` writes, with the command that writes it."""
    from sink_eval import baselines

    sink_same_weights(baselines.ANALYSIS, sink_model_name)
    res = sink_analysis(sink_model_name)
    measured = baselines.make_baseline(res, f"{res.provenance.command} --update-baselines")
    return res, sink_baseline(baselines.ANALYSIS, sink_model_name, measured)


@pytest.mark.analysis
def test_sink_figures_lie_in_their_baseline_bands(sink_model_name, sink_same_weights, sink_analysis, sink_baseline):
    """Sink prevalence and first-layer agreement, by length bin and threshold, each within value ± max(2 SE, 0.01)
    of the baseline run's."""
    from sink_eval import baselines

    res, stored = _analysis(sink_model_name, sink_same_weights, sink_analysis, sink_baseline)
    _bands(baselines.measured_values(res), stored.values, sink_model_name)


@pytest.mark.analysis
def test_per_prompt_sink_scores_equal_the_baseline_run(
    sink_model_name, sink_same_weights, sink_analysis, sink_baseline
):
    """The regression layer: every head's sink score on every prompt is the baseline run's, to
    `baselines.SINK_SCORE_TOLERANCE` (a band would let a real change through)."""
    from sink_eval import baselines

    res, stored = _analysis(sink_model_name, sink_same_weights, sink_analysis, sink_baseline)
    moved = baselines.moved_prompts({p.id: p.sink_score for p in res.prompts}, stored.sink_scores)
    assert not moved, baselines.regression_message(
        baselines.ANALYSIS,
        f"{sink_model_name} per-prompt sink scores",
        moved,
        baselines.SINK_SCORE_TOLERANCE,
        stored.provenance.versions,
        res.provenance.versions,
    )


@pytest.mark.analysis
def test_one_token_prompts_are_never_counted_as_sinks(sink_model_name, sink_model, sink_analysis):
    """A one-token prompt has no query to average over: its scores are undefined (null) and it is counted trivial,
    never as 100 % sinks, while a two-token prompt beside it is scored."""
    from sink_eval.analyses.analyze import results
    from sink_eval.measure.probe import probe_prompts
    from sink_eval.prompts.prompt_set import Prompt, TokenizedPrompt

    loaded = sink_model(sink_model_name)
    ids = loaded.tokenizer("The capital of France")["input_ids"]
    built = [TokenizedPrompt(Prompt(f"{n}-token", "test", "The capital of France"), ids[:n]) for n in (1, 2)]
    res = results(loaded, probe_prompts(loaded, built, progress=False), (0.8,))
    one, two = res.prompts
    assert all(v is None for row in one.sink_score for v in row)
    assert all(v is not None for row in two.sink_score for v in row)
    assert (res.at(0.8).group("1-3").n_prompts, res.at(0.8).group("1-3").n_trivial) == (2, 1)
    assert all(all(v is None for row in p.sink_score for v in row) for p in sink_analysis(sink_model_name).prompts
               if p.n_tokens == 1)  # fmt: skip


def _eval(sink_model_name, sink_same_weights, sink_eval_result, sink_baseline) -> tuple[EvalResult, EvalBaseline]:
    """The model's eval result and its stored baseline, the weights checked first."""
    from sink_eval import baselines

    sink_same_weights(baselines.EVAL, sink_model_name)
    res = sink_eval_result(sink_model_name)
    return res, sink_baseline(baselines.EVAL, sink_model_name, baselines.make_eval_baseline(res, "pytest -m eval"))


@pytest.mark.eval
def test_accuracy_lies_in_its_baseline_bands(sink_model_name, sink_same_weights, sink_eval_result, sink_baseline):
    """Unpatched accuracy per task within 2 lm-eval stderr of the baseline run's, and each policy's change against
    unpatched within 2 paired SE of the baseline's (bands that exclude chance: `baselines.undiscriminating`)."""
    from sink_eval import baselines

    res, stored = _eval(sink_model_name, sink_same_weights, sink_eval_result, sink_baseline)
    _bands(baselines.eval_values(res), stored.values, sink_model_name)


@pytest.mark.eval
def test_per_request_loglikelihoods_equal_the_baseline_run(
    sink_model_name, sink_same_weights, sink_eval_result, sink_baseline
):
    """The regression layer: every request's log-likelihood, of every run, is the baseline run's, to
    `baselines.LOGLIK_TOLERANCE`."""
    from sink_eval import baselines

    res, stored = _eval(sink_model_name, sink_same_weights, sink_eval_result, sink_baseline)
    for run in res.runs:
        moved = baselines.moved_requests({t: s.loglik for t, s in run.tasks.items()}, stored.loglik[run.label])
        assert not moved, baselines.regression_message(
            baselines.EVAL,
            f"{sink_model_name} {run.label} per-request log-likelihoods",
            moved,
            baselines.LOGLIK_TOLERANCE,
            stored.provenance.versions,
            res.provenance.versions,
        )


def _longctx(sink_model_name, sink_same_weights, sink_longctx_result, sink_baseline):
    from sink_eval import baselines

    sink_same_weights(baselines.LONGCTX, sink_model_name)
    res, wall_s = sink_longctx_result(sink_model_name)
    measured = baselines.make_longctx_baseline(res, "pytest -m longctx", wall_s)
    return res, measured, sink_baseline(baselines.LONGCTX, sink_model_name, measured)


@pytest.mark.longctx
def test_passkey_and_perplexity_lie_in_their_baseline_bands(
    sink_model_name, sink_same_weights, sink_longctx_result, sink_baseline
):
    """Passkey accuracy (informative cells) within 2 binomial SE, perplexity and each plan's perplexity ratio within
    2 delta-method SE of the baseline run's."""
    from sink_eval import baselines

    res, _, stored = _longctx(sink_model_name, sink_same_weights, sink_longctx_result, sink_baseline)
    _bands(baselines.longctx_values(res), stored.values, sink_model_name)


@pytest.mark.longctx
def test_per_passage_nll_and_passkey_answers_equal_the_baseline_run(
    sink_model_name, sink_same_weights, sink_longctx_result, sink_baseline
):
    """The regression layer: every passage's mean token NLL within `baselines.LOGLIK_TOLERANCE`, and every passkey
    trial's greedy answer exactly, of every run, as in the baseline run."""
    from sink_eval import baselines

    _, measured, stored = _longctx(sink_model_name, sink_same_weights, sink_longctx_result, sink_baseline)
    moved = [
        f"{label} L={length} passage {i}: {before:.6f} -> {now:.6f}"
        for label, by_length in stored.passage_nll.items()
        for length, nll in by_length.items()
        for i, (before, now) in enumerate(zip(nll, measured.passage_nll[label][length], strict=True))
        if abs(before - now) > baselines.LOGLIK_TOLERANCE
    ]
    moved += [
        f"{label} L={length} depth {cell.depth} trial {t}: {before!r} -> {now!r}"
        for label, by_length in stored.passkey.items()
        for length, cells in by_length.items()
        for cell, measured_cell in zip(cells, measured.passkey[label][length], strict=True)
        for t, (before, now) in enumerate(zip(cell.answers, measured_cell.answers, strict=True))
        if before != now
    ]
    assert not moved, f"{sink_model_name}: moved since the baseline run:\n" + "\n".join(moved)


def _real_text(loaded, tokens: int = 96):
    """The first `tokens` tokens of each long evaluation passage (real text, no padding): (ids (B, tokens))."""
    import torch

    from sink_eval.prompts.prompt_set import long_passages

    rows = [loaded.tokenizer(p.text)["input_ids"][:tokens] for p in long_passages("evaluation")[:2]]
    return torch.tensor(rows, device=next(loaded.model.parameters()).device)


@pytest.mark.patch
def test_an_empty_plan_leaves_the_model_unchanged(sink_model_name, sink_model):
    """Every plan kind with no head planned is the unpatched model, to the last bit."""
    import torch

    from sink_eval.patches.base import PLAN_KINDS

    loaded = sink_model(sink_model_name)
    ids = _real_text(loaded)
    with torch.no_grad():
        reference = loaded.model(input_ids=ids).logits
        for kind in PLAN_KINDS.values():
            with kind().patched(loaded.model):
                assert torch.equal(loaded.model(input_ids=ids).logits, reference), kind.kind


@pytest.mark.patch
def test_each_plans_fast_patch_equals_its_reference_on_real_text(sink_model_name, sink_model, sink_probed, sink_config):
    """Each configured policy's plan: its patch gives the logits of its plain masked eager reference
    (`Plan.reference`) on real text, to float noise (relative 1e-3 of the logits' scale)."""
    import torch

    from sink_eval.pytest_plugin.fixtures import calibrated_plans, policies

    loaded = sink_model(sink_model_name)
    ids = _real_text(loaded)
    chosen = policies(sink_config.patch.policies)
    for policy, plan in zip(chosen, calibrated_plans(loaded, sink_probed, sink_model_name, chosen), strict=True):
        with torch.no_grad():
            with plan.reference(loaded.model):
                expected = loaded.model(input_ids=ids).logits
            with plan.patched(loaded.model):
                out = loaded.model(input_ids=ids).logits
        scale = expected.abs().max()
        assert (out - expected).abs().max() <= 1e-3 * scale, f"{policy.label}: {(out - expected).abs().max():.3g}"
