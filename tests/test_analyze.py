"""`sink-eval analyze` / `compare`, prompt files and baselines: the happy path on a tiny model, and every bad input."""

from __future__ import annotations

import dataclasses
import hashlib
import json
from pathlib import Path

import pytest
from helpers import read_committed_baseline

from sink_eval import baselines, cli
from sink_eval.analyses.analyze import AnalysisResult
from sink_eval.core.errors import SinkEvalError
from sink_eval.core.files import write_dir_atomically
from sink_eval.policies.base import check_disjoint
from sink_eval.prompts.prompt_set import (
    Prompt,
    default_prompts,
    default_split,
    long_passages,
    prompt_set_sha256,
    read_prompt_file,
    tokenize,
)


def _prompt_file(tmp_path, lines: list[str]):
    path = tmp_path / "prompts.jsonl"
    path.write_text("\n".join(lines) + "\n")
    return path


@pytest.fixture
def prompts_file(tmp_path):
    texts = ["Hi", "The cat sat on the mat.", "def f(x):\n    return x + 1\n" * 4, "A"]
    return _prompt_file(tmp_path, [json.dumps({"text": t, "domain": "test"}) for t in texts])


def _analyze(tmp_path, prompts_file, *extra, out: str = "out") -> AnalysisResult:
    out = tmp_path / out
    assert (
        cli.main(["analyze", "--model", "tiny-llama", "--prompts", str(prompts_file), "--out", str(out), *extra]) == 0
    )
    return AnalysisResult.read(out)


def test_analyze_writes_results_report_and_figures(tmp_path, prompts_file):
    res = _analyze(tmp_path, prompts_file, "--threshold", "0.5")
    assert json.loads((tmp_path / "out" / "results.json").read_text())["schema"] == "sink_eval.results/2"
    assert [p.id for p in res.prompts] == ["prompts-1", "prompts-2", "prompts-3", "prompts-4"]
    assert res.model.fingerprint.startswith("tiny-sha256:")
    assert len(res.prompts[1].sink_score) == 4 and len(res.prompts[1].sink_score[0]) == 4
    assert res.settings.thresholds == [0.5] and [s.threshold for s in res.summary] == [0.5]
    assert (
        res.settings.truncated == []
        and "No prompt was longer than max_tokens = 4096" in (tmp_path / "out" / "report.md").read_text()
    )
    out = tmp_path / "out"
    assert {"sink_heatmap.png", "prevalence_vs_length.png", "per_layer_prevalence.png"} <= {
        p.name for p in out.iterdir()
    }
    report = (out / "report.md").read_text().splitlines()
    assert report[0].startswith("# ") and report[2].startswith("![")
    assert "original research notes" in (out / "report.md").read_text()


def test_analyze_json_prints_the_results_to_stdout_without_writing_files(tmp_path, prompts_file, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert cli.main(["analyze", "--model", "tiny-llama", "--prompts", str(prompts_file), "--json"]) == 0
    res = AnalysisResult.from_json(json.loads(capsys.readouterr().out), "stdout")
    assert len(res.prompts) == 4
    assert sorted(p.name for p in tmp_path.iterdir()) == ["prompts.jsonl"]


def test_one_token_prompt_is_reported_as_trivial(tmp_path, prompts_file):
    res = _analyze(tmp_path, prompts_file)
    one = next(p for p in res.prompts if p.n_tokens == 1)
    assert all(v is None for row in one.sink_score for v in row)
    assert res.at(0.8).group("1-3").n_trivial == 1


def test_existing_output_directory_is_never_overwritten_silently(tmp_path, prompts_file, capsys):
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "keep.txt").write_text("mine")
    assert (
        cli.main(["analyze", "--model", "tiny-llama", "--prompts", str(prompts_file), "--out", str(tmp_path / "out")])
        == 2
    )
    assert "already exists" in capsys.readouterr().err
    assert (tmp_path / "out" / "keep.txt").read_text() == "mine"
    (tmp_path / "out" / "keep.txt").unlink()
    _analyze(tmp_path, prompts_file, "--overwrite")
    (tmp_path / "out" / "report.md").write_text("old")
    _analyze(tmp_path, prompts_file, "--overwrite")
    assert (tmp_path / "out" / "report.md").read_text() != "old"


