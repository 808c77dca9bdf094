"""`sink-eval patch-eval` on a tiny model: every policy gets a row with fidelity, speed and KV figures."""

from __future__ import annotations

import contextlib
import json
import re
from pathlib import Path

import pytest
import torch

from sink_eval import cli
from sink_eval.evals.patch_eval import PatchEvalResult, kl_and_top1
from sink_eval.patches.streaming.plan import streamed_share


def _jsonl(path, texts: list[str], prefix: str):
    path.write_text("".join(json.dumps({"id": f"{prefix}{i}", "text": t}) + "\n" for i, t in enumerate(texts)))
    return path


@pytest.fixture
def prompt_files(tmp_path):
    evaluation = ["The cat sat on the mat and looked at a bird.", "Hi", "def f(x):\n    return x * 2\n"]
    calibration = ["A quick brown fox jumps over the lazy dog again.", "Paris is the capital of France."]
    return _jsonl(tmp_path / "eval.jsonl", evaluation, "e"), _jsonl(tmp_path / "cal.jsonl", calibration, "c")


def _run(tmp_path, prompt_files, *extra) -> int:
    evaluation, calibration = prompt_files
    return cli.main(
        [
            "patch-eval",
            "--model",
            "tiny-llama",
            "--prompts",
            str(evaluation),
            "--calibration-prompts",
            str(calibration),
            "--speed-tokens",
            "32",
            "--speed-rounds",
            "1",
            "--generations",
            "2",
            "--new-tokens",
            "4",
            *extra,
        ]
    )


def test_patch_eval_writes_a_row_per_policy_with_fidelity_speed_and_kv(tmp_path, prompt_files):
    """The ceilings follow from the reported fraction f and share a: 1 / (1 - f a), and are exactly 1 where the plan
    copies nothing (the hybrid plan, limited to L = 16 tokens, never copies on the 32-token speed prompt). tau = 0.05
    makes the other plans copy heads of the random tiny model, which are no sinks (their attention is spread over the
    prompt): copying them changes the next-token distribution (KL > 0)."""
    out = tmp_path / "out"
    copy_options = ["--threshold", "0.05", "--consistency", "0.5", "--hybrid-max-tokens", "16"]
    assert _run(tmp_path, prompt_files, *copy_options, "--out", str(out)) == 0
    data = json.loads((out / "results.json").read_text())
    assert data["schema"] == "sink_eval.patch_eval/4"
    res = PatchEvalResult.from_json(data, out / "results.json")
    assert [row.policy for row in res.policies] == ["first_layer", "calibrated", "oracle", "hybrid"]
    for row in res.policies:
        f = row.fidelity
        assert 0 <= f.fraction_heads <= 1 and len(f.per_layer_fraction) == 4
        assert 0 <= f.top1 <= 1 and f.kl > -1e-6 and len(f.layer_error) == 4
        assert row.kv.unpatched_bytes > 0
        assert row.kv.saved_bytes == row.kv.unpatched_bytes - row.kv.patched_bytes
        if row.policy == "hybrid":
            assert row.ceilings.prefill == row.ceilings.decode == 1.0
            continue
        share = row.ceilings.plan_fraction
        assert row.ceilings.prefill == pytest.approx(1 / (1 - share * row.speed.prefill_share), rel=1e-12)
        removed = row.ceilings.decode_removed * row.speed.decode_share
        growth = row.ceilings.decode_groups_removed * row.speed.decode_growth_share
        assert row.ceilings.decode == pytest.approx(1 / (1 - removed - growth), rel=1e-12)
    assert any(row.ceilings.plan_fraction > 0 for row in res.policies), "no plan copied a head"
    assert all(row.fidelity.kl > 1e-3 for row in res.policies if row.fidelity.fraction_heads > 0)
    assert set(res.settings.calibration_prompts).isdisjoint(res.settings.evaluation_prompts)
    assert (out / "speedup_vs_fidelity.png").exists()
    assert "| policy" in (out / "report.md").read_text()
    assert PatchEvalResult.from_json(res.to_json(), "x") == res and res.to_json() == data
    for row in data["policies"]:  # the same run as a schema-3 file, whose decode ceilings counted attention alone
        del row["speed"]["decode_growth_share"], row["ceilings"]["decode_groups_removed"]
    older = PatchEvalResult.from_json({**data, "schema": "sink_eval.patch_eval/3"}, "x")
    assert [row.ceilings.decode for row in older.policies] == [row.ceilings.decode for row in res.policies]
    assert all(row.speed.decode_growth_share is row.ceilings.decode_groups_removed is None for row in older.policies)


def test_an_empty_plan_has_no_kl_and_full_top1_agreement(tmp_path, prompt_files, capsys):
    """tau = p = 1: no head of the random tiny model is a sink on every calibration prompt, so the calibrated plan is
    empty and its model is the unpatched one (KL against the probe's eager pass at the level of float noise)."""
    options = ["--policy", "calibrated", "--threshold", "1", "--consistency", "1"]
    assert _run(tmp_path, prompt_files, *options, "--json") == 0
    (row,) = json.loads(capsys.readouterr().out)["policies"]
    assert row["fidelity"]["fraction_heads"] == 0
    assert row["fidelity"]["kl"] < 1e-6 and row["fidelity"]["top1"] == 1.0 and row["greedy"]["agreement"] == 1.0


