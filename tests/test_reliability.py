"""Bad input and interrupted runs: one-line errors before any work, no data lost, resumable analyze."""

from __future__ import annotations

import json
import os

import pytest
import torch
from helpers import counted
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import sink_eval.models.load
from sink_eval import cli
from sink_eval.analyses.analyze import AnalysisResult
from sink_eval.core.errors import SinkEvalError
from sink_eval.core.files import temp_prefix, write_dir_atomically
from sink_eval.models import cache, gguf
from sink_eval.models import zoo as models
from sink_eval.models.load import load_model
from sink_eval.patches.copy import CopyPlan
from sink_eval.policies.base import check_disjoint
from sink_eval.prompts.prompt_set import Prompt, read_prompt_file


class ModelLoaded(Exception):
    """Raised by the patched load_model: the command got past its checks."""


@pytest.fixture
def no_model(monkeypatch):
    """Make loading any model fail loudly, so a test proves its error comes before any model loads."""

    def load(*args, **kwargs):
        raise ModelLoaded

    monkeypatch.setattr(sink_eval.models.load, "load_model", load)


@pytest.fixture
def prompts_file(tmp_path):
    path = tmp_path / "prompts.jsonl"
    texts = ["Hi there", "The cat sat on the mat.", "def f(x):\n    return x + 1\n", "A b c d e f"]
    path.write_text("".join(json.dumps({"text": t}) + "\n" for t in texts))
    return path


def _error(capsys) -> str:
    err = capsys.readouterr().err.strip()
    assert "Traceback" not in err
    lines = err.splitlines()
    assert len(lines) == 1, err
    return lines[0]


def _analyze(prompts_file, *extra) -> int:
    return cli.main(["analyze", "--model", "tiny-llama", "--prompts", str(prompts_file), *extra])


# --overwrite replaces only what sink_eval wrote


def test_overwrite_refuses_a_directory_holding_unrelated_files(tmp_path, prompts_file, no_model, capsys):
    user = tmp_path / "some" / "user" / "dir"
    user.mkdir(parents=True)
    (user / "thesis.tex").write_text("years of work")
    assert _analyze(prompts_file, "--out", str(user), "--overwrite") == 2
    err = _error(capsys)
    assert "--overwrite refused" in err and "thesis.tex" in err
    assert (user / "thesis.tex").read_text() == "years of work"


@pytest.mark.parametrize("out", [".", ".."])
def test_overwrite_refuses_the_working_directory_and_its_ancestors(tmp_path, prompts_file, no_model, capsys, out):
    work = tmp_path / "cwd"
    work.mkdir()
    (work / "notes.txt").write_text("mine")
    os.chdir(work)
    try:
        assert _analyze(prompts_file, "--out", out, "--overwrite") == 2
    finally:
        os.chdir(tmp_path)
    assert "working directory" in _error(capsys)
    assert (work / "notes.txt").read_text() == "mine" and prompts_file.exists()


def test_overwrite_refuses_to_replace_an_input_of_the_same_command(tmp_path, prompts_file, capsys):
    out = tmp_path / "a"
    assert _analyze(prompts_file, "--out", str(out)) == 0
    before = sorted(p.name for p in out.iterdir())
    capsys.readouterr()
    assert cli.main(["compare", str(out), str(out), "--out", str(out), "--overwrite"]) == 2
    assert "holds the input" in _error(capsys)
    assert sorted(p.name for p in out.iterdir()) == before


def test_overwrite_refuses_output_of_another_command(tmp_path, prompts_file, capsys):
    out, cmp = tmp_path / "a", tmp_path / "cmp"
    assert _analyze(prompts_file, "--out", str(out)) == 0
    assert cli.main(["compare", str(out), str(out), "--out", str(cmp)]) == 0
    capsys.readouterr()
    assert _analyze(prompts_file, "--out", str(cmp), "--overwrite") == 2
    assert "did not write there as analyze output" in _error(capsys)
    assert (cmp / "compare.md").is_file()


# an unwritable --out is found before any work


@pytest.mark.parametrize("where", ["a file", "under a file", "under /proc"])
def test_unwritable_out_is_refused_before_the_model_loads(tmp_path, prompts_file, no_model, capsys, where):
    file = tmp_path / "f.txt"
    file.write_text("x")
    out = {"a file": file, "under a file": file / "out", "under /proc": "/proc/sink_eval_out"}[where]
    assert _analyze(prompts_file, "--out", str(out)) == 2
    assert str(out) in _error(capsys)