def test_interrupted_write_leaves_no_half_written_output(tmp_path):
    def fill(tmp):
        (tmp / "results.json").write_text("{")
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        write_dir_atomically(tmp_path / "out", fill)
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize(
    ("lines", "message"),
    [
        (['{"text": "ok"}', "{not json"], "line 2: not valid JSON"),
        (['{"id": "a"}'], 'line 1: each line needs a string field "text"'),
        (['{"text": "  "}'], "line 1: the prompt text is empty"),
        (['{"text": "a", "id": "x"}', '{"text": "b", "id": "x"}'], "line 2: duplicate id 'x'"),
        (["", "  "], "has no prompts"),
    ],
)
def test_malformed_prompt_file_error_names_the_line(tmp_path, lines, message):
    with pytest.raises(SinkEvalError, match=message):
        read_prompt_file(_prompt_file(tmp_path, lines))


def test_missing_prompt_file_is_a_clear_error(tmp_path):
    with pytest.raises(SinkEvalError, match="cannot read prompt file"):
        read_prompt_file(tmp_path / "nope.jsonl")


def test_empty_prompt_is_refused():
    from sink_eval.models.load import load_model

    with pytest.raises(SinkEvalError, match="is empty"):
        tokenize(load_model("tiny-llama").tokenizer, [Prompt("e", "d", "")])


def test_prompt_longer_than_max_tokens_is_an_error_unless_truncated(tmp_path, capsys):
    from sink_eval.models.load import load_model

    tok = load_model("tiny-llama").tokenizer
    long = [Prompt("long", "d", "x" * 50)]
    with pytest.raises(SinkEvalError, match="has 50 tokens, more than --max-tokens 20.*--truncate"):
        tokenize(tok, long, max_tokens=20)
    (cut,) = tokenize(tok, long, max_tokens=20, truncate=True)
    assert len(cut.input_ids) == 20 and cut.truncated_from == 50


def test_truncated_prompts_are_recorded_in_results_and_report(tmp_path, prompts_file):
    res = _analyze(tmp_path, prompts_file, "--max-tokens", "40", "--truncate")
    assert res.settings.max_tokens == 40
    assert [(t.id, t.original_tokens > 40) for t in res.settings.truncated] == [("prompts-3", True)]
    assert max(p.n_tokens for p in res.prompts) == 40
    original = res.settings.truncated[0].original_tokens
    report = (tmp_path / "out" / "report.md").read_text()
    assert f"1 prompts were cut to their first max_tokens = 40 tokens: `prompts-3` ({original} tokens)" in report


def test_max_tokens_beyond_the_model_context_is_refused(tmp_path, prompts_file, capsys):
    args = ["analyze", "--model", "tiny-llama", "--prompts", str(prompts_file), "--json", "--max-tokens", "100000"]
    assert cli.main(args) == 2
    assert "exceeds tiny-llama's context of 4096 tokens" in capsys.readouterr().err


# The committed default prompt set (sink_eval/prompts/data/prompts.jsonl): a change of any prompt changes every
# baseline.
DEFAULT_PROMPT_SET_SHA256 = "7b195b66c57f6bf7c2932f3a6bda6418c8288ae4603f9b4d9205f5056603c6cd"


def test_the_default_prompt_set_is_the_committed_one():
    assert prompt_set_sha256(default_prompts()) == DEFAULT_PROMPT_SET_SHA256