def test_patch_eval_refuses_overlapping_calibration_prompts(tmp_path, prompt_files, capsys):
    evaluation, _ = prompt_files
    assert _run(tmp_path, (evaluation, evaluation), "--json") == 2
    assert "overlap the evaluation prompts" in capsys.readouterr().err


def test_patch_eval_refuses_an_unknown_policy(capsys):
    with pytest.raises(SystemExit):
        cli.main(["patch-eval", "--policy", "everything", "--json"])
    assert "invalid choice: 'everything'" in capsys.readouterr().err


def test_kl_is_zero_for_equal_logits_and_positive_otherwise():
    logits = torch.randn(1, 5, 11, generator=torch.Generator().manual_seed(0))
    assert kl_and_top1(logits, logits) == (pytest.approx(0.0, abs=1e-6), 1.0)
    kl, top1 = kl_and_top1(logits, logits.flip(-1))
    assert kl > 0.1 and top1 < 1


def test_patch_eval_measures_streaming_policies_on_prompts_longer_than_the_window(tmp_path, prompt_files):
    """s = 1, w = 4: "Hi" (N <= s + w) is left out of the streaming fidelity, where the plan is the unpatched model.
    streaming_llm streams every head and every KV group; on the 32-token speed prompt its cache keeps s + w = 5
    entries per group instead of 32 + 8, and its ceilings use the work it removes, f (1 - rho)."""
    out = tmp_path / "out"
    streaming = ["--policy", "streaming", "--policy", "random", "--policy", "streaming_llm"]
    assert _run(tmp_path, prompt_files, *streaming, "--sink", "1", "--window", "4", "--out", str(out)) == 0
    res = PatchEvalResult.from_json(json.loads((out / "results.json").read_text()), out / "results.json")
    assert [(row.policy, row.kind, row.evaluation) for row in res.policies] == [
        ("streaming", "streaming", "given"),
        ("random", "streaming", "given"),
        ("streaming_llm", "streaming", "given"),
    ]
    assert res.settings.long_evaluation_prompts == res.settings.evaluation_prompts
    assert "e1" not in res.settings.long_greedy_prompts  # "Hi"
    llm = res.policies[2]
    assert llm.fidelity.fraction_heads == llm.fidelity.fraction_groups == 1.0 and llm.fidelity.kl > 0
    assert llm.kv.patched_bytes == llm.kv.unpatched_bytes * 5 // (32 + 8)
    rho = streamed_share(32, 1, 4, decode=False)
    assert llm.ceilings.prefill_removed == pytest.approx(1 - rho)
    assert llm.ceilings.prefill == pytest.approx(1 / (1 - (1 - rho) * llm.speed.prefill_share))
    assert "Streaming policies are evaluated on long prompts" in (out / "report.md").read_text()


def test_an_older_results_file_is_read_as_copy_policies_on_the_default_prompts():
    path = Path(__file__).parent / "data" / "patch-eval-schema2-smollm2-135m.json"
    res = PatchEvalResult.from_json(json.loads(path.read_text()), path)
    assert {(row.kind, row.evaluation) for row in res.policies} == {("copy", "default")}
    assert all(row.fidelity.fraction_groups is None for row in res.policies)
    assert all(row.speed.decode_growth_share is row.ceilings.decode_groups_removed is None for row in res.policies)


@pytest.mark.parametrize(
    "args, message",
    [
        (["--long-tokens", "260"], r"--long-tokens 260 <= s \+ w = 260"),
        (["--long-tokens", "1000"], r"--long-tokens 1000 < 4 \(s \+ w\) = 1040"),
        (["--fraction", "0"], r"a threshold is a fraction of attention in \(0, 1\], not 0"),
    ],
)
def test_streaming_options_are_checked_before_any_model_loads(monkeypatch, capsys, args, message):
    monkeypatch.setattr("sink_eval.models.load.load_model", lambda *a, **k: pytest.fail("a model loaded"))
    with pytest.raises(SystemExit) if "--fraction" in args else contextlib.nullcontext():
        assert cli.main(["patch-eval", "--policy", "streaming", "--json", *args]) == 2
    assert re.search(message, capsys.readouterr().err)


@pytest.mark.parametrize("flag, value", [("--window", "0"), ("--sink", "-1")])
def test_a_window_below_one_or_negative_sinks_are_refused_by_the_parser(capsys, flag, value):
    with pytest.raises(SystemExit):
        cli.main(["patch-eval", "--policy", "streaming_llm", flag, value, "--json"])
    assert f"argument {flag}: expected a whole number of at least" in capsys.readouterr().err


def test_eval_refuses_a_policy_that_makes_no_copy_plans_before_any_model_loads(capsys):
    assert cli.main(["eval", "--tasks", "piqa", "--policy", "streaming", "--json"]) == 2
    assert "eval scores copy policies; streaming makes streaming plans" in capsys.readouterr().err
