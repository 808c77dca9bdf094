"""Bad input and interrupted runs: one-line errors before any work, no data lost, resumable analyze."""

from __future__ import annotations

import contextlib
import functools
import io
import json
import os
import shutil
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import pytest
import torch
from helpers import counted
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import sink_eval
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
    assert _analyze(prompts_file, "--out", str(out)) == 130
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


# round two (#37): the CLI against a demanding user


def _write_prompts(path: Path) -> Path:
    texts = ["Hi there", "The cat sat on the mat.", "def f(x):\n    return x + 1\n", "A b c d e f"]
    path.write_text("".join(json.dumps({"text": t, "domain": d}) + "\n" for t, d in zip(texts, "ppcq", strict=True)))
    return path


@pytest.fixture(scope="module")
def analyzed(tmp_path_factory) -> Callable[[str], Path]:
    """`analyzed(model)` -> the --out directory of `sink-eval analyze` of tiny-llama or tiny-qwen2 on four prompts,
    both run once a module as the fixture is set up (before any test's `no_model`); copy one before editing it."""
    root = tmp_path_factory.mktemp("analyzed")
    prompts = _write_prompts(root / "prompts.jsonl")
    for model in ("tiny-llama", "tiny-qwen2"):
        with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()):
            assert cli.main(["analyze", "--model", model, "--prompts", str(prompts), "--out", str(root / model)]) == 0
    return lambda model: root / model


def _copy_run(src: Path, dst: Path, edit: Callable[[dict], None] | None = None, raw: bytes | None = None) -> Path:
    """A copy of the output directory `src` at `dst`, its results.json edited by `edit` or replaced by `raw`."""
    shutil.copytree(src, dst)
    path = dst / "results.json"
    if raw is not None:
        path.write_bytes(raw)
    elif edit is not None:
        data = json.loads(path.read_text())
        edit(data)
        path.write_text(json.dumps(data))
    return dst


def _code(argv: list[str]) -> int:
    """cli.main's exit status, argparse's refusals included."""
    try:
        return cli.main(argv)
    except SystemExit as exit_:
        return int(exit_.code or 0)


def _holding_lock(out: Path) -> subprocess.Popen:
    """Another process holding the lock of --out `out`, as a running sink-eval that writes it does, until killed."""
    code = (
        "import sys, time\nfrom pathlib import Path\nfrom sink_eval.core.files import output_lock\n"
        "with output_lock(Path(sys.argv[1])):\n    print('held', flush=True)\n    time.sleep(120)\n"
    )
    env = {**os.environ, "PYTHONPATH": str(Path(sink_eval.__file__).parents[1])}
    proc = subprocess.Popen([sys.executable, "-c", code, str(out)], stdout=subprocess.PIPE, env=env)
    assert proc.stdout is not None and proc.stdout.readline() == b"held\n"
    return proc


# data loss


@pytest.mark.parametrize("holding", ["a file of theirs", "nothing"])
def test_out_created_by_someone_else_while_the_temp_exists_is_never_replaced(
    tmp_path, analyzed, monkeypatch, capsys, holding
):
    import sink_eval.reports.compare as compare_report

    out, good = tmp_path / "race", analyzed("tiny-llama")
    real = compare_report.save_figure

    def user_creates_out(fig, tmp, name):
        out.mkdir()
        if holding == "a file of theirs":
            (out / "mine.txt").write_text("theirs")
        return real(fig, tmp, name)

    monkeypatch.setattr(compare_report, "save_figure", user_creates_out)
    assert cli.main(["compare", str(good), str(good), "--out", str(out)]) == 2
    assert "appeared" in _error(capsys)
    assert sorted(os.listdir(out)) == (["mine.txt"] if holding == "a file of theirs" else [])
    assert not [p.name for p in tmp_path.iterdir() if p.name.startswith(".race.")]  # no temp or lock left


def test_overwrite_keeps_an_output_that_gained_a_file_of_someone_else_during_the_run(
    tmp_path, analyzed, monkeypatch, capsys
):
    import sink_eval.reports.compare as compare_report

    out, good = tmp_path / "cmp", analyzed("tiny-llama")
    argv = ["compare", str(good), str(good), "--out", str(out), "--overwrite"]
    assert cli.main(argv) == 0
    before = sorted(os.listdir(out))
    real = compare_report.save_figure

    def user_adds_a_file(fig, tmp, name):
        (out / "mine.txt").write_text("theirs")
        return real(fig, tmp, name)

    monkeypatch.setattr(compare_report, "save_figure", user_adds_a_file)
    capsys.readouterr()
    assert cli.main(argv) == 2
    err = _error(capsys)
    assert "--overwrite refused" in err and "mine.txt" in err
    assert sorted(os.listdir(out)) == sorted([*before, "mine.txt"])
    assert not [p.name for p in tmp_path.iterdir() if p.name.startswith(".cmp.")]