def test_the_default_prompt_set_file_matches_its_provenance_record():
    data = Path(__file__).resolve().parents[1] / "sink_eval" / "prompts" / "data"
    provenance = json.loads((data / "prompts.provenance.json").read_text())
    assert hashlib.sha256((data / "prompts.jsonl").read_bytes()).hexdigest() == provenance["sha256"]
    calibration, evaluation = default_split()
    counts = {"calibration": len(calibration), "evaluation": len(evaluation), "long": len(long_passages())}
    assert provenance["counts"] == counts
    assert all(source["sha256"] and source["licence"] for source in provenance["sources"])


def test_default_prompt_set_is_real_text_covering_every_domain():
    prompts = default_prompts()
    assert {p.domain for p in prompts} == {"arithmetic", "code", "prose", "qa", "short"}
    assert len({p.id for p in prompts}) == len(prompts)
    assert any("def " in p.text for p in prompts if p.domain == "code")
    assert all("=" in p.text for p in prompts if p.domain == "arithmetic")


def test_the_default_split_is_disjoint_and_spans_every_domain():
    calibration, evaluation = default_split()
    check_disjoint(calibration, evaluation)
    assert {p.domain for p in calibration} == {p.domain for p in evaluation}
    assert not {p.id for p in long_passages()} & {p.id for p in calibration + evaluation}


def test_the_long_passages_are_four_prose_and_four_code_of_at_least_24k_characters():
    passages = long_passages()
    assert sorted(p.domain for p in passages) == ["code"] * 4 + ["prose"] * 4
    assert min(len(p.text) for p in passages) >= 24_000


def test_the_long_passages_split_into_disjoint_halves_each_with_prose_and_code():
    calibration, evaluation = long_passages("calibration"), long_passages("evaluation")
    assert [p.id for p in calibration] == ["long-prose-0", "long-prose-1", "long-code-0", "long-code-1"]
    assert [p.id for p in evaluation] == ["long-prose-2", "long-prose-3", "long-code-2", "long-code-3"]
    check_disjoint(calibration, evaluation)
    assert sorted(p.domain for p in calibration) == sorted(p.domain for p in evaluation) == ["code"] * 2 + ["prose"] * 2
    assert sorted(p.id for p in calibration + evaluation) == sorted(p.id for p in long_passages())
    with pytest.raises(SinkEvalError, match="calibration or evaluation, not 'train'"):
        long_passages("train")


def test_compare_refuses_results_of_another_schema(tmp_path, prompts_file, capsys):
    _analyze(tmp_path, prompts_file)
    other = tmp_path / "other"
    other.mkdir()
    (other / "results.json").write_text(json.dumps({"schema": "sink_eval.results/0"}))
    assert cli.main(["compare", str(tmp_path / "out"), str(other), "--out", str(tmp_path / "cmp")]) == 2
    assert "schema 'sink_eval.results/0'" in capsys.readouterr().err
    assert not (tmp_path / "cmp").exists()


def test_compare_of_results_with_missing_sections_is_a_one_line_error(tmp_path, prompts_file, capsys):
    _analyze(tmp_path, prompts_file)
    data = json.loads((tmp_path / "out" / "results.json").read_text())
    del data["summary"][0]["bins"][2]["prevalence"]
    broken = tmp_path / "broken.json"
    broken.write_text(json.dumps(data))
    capsys.readouterr()
    assert cli.main(["compare", str(tmp_path / "out"), str(broken), "--out", str(tmp_path / "cmp")]) == 2
    err = capsys.readouterr().err
    assert err == f"sink-eval: error: {broken}: summary[0].bins[2].prevalence is missing\n"
    del data["summary"]
    broken.write_text(json.dumps(data))
    assert cli.main(["compare", str(tmp_path / "out"), str(broken), "--out", str(tmp_path / "cmp")]) == 2
    assert capsys.readouterr().err == f"sink-eval: error: {broken}: summary is missing\n"
    assert not (tmp_path / "cmp").exists()


def test_results_round_trip_through_json_unchanged(tmp_path, prompts_file):
    res = _analyze(tmp_path, prompts_file)
    assert AnalysisResult.from_json(json.loads(json.dumps(res.to_json())), "x") == res
    assert res.to_json() == json.loads((tmp_path / "out" / "results.json").read_text())