@pytest.mark.skipif(os.geteuid() == 0, reason="root writes into read-only directories")
def test_out_under_a_read_only_directory_is_refused_before_the_model_loads(tmp_path, prompts_file, no_model, capsys):
    locked = tmp_path / "locked"
    locked.mkdir()
    locked.chmod(0o555)
    try:
        assert _analyze(prompts_file, "--out", str(locked / "out")) == 2
    finally:
        locked.chmod(0o755)
    assert "not writable" in _error(capsys)


def test_stale_temp_dirs_of_dead_processes_are_removed_by_the_next_write(tmp_path):
    final = tmp_path / "out"
    dead = tmp_path / f"{temp_prefix(final)}999999999-abc"
    alive = tmp_path / f"{temp_prefix(final)}{os.getpid()}-def"
    dead.mkdir()
    alive.mkdir()
    write_dir_atomically(final, lambda tmp: (tmp / "x").write_text("x"))
    assert not dead.exists() and alive.exists() and (final / "x").is_file()


# tracebacks that are one-line errors now


def test_non_utf8_prompt_file_error_names_the_line_and_byte_offset(tmp_path):
    path = tmp_path / "p.jsonl"
    path.write_bytes(b'{"text": "ok"}\n{"text": "caf\xe9"}\n')
    with pytest.raises(SinkEvalError, match=r"line 2 \(byte offset 28\): not UTF-8.*save the file as UTF-8"):
        read_prompt_file(path)


def test_only_one_token_prompts_write_the_report_and_say_no_non_trivial_prompt(tmp_path, capsys):
    path = tmp_path / "short.jsonl"
    path.write_text('{"text": "A"}\n{"text": "B"}\n')
    out = tmp_path / "out"
    assert _analyze(path, "--out", str(out)) == 2
    out_err = capsys.readouterr()
    err = out_err.err
    assert "no non-trivial prompt" in err.splitlines()[-1] and "| " in out_err.out  # the table, then the error
    assert "figures" not in err.replace("without figures", "")  # never "wrote ...: ..., figures"
    assert "no non-trivial prompt" in (out / "report.md").read_text()
    res = AnalysisResult.read(out)
    assert res.at(0.8).all.n_trivial == 2 and res.at(0.8).all.prevalence is None
    assert not list(out.glob("*.png"))


def test_model_dir_that_is_not_a_checkpoint_is_refused(tmp_path, prompts_file, capsys):
    (tmp_path / "notes").mkdir()
    assert cli.main(["analyze", "--model", str(tmp_path / "notes"), "--prompts", str(prompts_file), "--json"]) == 2
    assert "is not a checkpoint directory (it has no config.json)" in _error(capsys)


@pytest.mark.parametrize("kind", ["a file", "under a file"])
def test_cache_root_that_is_a_file_is_refused_before_converting(tmp_path, monkeypatch, kind):
    file = tmp_path / "cache"
    file.write_text("x")
    monkeypatch.setenv(cache.CACHE_ENV, str(file if kind == "a file" else file / "sub"))
    spec = models.ZOO["smollm2-135m"]

    def fill(tmp):
        raise AssertionError("conversion started")

    with pytest.raises(SinkEvalError, match=f"is a file, not a directory; set {cache.CACHE_ENV}"):
        cache.ensure_cache(gguf._cache_dir(spec), spec.gguf.sha256, fill)


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["patch-eval", "--new-tokens", "0"], "--new-tokens"),
        (["patch-eval", "--speed-rounds", "0"], "--speed-rounds"),
        (["patch-eval", "--speed-tokens", "-5"], "--speed-tokens"),
        (["patch-eval", "--generations", "-1"], "--generations"),
        (["patch-eval", "--hybrid-max-tokens", "0"], "--hybrid-max-tokens"),
        (["analyze", "--max-tokens", "-1", "--truncate"], "--max-tokens"),
        (["eval", "--tasks", "piqa", "--limit", "0"], "--limit"),
        (["eval", "--tasks", "piqa", "--limit", "-1"], "--limit"),
        (["eval", "--tasks", "piqa", "--batch-size", "0"], "--batch-size"),
        (["eval", "--tasks", "piqa", "--batch-size", "two"], "--batch-size"),
    ],
)
def test_count_options_below_one_are_refused_by_the_parser(argv, message, no_model, capsys):
    with pytest.raises(SystemExit) as exit_:
        cli.main([*argv, "--model", "tiny-llama", "--json"])
    assert exit_.value.code == 2
    assert f"argument {message}: expected a whole number of at least 1" in capsys.readouterr().err


