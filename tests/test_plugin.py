"""The pytest plugin as another project uses it (a project of its own in a temporary folder, run by pytest in a
process of its own, with a tiny
random checkpoint saved as a local directory), and the bands it holds this repository to."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest

from sink_eval import baselines, cli
from sink_eval.models.load import load_model
from sink_eval.pytest_plugin.config import read_config

BASELINES = Path(__file__).resolve().parents[1] / "baselines"
KINDS = {"analysis": baselines.ANALYSIS, "eval": baselines.EVAL, "longctx": baselines.LONGCTX}


def _pytest(project: Path, *args: str) -> pytest.RunResult:
    """pytest with the plugin in `project`, in a process of its own (as the project's CI would run it; the project's
    `sink-eval init` module has the name of this repository's own, and the checks import torch modules that cannot be
    imported twice in one process)."""
    start = time.monotonic()
    run = subprocess.run(
        [sys.executable, "-m", "pytest", "-p", "sink_eval.pytest_plugin", "-p", "no:cacheprovider", *args],
        cwd=project,
        capture_output=True,
        text=True,
        timeout=600,
    )
    lines = run.stdout.splitlines(), run.stderr.splitlines()
    return pytest.RunResult(run.returncode, *lines, duration=time.monotonic() - start)


PROBE_REFUSED = """import pytest


@pytest.fixture(scope="session")
def sink_probed():
    def refused(name, prompts):
        raise AssertionError("probed: the weights were not checked first")

    return refused
"""
"""A project conftest under which measuring anything fails: a check that names other weights before it measures
fails by the fingerprint instead."""


def _checkpoint(path: Path, name: str) -> Path:
    """A tiny zoo model saved as a checkpoint directory (weights, config and tokenizer)."""
    if path.exists():
        shutil.rmtree(path)
    loaded = load_model(name)
    loaded.model.save_pretrained(path)
    loaded.tokenizer.save_pretrained(path)
    return path


def _project(project: Path, capsys) -> Path:
    """`sink-eval init` in `project` for its checkpoint "ckpt" (tiny-llama), then what its owner would
    add: a prompt file of its own (12 prompts of 2-60 words) and the thresholds a random model has sinks at (at 0.8
    it has none, and a band at 0 could not fail)."""
    checkpoint = _checkpoint(project / "ckpt", "tiny-llama")
    assert cli.main(["init", "--dir", str(project), "--model", "ckpt"]) == 0
    assert "next: pytest -m analysis --update-baselines" in capsys.readouterr().out
    words = "the model reads a long text and attends to the first token of it".split()
    prompts = [{"id": f"p{n}", "text": " ".join(words[i % len(words)] for i in range(n))} for n in range(2, 62, 5)]
    (project / "prompts.jsonl").write_text("\n".join(json.dumps(p) for p in prompts))
    pyproject = project / "pyproject.toml"
    pyproject.write_text(pyproject.read_text() + 'prompts = "prompts.jsonl"\nthresholds = [0.02]\n')
    return checkpoint


def test_a_project_holds_its_own_checkpoint_to_a_baseline_and_names_one_swapped_in(tmp_path, capsys):
    checkpoint = _project(tmp_path, capsys)
    assert read_config(tmp_path).models == ["ckpt"]
    written = _pytest(tmp_path, "-m", "analysis", "--update-baselines")
    written.assert_outcomes(passed=3)
    written.stdout.fnmatch_lines(
        ["*baselines rewritten, not checked*", "*ckpt.json: rewritten from this run*", "  new baseline with * values"]
    )
    baseline = tmp_path / "baselines" / "analysis" / "ckpt.json"
    written_baseline = baselines.read_baseline(baseline)
    assert written_baseline.provenance.code is not None
    assert written_baseline.model.name == "ckpt"  # as configured: the file holds no path of this machine
    assert written_baseline.provenance.command == "pytest -m analysis --update-baselines"
    _pytest(tmp_path, "-m", "analysis").assert_outcomes(passed=3)
    _checkpoint(checkpoint, "tiny-qwen2")  # other weights saved under the same path
    (tmp_path / "conftest.py").write_text(PROBE_REFUSED)
    swapped = _pytest(tmp_path, "-m", "analysis")
    swapped.assert_outcomes(failed=3)  # the two baseline checks by fingerprint; the one-token check probes, refused
    errors = [line for line in swapped.outlines if line.startswith("E ")]
    assert sum("was measured on weights files-sha256:" in line for line in errors) == 2
    assert sum("probed: the weights were not checked first" in line for line in errors) == 1


def test_a_check_the_configuration_leaves_off_is_skipped_saying_so(tmp_path, capsys):
    _project(tmp_path, capsys)
    result = _pytest(tmp_path, "-m", "eval", "-rs")
    result.assert_outcomes(skipped=2)
    result.stdout.fnmatch_lines(["*the eval check is off: add it to [[]tool.sink_eval[]] checks*"])


def test_a_bad_configuration_is_a_one_line_usage_error(tmp_path):
    (tmp_path / "pyproject.toml").write_text('[tool.sink_eval]\nmodels = ["m"]\nchecks = ["speed"]\n')
    result = _pytest(tmp_path)
    assert result.ret == pytest.ExitCode.USAGE_ERROR
    assert "checks ['speed'] unknown; choose among analysis, eval, longctx, patch" in result.stderr.str()


def test_init_leaves_an_existing_table_and_test_module_as_they_are(tmp_path, capsys):
    (tmp_path / "pyproject.toml").write_text('[project]\nname = "x"\n\n[tool.sink_eval]\nmodels = ["mine"]\n')
    (tmp_path / "tests").mkdir()
    (tmp_path / "tests" / "test_sink_eval.py").write_text("# mine\n")
    assert cli.main(["init", "--dir", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    assert "already has [tool.sink_eval]: left as it is" in out and "already exists: left as it is" in out
    assert (tmp_path / "tests" / "test_sink_eval.py").read_text() == "# mine\n"
    assert read_config(tmp_path).models == ["mine"]
    assert cli.main(["init", "--dir", str(tmp_path / "nowhere")]) == 2


@pytest.mark.parametrize("path", sorted(p for kind in KINDS for p in (BASELINES / kind).glob("*.json")), ids=str)
def test_every_committed_band_excludes_what_a_broken_model_would_measure(path):
    """Chance accuracy, zero sinks, passkey 0: each committed band can fail on a broken model (and each committed
    baseline matches its checksum)."""
    stored = baselines.read_baseline(path, KINDS[path.parent.name])
    assert baselines.undiscriminating(stored) == []


@pytest.mark.parametrize("path", sorted((BASELINES / "eval").glob("*.json")), ids=lambda p: p.stem)
def test_a_chance_level_model_fails_every_ci_eval_check(path):
    """What a model at chance would measure on each committed CI eval check (each task at chance accuracy; each
    policy's change its chance minus the unpatched accuracy) lies outside every band, so every eval band check
    fails on it; its log-likelihoods would fail the regression layer besides."""
    stored = baselines.read_eval_baseline(path)
    for key, band in stored.values.items():
        at_chance = baselines.Measurement(baselines.EVAL.degenerate(key, stored), 0.0)
        assert baselines.outside_band(at_chance, band) is not None, f"{path.name} {key}: a chance model passes"