def test_a_missing_results_field_is_an_error_naming_file_and_field(tmp_path, prompts_file):
    _analyze(tmp_path, prompts_file)
    data = json.loads((tmp_path / "out" / "results.json").read_text())
    del data["prompts"][1]["n_tokens"]
    with pytest.raises(SinkEvalError, match=r"^runs/x/results.json: prompts\[1\]\.n_tokens is missing$"):
        AnalysisResult.from_json(data, "runs/x/results.json")


def test_a_mistyped_results_field_is_an_error_naming_file_and_field(tmp_path, prompts_file):
    _analyze(tmp_path, prompts_file)
    path = tmp_path / "out" / "results.json"
    data = json.loads(path.read_text())
    data["summary"][0]["all"]["prevalence"] = "high"
    path.write_text(json.dumps(data))
    with pytest.raises(
        SinkEvalError, match=rf"^{path}: summary\[0\]\.all\.prevalence should be a number or null, not a string$"
    ):
        AnalysisResult.read(tmp_path / "out")


def test_compare_of_different_prompt_sets_says_so_and_compares_the_shared_prompts(tmp_path, prompts_file):
    _analyze(tmp_path, prompts_file)
    lines = prompts_file.read_text().splitlines()
    other = tmp_path / "other.jsonl"
    # prompts-1 and prompts-2 keep their ids and texts; prompts-3 and prompts-4 are gone, x is new
    other.write_text(
        "\n".join(json.dumps(dict(json.loads(line), id=f"prompts-{i}")) for i, line in enumerate(lines[:2], 1))
        + "\n"
        + json.dumps({"text": "Something else entirely.", "id": "x"})
        + "\n"
    )
    _analyze(tmp_path, other, out="other")
    assert cli.main(["compare", str(tmp_path / "out"), str(tmp_path / "other"), "--out", str(tmp_path / "cmp")]) == 0
    text = (tmp_path / "cmp" / "compare.md").read_text()
    assert "The prompt sets differ" in text and "compared on the 2 prompts they share" in text
    assert "left out: 2 prompts only in out, 1 only in other" in text
    table = [line for line in text.splitlines() if line.startswith("| tau=")]
    assert all("+0.0" in line or "undefined" in line for line in table), table


def test_compare_of_prompt_sets_sharing_no_prompt_is_refused(tmp_path, prompts_file, capsys):
    _analyze(tmp_path, prompts_file)
    other = tmp_path / "other.jsonl"
    other.write_text(json.dumps({"text": "Nothing in common here.", "id": "prompts-1"}) + "\n")
    _analyze(tmp_path, other, out="other")
    assert cli.main(["compare", str(tmp_path / "out"), str(tmp_path / "other"), "--out", str(tmp_path / "cmp")]) == 2
    assert "different prompt sets that share no prompt" in capsys.readouterr().err


def test_compare_reports_the_difference_between_two_runs_that_differ(tmp_path, prompts_file):
    """A fixed and a length-dependent threshold give the same prompts other prevalences; compare.md's difference
    column is the second run's prevalence minus the first's, in points, for every (threshold, bin)."""
    fixed = _analyze(tmp_path, prompts_file, out="fixed")
    corrected = _analyze(tmp_path, prompts_file, "--chance-corrected", out="corrected")
    argv = ["compare", str(tmp_path / "fixed"), str(tmp_path / "corrected"), "--out", str(tmp_path / "cmp")]
    assert cli.main(argv) == 0
    text = (tmp_path / "cmp" / "compare.md").read_text()
    assert (tmp_path / "cmp" / "compare_prevalence.png").is_file()
    assert fixed.model.name in text and "Both on the same 4 prompts" in text
    rows = [line.split("|")[1:-1] for line in text.splitlines() if line.startswith("| tau=")]
    differences = {}
    for summary in fixed.summary:
        for group in summary.groups():
            other = corrected.at(summary.threshold).group(group.tokens)
            if group.prevalence is not None and other.prevalence is not None:
                differences[(summary.threshold, group.tokens)] = 100 * (other.prevalence - group.prevalence)
    assert any(abs(d) >= 0.05 for d in differences.values()), "the two runs do not differ"
    for (tau, tokens), difference in differences.items():
        row = next(r for r in rows if r[0].strip() == f"tau={tau:g}" and r[1].strip() == tokens)
        assert row[4].strip() == f"{difference:+.1f}"