@pytest.mark.parametrize("fallback", [False, True])
def test_the_final_rename_never_replaces_a_directory_that_appeared_there(tmp_path, monkeypatch, fallback):
    from sink_eval.core import files

    if fallback:  # a system or file system without renameat2
        monkeypatch.setattr(files, "_RENAMEAT2", None)
    (tmp_path / "new").mkdir()
    (tmp_path / "theirs").mkdir()
    with pytest.raises(FileExistsError):
        files.rename_no_replace(tmp_path / "new", tmp_path / "theirs")
    files.rename_no_replace(tmp_path / "new", tmp_path / "free")
    assert sorted(os.listdir(tmp_path)) == ["free", "theirs"]


def test_a_second_writer_of_one_out_is_refused_while_another_holds_it(tmp_path, analyzed, capsys):
    out, good = tmp_path / "o", analyzed("tiny-llama")
    other = _holding_lock(out)
    try:
        assert cli.main(["compare", str(good), str(good), "--out", str(out)]) == 2
    finally:
        other.kill()
        other.wait()
    assert f"another sink-eval run (pid {other.pid})" in _error(capsys)
    assert not out.exists()


def test_a_running_analyze_is_named_as_running_never_offered_for_deletion(tmp_path, prompts_file, no_model, capsys):
    from sink_eval.core.resume import work_dir

    out = tmp_path / "o"
    work_dir(out, "analyze").mkdir()
    other = _holding_lock(out)
    try:
        assert _analyze(prompts_file, "--out", str(out)) == 2
    finally:
        other.kill()
        other.wait()
    err = _error(capsys)
    assert f"another sink-eval run (pid {other.pid})" in err and "delete" not in err


@pytest.mark.parametrize("points_at", ["an analyze output", "nothing"])
def test_out_that_is_a_symbolic_link_is_refused_before_the_model_loads(
    tmp_path, prompts_file, analyzed, no_model, capsys, points_at
):
    real = _copy_run(analyzed("tiny-llama"), tmp_path / "real") if points_at == "an analyze output" else None
    link = tmp_path / "link"
    link.symlink_to(real or tmp_path / "missing")
    assert _analyze(prompts_file, "--out", str(link), "--overwrite") == 2
    assert "symbolic link" in _error(capsys)
    assert link.is_symlink() and (real is None or (real / "results.json").is_file())


@pytest.mark.parametrize("extra", [0, 1])
def test_out_name_leaves_room_for_the_names_kept_beside_it(tmp_path, prompts_file, capsys, extra):
    from sink_eval.core.files import max_out_name_bytes

    out = tmp_path / ("x" * (max_out_name_bytes(tmp_path) + extra))
    assert _analyze(prompts_file, "--out", str(out)) == (2 if extra else 0)
    if extra:
        assert "too long" in _error(capsys) and not out.exists()
    else:
        assert (out / "results.json").is_file()


# tracebacks


def test_prompt_with_a_lone_surrogate_is_refused_before_the_model_loads(tmp_path, no_model, capsys):
    path = tmp_path / "p.jsonl"
    path.write_text('{"text": "fine"}\n{"text": "half \\ud800 a character"}\n')
    assert _analyze(path, "--json") == 2
    err = _error(capsys)
    assert "line 2" in err and "surrogate" in err


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory) -> Path:
    """tiny-llama saved as a checkpoint directory (save_pretrained)."""
    path = tmp_path_factory.mktemp("checkpoint") / "tiny"
    loaded = load_model("tiny-llama")
    loaded.model.save_pretrained(path)
    loaded.tokenizer.save_pretrained(path)
    return path


def _config(path: Path, **changes) -> None:
    (path / "config.json").write_text(json.dumps({**json.loads((path / "config.json").read_text()), **changes}))


BROKEN_CHECKPOINTS = {
    "config.json not JSON": lambda d: (d / "config.json").write_text("{not json"),
    "config.json a list": lambda d: (d / "config.json").write_text("[1, 2]"),
    "unknown model_type": lambda d: _config(d, model_type="no-such-model"),
    "no weights": lambda d: (d / "model.safetensors").unlink(),
    "truncated weights": lambda d: (d / "model.safetensors").write_bytes((d / "model.safetensors").read_bytes()[:-999]),
    "garbage weights": lambda d: (d / "model.safetensors").write_bytes(b"garbage" * 100),
}


