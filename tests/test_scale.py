"""`sink-eval scale`: the arithmetic of its claims and domains, its input checks and its output directory.

The results here are synthetic (sink scores chosen or drawn in the test, summarised by `analysis.summarize`): they
pin the arithmetic and the rules, never a finding about a model.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import pytest
import torch

from sink_eval import cli
from sink_eval.analyses.analyze import AnalysisResult, ProbedPrompt, PromptRecord, Settings, stored_stats, summarize
from sink_eval.analyses.scale import (
    CONTRADICTED,
    LONG_ONLY,
    NOT_DISTINGUISHABLE,
    NOT_REPRODUCED,
    NOT_SUPPORTED,
    REPRODUCED,
    SHORT_ONLY,
    SUPPORTED,
    UNDEFINED,
    Difference,
    ScaleInput,
    ScaleResult,
    ShortLongClaim,
    compared_domains,
    domain_threshold,
    layer_thirds,
    middle_claim,
    model_scale,
    read_inputs,
    scale,
    short_long_claim,
    short_long_verdict,
    sink_maps,
    size_claim,
    two_se_verdict,
)
from sink_eval.core.results import ModelInfo, provenance
from sink_eval.prompts.prompt_set import LENGTH_BINS, Prompt, TokenizedPrompt
from sink_eval.reports.scale import scale_report

LAYERS, HEADS = 6, 4


def _result(
    name: str,
    sink: torch.Tensor,
    n_tokens: list[int],
    domains: list[str] | None = None,
    thresholds: tuple[float, ...] = (0.8, 0.3),
    prompt_set: str = "set-a",
) -> AnalysisResult:
    """A result of `name` whose prompt i has the (layers, heads) sink scores sink[i] (none when one token)."""

    def scores(i: int) -> list[list[float | None]]:
        if n_tokens[i] < 2:
            return [[None] * sink.shape[2] for _ in range(sink.shape[1])]
        return [[round(v, 6) for v in row] for row in sink[i].tolist()]

    zeros = [[0.0] * sink.shape[2] for _ in range(sink.shape[1])]
    domains = domains or ["prose"] * len(n_tokens)
    records = [
        PromptRecord(f"p{i}", domains[i], f"sha{i}", n_tokens[i], scores(i), zeros, zeros) for i in range(len(n_tokens))
    ]
    probed = [ProbedPrompt(TokenizedPrompt(Prompt(r.id, r.domain, ""), []), stored_stats(r)) for r in records]
    return AnalysisResult(
        model=ModelInfo(name, f"test:{name}", sink.shape[1], sink.shape[2], 1, "float32"),
        settings=Settings(list(thresholds), False, True, [list(b) for b in LENGTH_BINS], prompt_set, 4096, []),
        prompts=records,
        summary=summarize(probed, thresholds),
        layer_correlation=None,
        provenance=provenance("test"),
    )


def _input(res: AnalysisResult) -> ScaleInput:
    return ScaleInput(Path(res.model.name), res, "0" * 64)


def _scores(prevalence: list[float], seed: int = 0) -> torch.Tensor:
    """(prompts, LAYERS, HEADS) scores: on prompt i, each head is a sink (0.9) with probability prevalence[i]."""
    gen = torch.Generator().manual_seed(seed)
    draws = torch.rand((len(prevalence), LAYERS, HEADS), generator=gen)
    return torch.where(draws < torch.tensor(prevalence).view(-1, 1, 1), 0.9, 0.1)


# ---- the 2-SE rule and the claims


@pytest.mark.parametrize(
    "value, se, verdict",
    [
        (0.3, 0.1, SUPPORTED),
        (-0.3, 0.1, CONTRADICTED),
        (0.2, 0.1, NOT_DISTINGUISHABLE),  # exactly 2 SE is not beyond it
        (0.1, 0.1, NOT_DISTINGUISHABLE),
        (0.0, 0.0, NOT_DISTINGUISHABLE),
        (None, 0.1, UNDEFINED),
        (0.3, None, UNDEFINED),
    ],
)
def test_the_two_se_rule(value, se, verdict):
    assert two_se_verdict(Difference(value, se)) == verdict


def _qwen_pair(small: float, large: float) -> list[ScaleInput]:
    lengths = [20] * 12
    return [
        _input(_result("qwen2.5-coder-0.5b", _scores([small] * 12, seed=1), lengths)),
        _input(_result("qwen2.5-coder-1.5b", _scores([large] * 12, seed=2), lengths)),
    ]


def test_a_smaller_model_with_more_sinks_supports_the_size_claim_and_one_with_fewer_contradicts_it():
    (pair,) = size_claim(_qwen_pair(0.6, 0.2), 0.8).within_family
    assert (pair.smaller, pair.larger, pair.n_prompts) == ("qwen2.5-coder-0.5b", "qwen2.5-coder-1.5b", 12)
    assert pair.difference.value == pytest.approx(pair.smaller_prevalence - pair.larger_prevalence)
    assert pair.difference.value > 0.3 and pair.verdict == SUPPORTED
    (pair,) = size_claim(_qwen_pair(0.2, 0.6), 0.8).within_family
    assert pair.verdict == CONTRADICTED


def test_a_size_gap_carried_by_one_domain_is_not_distinguishable():
    """12 prompts alike in both models, 4 code prompts where the smaller has far more sinks: the gap exceeds 2 SE
    over all prompts, and vanishes with code left out."""
    lengths, domains = [20] * 16, ["prose"] * 12 + ["code"] * 4
    small = _result("qwen2.5-coder-0.5b", _scores([0.3] * 12 + [0.9] * 4, seed=1), lengths, domains)
    large = _result("qwen2.5-coder-1.5b", _scores([0.3] * 12 + [0.1] * 4, seed=1), lengths, domains)
    (pair,) = size_claim([_input(small), _input(large)], 0.8).within_family
    assert two_se_verdict(pair.difference) == SUPPORTED
    without_code = next(lo for lo in pair.left_out if lo.domain == "code")
    assert without_code.n_prompts == 12 and two_se_verdict(without_code.difference) != SUPPORTED
    assert pair.verdict == NOT_DISTINGUISHABLE


def test_the_size_difference_is_paired_by_prompt_so_a_shared_prompt_effect_cancels():
    """Prompts differ widely in prevalence, alike in both models: the paired SE is far below the unpaired one."""
    prevalence = [0.1, 0.9] * 8
    lengths = [20] * 16
    small = _result("qwen2.5-coder-0.5b", _scores(prevalence, seed=1), lengths)
    large = _result("qwen2.5-coder-1.5b", _scores([p - 0.05 for p in prevalence], seed=2), lengths)
    (pair,) = size_claim([_input(small), _input(large)], 0.8).within_family
    unpaired = (small.at(0.8).all.prevalence_se ** 2 + large.at(0.8).all.prevalence_se ** 2) ** 0.5
    assert pair.difference.se < unpaired / 3


def test_a_prompt_trivial_in_one_model_leaves_the_size_pair():
    sink = _scores([0.5] * 6)
    small = _result("qwen2.5-coder-0.5b", sink, [1, 20, 20, 20, 20, 20])
    large = _result("qwen2.5-coder-1.5b", sink, [20] * 6)
    (pair,) = size_claim([_input(small), _input(large)], 0.8).within_family
    assert pair.n_prompts == 5 and pair.difference.value == pytest.approx(0.0)


def test_across_families_models_are_ordered_by_size_and_an_unknown_model_is_left_out():
    lengths = [20] * 6
    inputs = [
        _input(_result(name, _scores([p] * 6, seed=i), lengths))
        for i, (name, p) in enumerate(
            [("gemma3-270m", 0.4), ("my-model", 0.9), ("smollm2-135m", 0.6), ("qwen2.5-coder-0.5b", 0.2)]
        )
    ]
    claim = size_claim(inputs, 0.8)
    across = claim.across_families
    assert across.models == ["smollm2-135m", "gemma3-270m", "qwen2.5-coder-0.5b"]
    assert across.params == [135_000_000, 270_000_000, 494_000_000]
    assert across.not_sized == ["my-model"] and across.spearman == pytest.approx(-1.0)
    assert claim.within_family == []


def test_a_model_outside_the_size_table_is_named_as_left_out_in_the_report():
    inputs = [
        _input(_result(name, _scores([0.5] * 6, seed=i), [20] * 6)) for i, name in enumerate(["gemma3-270m", "mine"])
    ]
    report = scale_report(scale(inputs), "figure.png")
    assert "Not in the size table, so left out of the size claim: mine." in report
    assert "not in the size table: left out" in report


@pytest.mark.parametrize("layers, sizes", [(30, [10, 10, 10]), (28, [10, 9, 9]), (18, [6, 6, 6]), (24, [8, 8, 8])])
def test_layers_are_cut_in_thirds_by_relative_depth(layers, sizes):
    thirds = layer_thirds(layers)
    assert [thirds.count(t) for t in range(3)] == sizes and thirds == sorted(thirds)


def _by_layer(pattern: list[float], prompts: int = 10, seed: int = 0) -> torch.Tensor:
    """Scores where a head of layer l is a sink with probability pattern[l]."""
    gen = torch.Generator().manual_seed(seed)
    draws = torch.rand((prompts, len(pattern), HEADS), generator=gen)
    return torch.where(draws < torch.tensor(pattern).view(1, -1, 1), 0.9, 0.1)


@pytest.mark.parametrize(
    "pattern, verdict",
    [
        ([0.1, 0.1, 0.9, 0.9, 0.1, 0.1], SUPPORTED),
        ([0.1, 0.1, 0.5, 0.5, 0.9, 0.9], CONTRADICTED),
        ([0.9, 0.9, 0.5, 0.5, 0.1, 0.1], CONTRADICTED),
        ([0.1, 0.1, 0.2, 1.0, 0.7, 0.7], NOT_DISTINGUISHABLE),  # the last third holds more, but the peak is middle
        ([0.5] * 6, NOT_DISTINGUISHABLE),
    ],
)
def test_the_middle_layers_claim_compares_the_middle_third_with_each_of_the_others(pattern, verdict):
    sink = _by_layer(pattern, prompts=40) if verdict != NOT_DISTINGUISHABLE else torch.full((40, 6, HEADS), 0.9)
    res = _result("m", sink, [20] * 40)
    claim = middle_claim(res, sink_maps(res, 0.8), 0.8)
    assert claim.verdict == verdict
    assert claim.middle_minus_first.value == pytest.approx(claim.middle - claim.first)
    assert claim.max_relative_depth == claim.max_layer / 6


def test_a_head_sink_on_nine_of_ten_prompts_is_consistent_and_on_eight_is_not():
    sink = torch.full((10, LAYERS, HEADS), 0.1)
    sink[:9, 2, 1] = 0.9
    sink[:8, 4, 3] = 0.9
    scaled = model_scale(_input(_result("m", sink, [20] * 10)))
    assert [(h.layer, h.head) for h in scaled.at(0.8).consistent_heads] == [(2, 1)]
    assert scaled.consistent.n_consistent == 1


def test_the_consistent_heads_claim_needs_a_head_that_resampling_the_prompts_keeps():
    """A head sinking on 9 of 10 prompts is consistent, but a resample drawing the tenth prompt twice unmakes it
    (about a quarter of resamples): not supported. One sinking on all 20 stays consistent in every resample."""
    sink = torch.full((10, LAYERS, HEADS), 0.1)
    sink[:9, 2, 1] = 0.9
    claim = model_scale(_input(_result("m", sink, [20] * 10))).consistent
    assert claim.n_consistent == 1 and claim.robust_share is not None and claim.robust_share < 0.9
    assert claim.verdict == NOT_SUPPORTED
    sink = torch.full((20, LAYERS, HEADS), 0.1)
    sink[:, 2, 1] = 0.9
    claim = model_scale(_input(_result("m", sink, [20] * 20))).consistent
    assert (claim.n_consistent, claim.robust_share, claim.verdict) == (1, 1.0, SUPPORTED)


def _short_long(short: float, short_se: float, long: float, long_se: float) -> ShortLongClaim:
    diff = Difference(short - long, (short_se**2 + long_se**2) ** 0.5)
    return ShortLongClaim(0.8, "1-3", 8, short, short_se, 10, 50, long, long_se, diff, UNDEFINED)


@pytest.mark.parametrize(
    "values, verdict",
    [
        ((0.71, 0.02, 0.33, 0.01), REPRODUCED),
        ((0.80, 0.025, 0.37, 0.01), REPRODUCED),  # both 2-SE intervals just reach the notes' ranges
        ((0.715, 0.022, 0.165, 0.016), SHORT_ONLY),  # SmolLM2's figures: short > long, but 10+ far below 30 %
        ((0.50, 0.02, 0.33, 0.03), LONG_ONLY),
        ((0.50, 0.02, 0.45, 0.03), NOT_REPRODUCED),
        ((0.90, 0.02, 0.20, 0.01), NOT_REPRODUCED),  # short > long by 35 SE: a direction, neither figure
    ],
)
def test_the_short_vs_long_claim(values, verdict):
    assert short_long_verdict(_short_long(*values)) == verdict


def test_the_short_vs_long_claim_reads_the_summary_bin_and_pools_prompts_of_ten_or_more_tokens():
    lengths = [1, 2, 3, 3, 5, 9, 10, 30, 300]
    res = _result("m", _scores([0.7, 0.7, 0.7, 0.7, 0.5, 0.5, 0.3, 0.3, 0.3], seed=4), lengths)
    claim = short_long_claim(res, sink_maps(res, 0.8), 0.8)
    short = res.at(0.8).group("1-3")
    assert (claim.short, claim.short_se, claim.short_n) == (short.prevalence, short.prevalence_se, 3)
    assert claim.long_n == 3
    long = sink_maps(res, 0.8).per_prompt()[-3:].mean()
    assert claim.long == pytest.approx(float(long))


# ---- domains, length-matched


def _domains_result(cells: dict[tuple[str, int], list[float]], seed: int = 0, **kwargs) -> AnalysisResult:
    """A result with one prompt per value in cells[(domain, n_tokens)], each of that prevalence."""
    domains, lengths, prevalence = [], [], []
    for (domain, n), values in cells.items():
        for p in values:
            domains.append(domain)
            lengths.append(n)
            prevalence.append(p)
    return _result("m", _scores(prevalence, seed), lengths, domains, **kwargs)


def test_domains_are_compared_only_within_the_bins_both_populate():
    """Code has more sinks pooled only because more of its prompts are short; within each bin it equals prose."""
    res = _domains_result(
        {
            ("prose", 5): [0.6] * 2,
            ("prose", 60): [0.1] * 6,
            ("code", 5): [0.6] * 6,
            ("code", 60): [0.1] * 2,
            ("code", 12): [0.9] * 3,  # a bin prose lacks: left out
            ("short", 2): [0.9] * 3,  # a length bin, not a domain: never compared
        }
    )
    stats = domain_threshold(res, sink_maps(res, 0.8), 0.8)
    assert stats.shared_bins == ["4-9", "50-199"] and stats.bin_weights == [0.5, 0.5]
    assert [v.domain for v in stats.domains] == ["prose", "code"] and compared_domains(res) == ["prose", "code"]
    assert {c.domain for c in stats.cells} == {"prose", "code", "short"}
    (contrast,) = stats.contrasts
    assert abs(contrast.prevalence.value) < 0.08 and contrast.prevalence.se > 0
    pooled = {d: sum(c.prevalence * c.n_prompts for c in stats.cells if c.domain == d) for d in ("prose", "code")}
    assert pooled["code"] / 11 - pooled["prose"] / 8 > 0.2  # what a comparison without length matching would say


def test_a_cell_of_one_prompt_keeps_its_bin_out_of_the_length_matching():
    res = _domains_result({("prose", 5): [0.5] * 3, ("code", 5): [0.5] * 3, ("prose", 60): [0.1], ("code", 60): [0.1]})
    stats = domain_threshold(res, sink_maps(res, 0.8), 0.8)
    assert stats.shared_bins == ["4-9"]
    assert {(c.domain, c.tokens): c.n_prompts for c in stats.cells}[("prose", "50-199")] == 1


def test_heads_that_sink_on_every_code_prompt_make_code_more_predictable_than_prose():
    code = torch.full((12, LAYERS, HEADS), 0.1)
    code[:, :3, :] = 0.9  # the same 12 heads on every prompt
    prose = _scores([0.5] * 12, seed=5)  # half the heads, a different half on each prompt
    lengths = [5] * 6 + [30] * 6
    res = _result("m", torch.cat([prose, code]), lengths * 2, ["prose"] * 12 + ["code"] * 12)
    (contrast,) = domain_threshold(res, sink_maps(res, 0.8), 0.8).contrasts
    assert contrast.top_consistency.value > 0.3 and contrast.verdict == SUPPORTED
    assert contrast.n_consistent.value == 12 and contrast.n_consistent_verdict == SUPPORTED


def test_without_prose_no_domain_contrast_is_drawn():
    res = _domains_result({("code", 5): [0.5] * 3, ("qa", 5): [0.5] * 3})
    stats = domain_threshold(res, sink_maps(res, 0.8), 0.8)
    assert [v.domain for v in stats.domains] == ["code", "qa"] and stats.contrasts == []


# ---- the result and its report


def test_prevalence_by_bin_is_each_results_own_summary_as_stored():
    res = _result("smollm2-135m", _scores([0.5] * 8), [5] * 4 + [30] * 4)
    summary = res.at(0.8)
    summary.bins[1] = dataclasses.replace(summary.bins[1], prevalence=0.123456, prevalence_se=0.0101)
    stats = model_scale(_input(res)).at(0.8)
    assert (stats.group("4-9").prevalence, stats.group("4-9").prevalence_se) == (0.123456, 0.0101)
    assert stats.per_layer_prevalence == summary.all.per_layer_prevalence
    assert stats.relative_depth == [layer / LAYERS for layer in range(LAYERS)]


def test_the_scale_result_round_trips_through_json_and_the_report_quotes_every_rule():
    inputs = [
        _input(_result(name, _scores([0.6, 0.4, 0.2] * 4, seed=i), [2, 5, 30] * 4))
        for i, name in enumerate(["qwen2.5-coder-0.5b", "qwen2.5-coder-1.5b"])
    ]
    res = scale(inputs, "test")
    data = json.loads(json.dumps(res.to_json()))
    assert data["schema"] == "sink_eval.scale/2"
    assert ScaleResult.from_json(data, "test") == res
    report = scale_report(res, "figure.png")
    for rule in ("larger models have fewer sink heads", "middle layers hold the most sinks", "consistently sinks"):
        assert rule in report
    assert "short prompts ~71 %" in report and "more predictable than prose" in report


# ---- the command: inputs checked, output directory


def _write(tmp_path: Path, res: AnalysisResult, name: str | None = None) -> Path:
    directory = tmp_path / (name or res.model.name)
    directory.mkdir()
    (directory / "results.json").write_text(json.dumps(res.to_json()))
    return directory


@pytest.fixture
def two_dirs(tmp_path) -> list[Path]:
    lengths = [2, 3, 5, 8, 12, 30, 60, 300] * 2
    return [
        _write(tmp_path, _result(name, _scores([0.7, 0.7, 0.5, 0.5, 0.3, 0.2, 0.1, 0.05] * 2, seed=i), lengths))
        for i, name in enumerate(["smollm2-135m", "gemma3-270m"])
    ]


def test_scale_writes_results_report_and_figure_into_a_marked_output_directory(tmp_path, two_dirs, capsys):
    out = tmp_path / "scale"
    assert cli.main(["scale", *map(str, two_dirs), "--out", str(out)]) == 0
    assert "(b) middle layers hold the most sinks" in capsys.readouterr().out
    assert sorted(p.name for p in out.iterdir()) == [
        ".sink_eval-output.json",
        "per_layer_prevalence.png",
        "report.md",
        "results.json",
    ]
    res = ScaleResult.from_json(json.loads((out / "results.json").read_text()), out)
    assert [m.name for m in res.models] == ["smollm2-135m", "gemma3-270m"]
    assert "![per-layer prevalence against relative depth](per_layer_prevalence.png)" in (out / "report.md").read_text()
    assert cli.main(["scale", *map(str, two_dirs), "--out", str(out)]) == 2
    assert "already exists" in capsys.readouterr().err
    assert cli.main(["scale", *map(str, two_dirs), "--out", str(out), "--overwrite"]) == 0


def test_scale_never_writes_over_one_of_its_inputs(two_dirs, capsys):
    assert cli.main(["scale", *map(str, two_dirs), "--out", str(two_dirs[0]), "--overwrite"]) == 2
    assert "holds the input" in capsys.readouterr().err


def _one_line_error(args: list[str], capsys) -> str:
    assert cli.main(["scale", *args, "--json"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "Traceback" not in err
    return err


def test_scale_of_one_directory_is_refused(two_dirs, capsys):
    assert "at least two" in _one_line_error([str(two_dirs[0])], capsys)


def test_scale_of_a_directory_without_results_is_refused(tmp_path, two_dirs, capsys):
    (tmp_path / "empty").mkdir()
    err = _one_line_error([str(two_dirs[0]), str(tmp_path / "empty")], capsys)
    assert "no file at" in err and "sink-eval analyze" in err


def test_scale_of_different_prompt_sets_is_refused(tmp_path, two_dirs, capsys):
    other = _write(tmp_path, _result("qwen2.5-coder-0.5b", _scores([0.5] * 4), [5] * 4, prompt_set="set-b"))
    err = _one_line_error([str(two_dirs[0]), str(other)], capsys)
    assert "different prompt sets" in err and "same --prompts" in err


def test_scale_of_different_thresholds_is_refused(tmp_path, two_dirs, capsys):
    res = _result("qwen2.5-coder-0.5b", _scores([0.5] * 16), [2, 3, 5, 8, 12, 30, 60, 300] * 2, thresholds=(0.8,))
    err = _one_line_error([str(two_dirs[0]), str(_write(tmp_path, res))], capsys)
    assert "different thresholds" in err and "--threshold" in err


def test_scale_without_the_claims_threshold_is_refused(tmp_path, capsys):
    dirs = [
        _write(tmp_path, _result(name, _scores([0.5] * 4), [5] * 4, thresholds=(0.5,)))
        for name in ("smollm2-135m", "gemma3-270m")
    ]
    assert "tau = 0.8" in _one_line_error([str(d) for d in dirs], capsys)


def test_scale_of_one_model_twice_is_refused(tmp_path, two_dirs, capsys):
    again = tmp_path / "again"
    again.mkdir()
    (again / "results.json").write_text((two_dirs[0] / "results.json").read_text())
    err = _one_line_error([str(two_dirs[0]), str(again)], capsys)
    assert "both of model 'smollm2-135m'" in err


def test_read_inputs_keeps_the_order_given(two_dirs):
    assert [i.result.model.name for i in read_inputs(two_dirs[::-1])] == ["gemma3-270m", "smollm2-135m"]