def test_threshold_outside_zero_one_is_rejected_by_the_parser(capsys):
    with pytest.raises(SystemExit):
        cli.build_parser().parse_args(["analyze", "--threshold", "1.5", "--json"])
    assert "a threshold is a fraction of attention" in capsys.readouterr().err


@pytest.fixture
def analysis(tmp_path, prompts_file):
    return _analyze(tmp_path, prompts_file)


def test_a_baseline_round_trips_and_its_diff_and_bands_tell_another_run_apart(tmp_path, prompts_file, analysis):
    """Written and read back, a baseline is the same object; against a run with another threshold rule, `diff` lists
    exactly the values that changed, with both numbers, and a value just outside a band is reported as such."""
    path = tmp_path / "b.json"
    written = baselines.make_baseline(analysis, "test")
    baselines.write_baseline(path, written)
    baseline = baselines.read_baseline(path)
    assert baseline.checksum is not None and dataclasses.replace(baseline, checksum=None) == written
    assert baseline.sink_scores == {p.id: p.sink_score for p in analysis.prompts}
    baselines.check_comparable(baselines.make_baseline(analysis, "now"), baseline, path, baselines.ANALYSIS.identity)
    other = baselines.make_baseline(_analyze(tmp_path, prompts_file, "--chance-corrected", out="other"), "other")
    changed = {k for k, b in baseline.values.items() if b.value != other.values[k].value}
    lines = baselines.diff(baseline, other).splitlines()
    assert changed and {line.split(":")[0] for line in lines} == changed
    key, band = next((k, b) for k, b in baseline.values.items() if b.value is not None and b.hi is not None)
    assert baselines.outside_band(baselines.Measurement(band.hi, None), band) is None
    problem = baselines.outside_band(baselines.Measurement(band.hi + 1e-3, None), band)
    assert problem is not None and "outside the band" in problem


@pytest.mark.parametrize("name", ["smollm2-135m", "gemma3-270m"])
def test_the_committed_analysis_baselines_are_readable(name):
    path = Path(__file__).parents[1] / "baselines" / "analysis" / f"{name}.json"
    baseline = read_committed_baseline(path, baselines.ANALYSIS)
    assert baseline.values and len(baseline.sink_scores) == baseline.provenance.n_prompts


def _copied_baseline(tmp_path, analysis, edit) -> object:
    path = tmp_path / "b.json"
    baselines.write_baseline(path, baselines.make_baseline(analysis, "test"))
    data = json.loads(path.read_text())
    edit(data)
    path.write_text(json.dumps(data))
    return path


def test_a_widened_band_is_refused_as_hand_edited(tmp_path, analysis):
    key = "prevalence/tau=0.8/all"

    def widen(data):
        data["values"][key] |= {"lo": -100, "hi": 100}

    path = _copied_baseline(tmp_path, analysis, widen)
    with pytest.raises(
        SinkEvalError, match=rf"^baseline {path}: values\['{key}'\] has the band \[-100.0, 100.0\].*edited by hand"
    ):
        baselines.read_baseline(path)


def test_a_fraction_outside_zero_one_is_refused_as_hand_edited(tmp_path, analysis):
    key = "prevalence/tau=0.8/all"

    def inflate(data):
        data["values"][key] = {"value": 1.5, "se": 0.0, "lo": 1.49, "hi": 1.51}

    path = _copied_baseline(tmp_path, analysis, inflate)
    with pytest.raises(SinkEvalError, match=rf"values\['{key}'\]\.value 1.5 lies outside \[0, 1\]: edited by hand"):
        baselines.read_baseline(path)