@pytest.mark.parametrize("damage", sorted(BROKEN_CHECKPOINTS))
def test_broken_checkpoint_directory_is_refused_before_the_model_loads(
    tmp_path, checkpoint, prompts_file, no_model, capsys, damage
):
    broken = tmp_path / "ckpt"
    shutil.copytree(checkpoint, broken)
    BROKEN_CHECKPOINTS[damage](broken)
    assert cli.main(["analyze", "--model", str(broken), "--prompts", str(prompts_file), "--json"]) == 2
    assert str(broken) in _error(capsys)


def test_checkpoint_whose_weights_do_not_fit_its_config_ends_in_a_one_line_error(
    tmp_path, checkpoint, prompts_file, capsys
):
    """transformers reports the mismatched shapes (its log) before it raises; the error is one line after it."""
    broken = tmp_path / "ckpt"
    shutil.copytree(checkpoint, broken)
    _config(broken, hidden_size=128, intermediate_size=256)
    assert cli.main(["analyze", "--model", str(broken), "--prompts", str(prompts_file), "--json"]) == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err
    assert err.splitlines()[-1].startswith(f"sink-eval: error: cannot load the checkpoint {broken}: ")


@pytest.mark.parametrize("command", ["patch-eval", "longctx"])
def test_seed_beyond_a_64_bit_generator_is_refused_before_the_model_loads(command, no_model, capsys):
    assert cli.main([command, "--policy", "random", "--seed", "99999999999999999999", "--json"]) == 2
    err = _error(capsys)
    assert "seed" in err and "99999999999999999999" in err and str(2**63 - 1) in err


@pytest.mark.parametrize("command", ["compare", "scale"])
def test_results_file_that_is_not_utf8_is_refused(tmp_path, analyzed, capsys, command):
    bad = _copy_run(analyzed("tiny-qwen2"), tmp_path / "bad", raw=b'{"schema": "caf\xe9"}')
    assert cli.main([command, str(analyzed("tiny-llama")), str(bad), "--out", str(tmp_path / "o")]) == 2
    assert "not UTF-8" in _error(capsys)


def _set_every_prevalence(data: dict, value: float) -> None:
    for summary in data["summary"]:
        for group in [*summary["bins"], summary["all"]]:
            if group["prevalence"] is not None:
                group["prevalence"] = value


def _set_score(data: dict, value: float) -> None:
    data["prompts"][1]["sink_score"][0][0] = value


EDITED_RESULTS = {
    "summary thresholds differ from the settings": (
        lambda d: d["summary"][0].update(threshold=0.5),
        "summary[0].threshold",
    ),
    "settings thresholds differ from the summary": (
        lambda d: d["settings"].update(thresholds=[0.5, 0.3]),
        "summary[0].threshold",
    ),
    "prevalence the scores do not give": (lambda d: _set_every_prevalence(d, 0.99), "prevalence"),
    "a NaN score": (lambda d: _set_score(d, float("nan")), "sink_score"),
    "a score of 5": (lambda d: _set_score(d, 5.0), "sink_score"),
    "no prompts": (lambda d: d.update(prompts=[]), "prompts"),
    "score rows of the wrong shape": (lambda d: d["prompts"][1]["sink_score"].pop(), "sink_score"),
    "model.layers edited": (lambda d: d["model"].update(layers=d["model"]["layers"] + 1), "model.layers"),
}


@pytest.mark.parametrize("command", ["compare", "scale"])
@pytest.mark.parametrize("edit", sorted(EDITED_RESULTS))
def test_hand_edited_results_that_do_not_add_up_are_refused(tmp_path, analyzed, capsys, command, edit):
    change, field = EDITED_RESULTS[edit]
    bad = _copy_run(analyzed("tiny-qwen2"), tmp_path / "bad", change)
    assert cli.main([command, str(analyzed("tiny-llama")), str(bad), "--out", str(tmp_path / "o")]) == 2
    err = _error(capsys)
    assert field in err and "re-run `sink-eval analyze`" in err
    assert not (tmp_path / "o").exists()


def test_a_damaged_work_file_is_measured_again_on_resume(tmp_path, analyzed, monkeypatch, capsys):
    import sink_eval.measure.probe
    from sink_eval.core.resume import work_dir

    prompts = analyzed("tiny-llama").parent / "prompts.jsonl"
    out = tmp_path / "resumed"
    real_probe = sink_eval.measure.probe.probe
    monkeypatch.setattr(sink_eval.measure.probe, "probe", counted(real_probe, kill_after=2)[0])
    assert _analyze(prompts, "--out", str(out)) == 130
    saved = sorted(work_dir(out, "analyze").glob("prompt-*.pt"))
    saved[0].write_bytes(saved[0].read_bytes()[:100])
    probe, calls = counted(real_probe)
    monkeypatch.setattr(sink_eval.measure.probe, "probe", probe)
    capsys.readouterr()
    assert _analyze(prompts, "--out", str(out), "--resume") == 0
    assert len(calls) == 3  # the damaged prompt and the two never probed
    whole, resumed = (json.loads((d / "results.json").read_text()) for d in (analyzed("tiny-llama"), out))
    for res in (whole, resumed):
        del res["provenance"]
    assert resumed == whole


