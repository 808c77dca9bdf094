"""`sink-eval patch-eval` on a tiny model: every policy gets a row with fidelity, speed and KV figures."""

from __future__ import annotations

import json

import pytest
import torch

from sink_eval import cli
from sink_eval.patch_eval import PatchEvalResult, kl_and_top1


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
            "--threshold",
            "0.3",
            "--consistency",
            "0.5",
            *extra,
        ]
    )


def test_patch_eval_writes_a_row_per_policy_with_fidelity_speed_and_kv(tmp_path, prompt_files):
    """The ceilings follow from the reported fraction f and share a: 1 / (1 - f a), and are exactly 1 where the plan
    copies nothing (the hybrid plan, limited to L = 16 tokens, never copies on the 32-token speed prompt). tau = 0.1
    makes the other plans copy heads of the random tiny model."""
    out = tmp_path / "out"
    assert _run(tmp_path, prompt_files, "--threshold", "0.05", "--hybrid-max-tokens", "16", "--out", str(out)) == 0
    data = json.loads((out / "results.json").read_text())
    assert data["schema"] == "sink_eval.patch_eval/2"
    res = PatchEvalResult.from_json(data, out / "results.json")
    assert [row.policy for row in res.policies] == ["first_layer", "calibrated", "oracle", "hybrid"]
    for row in res.policies:
        f = row.fidelity
        assert 0 <= f.fraction_copied <= 1 and len(f.per_layer_fraction) == 4
        assert 0 <= f.top1 <= 1 and f.kl > -1e-6 and len(f.layer_error) == 4
        assert row.kv.unpatched_bytes > 0
        assert row.kv.saved_bytes == row.kv.unpatched_bytes - row.kv.patched_bytes
        if row.policy == "hybrid":
            assert row.ceilings.prefill == row.ceilings.decode == 1.0
            continue
        share = row.ceilings.plan_fraction
        assert row.ceilings.prefill == pytest.approx(1 / (1 - share * row.speed.prefill_share), rel=1e-12)
        assert row.ceilings.decode == pytest.approx(1 / (1 - share * row.speed.decode_share), rel=1e-12)
    assert any(row.ceilings.prefill > 1 for row in res.policies), "no plan copied a head"
    assert set(res.settings.calibration_prompts).isdisjoint(res.settings.evaluation_prompts)
    assert (out / "speedup_vs_fidelity.png").exists()
    assert "| policy" in (out / "report.md").read_text()
    assert PatchEvalResult.from_json(res.to_json(), "x") == res and res.to_json() == data


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