@pytest.mark.parametrize("factor", [10.0, float("inf")])
def test_an_edited_se_is_refused_even_with_its_band_edited_to_match(tmp_path, analysis, factor):
    """A hand-widened SE, with lo and hi made to agree with it by the band rule, passes the band check: the checksum
    of the measured content refuses it."""
    key = "prevalence/tau=0.3/all"

    def widen(data):
        value, se = data["values"][key]["value"], data["values"][key]["se"] * factor
        half = max(2 * se, 0.01)
        data["values"][key] |= {"se": se, "lo": value - half, "hi": value + half}

    path = _copied_baseline(tmp_path, analysis, widen)
    with pytest.raises(SinkEvalError, match="does not match its checksum: a value, SE or band was edited by hand"):
        baselines.read_baseline(path)


def test_a_band_a_broken_model_would_pass_is_refused_with_the_count_it_needs(tmp_path, analysis):
    """The random tiny model has no sink at tau = 0.8 (a band at 0: no number of prompts helps) and few at 0.3 (a band
    around 0 over 4 prompts: the count that would exclude 0 is named)."""
    measured = baselines.make_baseline(analysis, "test")
    problems = baselines.undiscriminating(measured)
    assert any(p.startswith("prevalence/tau=0.8/all") and "no number of prompts" in p for p in problems)
    assert any(p.startswith("prevalence/tau=0.3/all") and "prompts or more (it has 4)" in p for p in problems)
    with pytest.raises(SinkEvalError, match="refused to write baseline"):
        baselines.check_discriminates(measured, tmp_path / "b.json")


def test_a_missing_or_mistyped_baseline_field_names_file_and_field(tmp_path, analysis):
    path = _copied_baseline(tmp_path, analysis, lambda data: data["provenance"].pop("prompt_set_sha256"))
    with pytest.raises(SinkEvalError, match=rf"^{path}: provenance.prompt_set_sha256 is missing; regenerate"):
        baselines.read_baseline(path)
    path = _copied_baseline(tmp_path, analysis, lambda data: data["model"].update(fingerprint=7))
    with pytest.raises(SinkEvalError, match=rf"^{path}: model.fingerprint should be a string, not an integer"):
        baselines.read_baseline(path)


@pytest.mark.parametrize(
    ("content", "message"),
    [
        ("{oops", "not valid JSON"),
        ('{"schema": "x"}', "has schema 'x', this sink_eval reads 'sink_eval.baseline/2'"),
        ('{"schema": "sink_eval.baseline/2", "values": {}}', "model is missing"),
        (
            '{"schema": "sink_eval.baseline/1", "values": {}}',
            "has schema 'sink_eval.baseline/1', this sink_eval reads 'sink_eval.baseline/2'; regenerate it from a "
            "measurement with `pytest -m analysis --update-baselines`$",
        ),
    ],
)
def test_malformed_baseline_is_a_clear_error(tmp_path, content, message):
    path = tmp_path / "b.json"
    path.write_text(content)
    with pytest.raises(SinkEvalError, match=message) as err:
        baselines.read_baseline(path)
    assert "\n" not in str(err.value)


def test_baseline_of_other_weights_or_prompts_is_refused(tmp_path, analysis):
    measured = baselines.make_baseline(analysis, "now")
    identity = baselines.ANALYSIS.identity
    baseline = baselines.make_baseline(analysis, "test")
    baseline.model.fingerprint = "gguf-sha256:other"
    with pytest.raises(SinkEvalError, match="not comparable.*pytest -m analysis --update-baselines"):
        baselines.check_comparable(measured, baseline, tmp_path / "b.json", identity)
    baseline = baselines.make_baseline(analysis, "test")
    baseline.provenance = dataclasses.replace(baseline.provenance, prompt_set_sha256="0" * 64)
    with pytest.raises(SinkEvalError, match="another prompt set"):
        baselines.check_comparable(measured, baseline, tmp_path / "b.json", identity)