def test_ctrl_c_prints_one_line_and_exits_130(prompts_file, monkeypatch, capsys):
    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(sink_eval.models.load, "load_model", interrupted)
    assert _analyze(prompts_file, "--json") == 130
    assert _error(capsys) == "sink-eval: interrupted"


def test_ctrl_c_while_the_command_line_is_read_prints_one_line_and_exits_130(monkeypatch, capsys):
    """Building the parser imports torch (about 2 s): Ctrl-C then is the same one line."""

    def interrupted():
        raise KeyboardInterrupt

    monkeypatch.setattr(cli, "build_parser", interrupted)
    assert cli.main(["analyze", "--json"]) == 130
    assert _error(capsys) == "sink-eval: interrupted"


def test_importing_the_command_line_module_imports_no_torch():
    """What `sink-eval` imports before `main` handles Ctrl-C: nothing heavy, so no window for a traceback."""
    code = "import sys, sink_eval.cli; print(sorted(m for m in ('torch', 'transformers') if m in sys.modules))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"


def test_ctrl_c_during_a_progress_bar_prints_its_line_after_the_bar(prompts_file, monkeypatch, capsys):
    import sink_eval.measure.probe

    probe = counted(sink_eval.measure.probe.probe, kill_after=1)[0]
    monkeypatch.setattr(sink_eval.measure.probe, "probe", probe)
    assert _analyze(prompts_file, "--json") == 130
    err = capsys.readouterr().err
    assert "Traceback" not in err and err.splitlines()[-1] == "sink-eval: interrupted"


@pytest.mark.parametrize("task", ["nonexistent", "lambada_openai"])
def test_eval_task_without_data_is_refused_before_the_model_loads(task, no_model, monkeypatch, capsys):
    pytest.importorskip("lm_eval", reason="the evals extra (lm-eval) is not installed")
    monkeypatch.delenv("SINK_EVAL_DATA", raising=False)
    assert cli.main(["eval", "--tasks", task, "--json"]) == 2
    assert task in _error(capsys)


# silent wrong results


def test_new_tokens_past_the_models_context_are_refused_before_any_measurement(
    tmp_path, prompts_file, monkeypatch, capsys
):
    import sink_eval.evals.patch_eval

    def measured(*args, **kwargs):
        raise AssertionError("measurement started")

    monkeypatch.setattr(sink_eval.evals.patch_eval, "run", measured)
    argv = ["patch-eval", "--model", "tiny-llama", "--prompts", str(prompts_file), "--calibration-prompts"]
    (tmp_path / "cal.jsonl").write_text('{"id": "c0", "text": "Paris is the capital of France."}\n')
    argv += [str(tmp_path / "cal.jsonl"), "--new-tokens", "100000000", "--json"]
    assert cli.main(argv) == 2
    assert "--new-tokens 100000000" in _error(capsys)


@pytest.mark.parametrize(
    "argv",
    [
        ["longctx", "--trials", "1000000000000"],
        ["longctx", "--seeds", "1000000000"],
        ["taxonomy", "--seeds", "1000000000"],
        ["patch-eval", "--speed-rounds", "1000000000"],
        ["eval", "--tasks", "piqa", "--batch-size", "1000000000"],
    ],
)
def test_counts_beyond_their_stated_maximum_are_refused_before_the_model_loads(argv, no_model, capsys):
    assert _code([*argv, "--json"]) == 2
    assert f"argument {argv[-2]}: expected a whole number of at most" in capsys.readouterr().err


def test_only_one_token_prompts_exit_2_with_json_as_with_out(tmp_path, capsys):
    path = tmp_path / "short.jsonl"
    path.write_text('{"text": "A"}\n{"text": "B"}\n')
    assert _analyze(path, "--json") == 2
    assert "no non-trivial prompt" in capsys.readouterr().err.splitlines()[-1]


def test_a_repeated_threshold_gives_one_row(prompts_file, capsys):
    assert _analyze(prompts_file, "--threshold", "0.5", "--threshold", "0.5", "--json") == 0
    res = json.loads(capsys.readouterr().out)
    assert res["settings"]["thresholds"] == [0.5] and len(res["summary"]) == 1