@pytest.mark.parametrize("device", ["tpu9", "cuda:99", "meta"])
def test_eval_device_this_torch_cannot_use_is_refused_before_the_model_loads(device, no_model, capsys):
    assert cli.main(["eval", "--tasks", "piqa", "--device", device, "--json"]) == 2
    assert f"--device {device}" in _error(capsys)


@pytest.mark.skipif(torch.cuda.is_available(), reason="this torch has CUDA")
def test_eval_device_cuda_on_a_cpu_only_torch_is_refused(no_model, capsys):
    assert cli.main(["eval", "--tasks", "piqa", "--device", "cuda", "--json"]) == 2
    assert "sees 0 CUDA device(s); use --device cpu" in _error(capsys)


def test_generate_refuses_zero_new_tokens():
    with pytest.raises(SinkEvalError, match="max_new_tokens .* at least 1, not 0"):
        CopyPlan().generate(torch.nn.Module(), torch.ones(1, 2, dtype=torch.long), max_new_tokens=0)


@pytest.mark.parametrize(
    "heads", [{1.5: [0]}, {"1": [0], 2: [1]}, {0: ["a"]}, {True: [0]}, {0: [False]}, {0: "01"}, {0: 3}]
)
def test_copy_plan_layers_and_heads_must_be_ints(heads):
    with pytest.raises(SinkEvalError, match="copy plan"):
        CopyPlan.of(heads)


def test_copy_plan_built_directly_checks_its_indices_too():
    with pytest.raises(SinkEvalError, match="layers are ints"):
        CopyPlan({"0": frozenset({1})})
    assert CopyPlan.of({1: [2, 0], 0: []}).n_heads() == 2


# silent wrong results


def test_data_dir_that_does_not_exist_is_an_error_before_anything_loads(tmp_path, no_model, capsys):
    assert cli.main(["eval", "--tasks", "piqa", "--data-dir", str(tmp_path / "nope"), "--json"]) == 2
    assert "--data-dir" in _error(capsys)


def test_overlap_message_counts_each_shared_prompt_once():
    shared = [Prompt("a", "d", "one"), Prompt("b", "d", "two")]
    with pytest.raises(SinkEvalError, match=r"\(2 evaluation prompt\(s\) shared, e.g. a\)"):
        check_disjoint([*shared, Prompt("c", "d", "three")], [*shared, Prompt("e", "d", "four")])


def _policy_options(*argv):
    args = cli.build_parser().parse_args(["patch-eval", "--policy", "hybrid", *argv, "--json"])
    return cli._policies(args, default=cli.PATCH_EVAL_POLICIES)[0].options


def test_hybrid_limited_by_decode_steps_alone_has_no_length_limit():
    assert (_policy_options("--hybrid-decode-steps", "4").max_tokens, _policy_options().max_tokens) == (None, 64)
    options = _policy_options("--hybrid-max-tokens", "32", "--hybrid-decode-steps", "4")
    assert (options.max_tokens, options.decode_steps) == (32, 4)


def test_patch_eval_refuses_max_tokens_beyond_the_models_context(tmp_path, prompts_file, capsys):
    calibration = tmp_path / "cal.jsonl"
    calibration.write_text('{"id": "c0", "text": "Paris is the capital of France."}\n')
    argv = ["patch-eval", "--model", "tiny-llama", "--prompts", str(prompts_file)]
    argv += ["--calibration-prompts", str(calibration), "--max-tokens", "100000", "--json"]
    assert cli.main(argv) == 2
    assert "--max-tokens 100000 exceeds tiny-llama's context of 4096 tokens" in _error(capsys)