def test_value_outside_band_or_newly_undefined_is_reported():
    expected = baselines.band(0.5, 0.01)
    assert baselines.outside_band(baselines.Measurement(0.515, None), expected) is None
    assert "outside the band" in baselines.outside_band(baselines.Measurement(0.53, None), expected)
    assert "undefined" in baselines.outside_band(baselines.Measurement(None, None), expected)
    assert baselines.outside_band(baselines.Measurement(None, None), baselines.band(None, None)) is None


STORED_SCORES = {"p1": [[0.9, 0.1], [0.5, 0.2]], "p2": [[0.3, 0.4], [0.6, 0.7]], "one-token": [[None, None]] * 2}


def _scores_with(edits: dict[tuple[str, int, int], float | None]) -> dict:
    scores = {prompt: [list(row) for row in rows] for prompt, rows in STORED_SCORES.items()}
    for (prompt, layer, head), value in edits.items():
        scores[prompt][layer][head] = value
    return scores


def test_a_sink_score_that_moved_beyond_the_tolerance_is_flagged_and_one_within_it_is_not():
    assert baselines.moved_prompts(_scores_with({}), STORED_SCORES) == []
    within = _scores_with({("p1", 1, 0): 0.5 + 0.5 * baselines.SINK_SCORE_TOLERANCE})
    assert baselines.moved_prompts(within, STORED_SCORES) == []
    beyond = _scores_with({("p1", 1, 0): 0.5003, ("p1", 0, 1): 0.1002, ("p2", 0, 0): 0.31})
    moved = baselines.moved_prompts(beyond, STORED_SCORES)
    assert [m.where for m in moved] == ["prompt p2 at L0.H0", "prompt p1 at L1.H0"]  # largest first, its worst head
    assert moved[1].delta == pytest.approx(3e-4) and (moved[1].stored, moved[1].measured) == (0.5, 0.5003)


def test_a_sink_score_undefined_on_one_side_or_a_prompt_absent_on_one_side_has_moved_infinitely():
    newly_defined = _scores_with({("one-token", 0, 0): 0.5})
    del newly_defined["p2"]
    moved = baselines.moved_prompts(newly_defined, STORED_SCORES)
    assert [m.where for m in moved] == [
        "prompt p2: 2 rows, 4 numbers in the baseline, absent now",
        "prompt one-token at L0.H0",
    ]
    assert all(m.delta == float("inf") for m in moved) and moved[1].measured == 0.5


def test_the_regression_message_names_what_moved_by_how_much_and_the_versions_then_and_now():
    moved = baselines.moved_prompts(_scores_with({("p1", 1, 0): 0.5003, ("p2", 0, 0): 0.31}), STORED_SCORES)
    then, now = {"torch": "2.13.0", "transformers": "5.24.0"}, {"torch": "2.13.0", "transformers": "5.25.0"}
    message = baselines.regression_message(
        baselines.ANALYSIS, "m sink scores", moved, baselines.SINK_SCORE_TOLERANCE, then, now, first=1
    )
    assert message.splitlines() == [
        "m sink scores: 2 moved by more than 0.0001 since the baseline run; the largest:",
        "  prompt p2 at L0.H0: 0.300000 -> 0.310000 (|Δ| 0.01)",
        "  ... and 1 more",
        "versions changed since the baseline run: transformers 5.24.0 -> 5.25.0",
        baselines.ANALYSIS.how,
    ]
    same = baselines.regression_message(baselines.ANALYSIS, "m", moved, 1e-4, then, then)
    assert "the same versions as the baseline run (torch 2.13.0, transformers 5.24.0)" in same
    assert "prompt p1 at L1.H0: 0.500000 -> 0.500300 (|Δ| 0.0003)" in same