def test_a_repeated_policy_gives_one_row():
    args = cli.build_parser().parse_args(["patch-eval", "--policy", "oracle", "--policy", "oracle", "--json"])
    assert [p.name for p in cli._policies(args, default=cli.PATCH_EVAL_POLICIES)] == ["oracle"]


@pytest.mark.parametrize(("field", "value"), [("id", None), ("id", ["a"]), ("domain", None), ("domain", 3)])
def test_prompt_id_or_domain_that_is_not_a_string_is_refused(tmp_path, no_model, capsys, field, value):
    path = tmp_path / "p.jsonl"
    path.write_text(json.dumps({"text": "x y", field: value}) + "\n")
    assert _analyze(path, "--json") == 2
    assert f'"{field}"' in _error(capsys)


def test_model_that_is_a_file_is_refused_as_a_file(tmp_path, prompts_file, no_model, monkeypatch, capsys):
    monkeypatch.chdir(prompts_file.parent.parent)
    name = f"{prompts_file.parent.name}/{prompts_file.name}"
    assert cli.main(["analyze", "--model", name, "--prompts", str(prompts_file), "--json"]) == 2
    err = _error(capsys)
    assert "is a file" in err and "cache" not in err


def test_empty_model_name_is_refused(prompts_file, no_model, capsys):
    assert cli.main(["analyze", "--model", "", "--prompts", str(prompts_file), "--json"]) == 2
    assert "--model is empty" in _error(capsys)


# fuzz of the results readers


DELETE = object()  # an edit that removes the key or element
JSON_LEAVES = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(-(2**70), 2**70),
    st.floats(allow_nan=True, allow_infinity=True),
    st.floats(0, 1),
    st.text(max_size=8),
)
JSON_VALUES = st.recursive(
    JSON_LEAVES,
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=6), inner, max_size=3),
    max_leaves=6,
)


def _nodes(value, path: tuple = ()) -> list[tuple]:
    """The path of every value inside a parsed JSON value (keys and indices from the top)."""
    items = value.items() if isinstance(value, dict) else enumerate(value) if isinstance(value, list) else ()
    return [path + (key,) for key, _ in items] + [p for key, sub in items for p in _nodes(sub, path + (key,))]


def _like(value) -> st.SearchStrategy:
    """Values of the kind of `value`: the plausible hand edit."""
    if isinstance(value, bool):
        return st.booleans()
    if isinstance(value, int):
        return st.integers(-3, 10**6)
    if isinstance(value, float) or value is None:
        return st.floats(0, 1) | st.floats(allow_nan=True, allow_infinity=True) | st.none()
    return st.text(max_size=8) if isinstance(value, str) else JSON_VALUES


def _node(data, path: tuple):
    return functools.reduce(lambda node, key: node[key], path, data)


def _edited(data, path: tuple, value) -> None:
    parent = _node(data, path[:-1])
    if value is DELETE:
        del parent[path[-1]]
    else:
        parent[path[-1]] = value


@settings(max_examples=500, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(data=st.data(), edits=st.integers(1, 3), cut=st.tuples(st.integers(0, 3), st.integers(0, 10**9)))
def test_results_reader_fuzz_gives_results_or_a_sink_eval_error(analyzed, tmp_path, data, edits, cut):
    """A results.json of tiny-qwen2 with up to three values anywhere in it replaced (by any JSON value or one of the
    same kind) or removed, and one time in four cut short: the readers of compare and scale accept it, and then
    compare, scale and their tables run, or they refuse it in a SinkEvalError; never another exception."""
    from sink_eval.analyses.scale import read_inputs, scale
    from sink_eval.reports.compare import compare_report
    from sink_eval.reports.scale import claims_table

    results = json.loads((analyzed("tiny-qwen2") / "results.json").read_text())
    for _ in range(edits):
        path = data.draw(st.sampled_from(_nodes(results)))
        _edited(results, path, data.draw(st.one_of(st.just(DELETE), JSON_VALUES, _like(_node(results, path)))))
    text = json.dumps(results).encode()
    fuzzed = tmp_path / "fuzzed"
    fuzzed.mkdir(exist_ok=True)
    (fuzzed / "results.json").write_bytes(text if cut[0] < 3 else text[: cut[1] % (len(text) + 1)])
    good = AnalysisResult.read(analyzed("tiny-llama"))
    try:
        compare_report(good, AnalysisResult.read(fuzzed), "good", "fuzzed")
        claims_table(scale(read_inputs([analyzed("tiny-llama"), fuzzed])))
    except SinkEvalError:
        return