def test_eval_calibration_prompts_longer_than_the_context_are_cut_to_it(monkeypatch):
    evaluate = pytest.importorskip("sink_eval.evals.accuracy", reason="the evals extra (lm-eval) is not installed")
    from sink_eval.policies import calibration

    long = [Prompt(f"p{i}", "prose", "x" * 40) for i in range(2)]
    monkeypatch.setattr(calibration, "default_split", lambda: (long[:1], long[1:]))
    monkeypatch.setattr(evaluate, "_CALIBRATION", {})
    loaded = load_model("tiny-llama")
    loaded.model.config.max_position_embeddings = 16
    assert [s.n_tokens for s in evaluate.calibration_stats(loaded)] == [16]


# resumable analyze


def test_killed_analyze_resumes_to_the_results_of_an_uninterrupted_run(tmp_path, prompts_file, monkeypatch, capsys):
    import sink_eval.measure.probe
    from sink_eval.core.resume import work_dir

    assert _analyze(prompts_file, "--out", str(tmp_path / "whole")) == 0
    real_probe = sink_eval.measure.probe.probe
    out = tmp_path / "resumed"
    monkeypatch.setattr(sink_eval.measure.probe, "probe", counted(real_probe, kill_after=2)[0])
    with pytest.raises(KeyboardInterrupt):
        _analyze(prompts_file, "--out", str(out))
    monkeypatch.setattr(sink_eval.measure.probe, "probe", real_probe)
    assert not out.exists() and len(list(work_dir(out, "analyze").glob("prompt-*.pt"))) == 2
    capsys.readouterr()

    assert _analyze(prompts_file, "--out", str(out)) == 2
    assert "pass --resume" in _error(capsys)
    assert _analyze(prompts_file, "--out", str(out), "--resume", "--threshold", "0.5") == 2
    assert "another settings" in _error(capsys)
    assert _analyze(prompts_file, "--out", str(out), "--resume") == 0
    assert not work_dir(out, "analyze").exists()
    whole, resumed = (json.loads((tmp_path / name / "results.json").read_text()) for name in ("whole", "resumed"))
    for res in (whole, resumed):
        del res["provenance"]["date"]
    assert resumed == whole


# fuzz


@settings(max_examples=500, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(data=st.binary(max_size=200))
def test_prompt_file_reader_fuzz_gives_prompts_or_a_sink_eval_error(tmp_path, data):
    path = tmp_path / "fuzz.jsonl"
    path.write_bytes(data)
    try:
        prompts = read_prompt_file(path)
    except SinkEvalError:
        return
    assert prompts and all(isinstance(p.text, str) and p.text.strip() for p in prompts)


COUNT_OPTIONS = {
    "analyze": ["--max-tokens", "--threshold"],
    "patch-eval": [
        "--max-tokens",
        "--speed-tokens",
        "--speed-rounds",
        "--generations",
        "--new-tokens",
        "--threshold",
        "--consistency",
        "--hybrid-max-tokens",
        "--hybrid-decode-steps",
    ],
    "eval": ["--limit", "--batch-size", "--threshold", "--consistency", "--hybrid-max-tokens"],
}
VALUES = st.one_of(
    st.integers(-(10**6), 10**6).map(str),
    st.floats(allow_nan=True, allow_infinity=True).map(str),
    st.text(max_size=12),
)


@settings(max_examples=500, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(
    command=st.sampled_from(sorted(COUNT_OPTIONS)),
    picks=st.lists(st.tuples(st.integers(0, 8), VALUES), min_size=1, max_size=4),
)
def test_cli_option_fuzz_gives_exit_2_or_reaches_the_model(no_model, prompts_file, capsys, command, picks):
    argv = [command, "--model", "tiny-llama", "--json"]
    argv += ["--tasks", "piqa"] if command == "eval" else ["--prompts", str(prompts_file)]
    if command == "patch-eval":
        argv += ["--calibration-prompts", str(prompts_file)]
    options = COUNT_OPTIONS[command]
    argv += [f"{options[i % len(options)]}={value}" for i, value in picks]
    try:
        code = cli.main(argv)
    except SystemExit as exit_:
        code = exit_.code
    except ModelLoaded:
        return
    assert code == 2
    capsys.readouterr()


def test_tiny_tokenizer_gives_the_same_ids_in_every_load():
    text = "The cat sat on the mat."
    assert len({tuple(load_model("tiny-llama").tokenizer(text)["input_ids"]) for _ in range(3)}) == 1
