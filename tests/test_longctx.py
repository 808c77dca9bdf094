"""Long-context evaluation on tiny random models: passkey prompts, scoring, one-pass perplexity, controls, the CLI.

Random-initialised models only: nothing here is a finding about a real model."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from helpers import counted, random_model, read_committed_baseline
from transformers import DynamicCache

from sink_eval import baselines, cli
from sink_eval.core.errors import SinkEvalError
from sink_eval.core.shape import model_shape
from sink_eval.evals import longctx
from sink_eval.evals.longctx import LongctxResult
from sink_eval.measure.perplexity import token_nll
from sink_eval.models.load import load_model
from sink_eval.patches.copy import CopyPlan
from sink_eval.patches.streaming.plan import StreamingPlan
from sink_eval.policies import calibration
from sink_eval.policies.base import Target
from sink_eval.policies.calibrated import Calibrated
from sink_eval.policies.controls import CHOOSES_WELL, CHOOSES_WORSE, NOT_DISTINGUISHABLE, random_heads, verdict
from sink_eval.policies.registry import make_policy
from sink_eval.prompts.passkey import NEEDLE, evaluation_passages, is_correct, leading_special, make_trial, min_length
from sink_eval.prompts.prompt_set import long_passages


@pytest.fixture(scope="module")
def tiny():
    return load_model("tiny-llama")


def test_evaluation_passages_are_the_second_two_prose_and_second_two_code_passages():
    passages = long_passages()
    evaluation = evaluation_passages()
    for domain in ("prose", "code"):
        of_domain = [p.id for p in passages if p.domain == domain]
        assert [p.id for p in evaluation if p.domain == domain] == of_domain[2:]
    assert len(evaluation) == 4


@pytest.mark.parametrize("length", [120, 257, 1024])
@pytest.mark.parametrize("depth", [0.1, 0.5, 0.9])
def test_a_passkey_prompt_is_exactly_L_tokens_and_the_same_on_every_call(tiny, length, depth):
    first = make_trial(tiny.tokenizer, 3, 1, length, depth)
    again = make_trial(tiny.tokenizer, 3, 1, length, depth)
    assert len(first.input_ids) == length
    assert first == again
    assert first.key.isdigit() and len(first.key) == 5


def test_other_trials_and_seeds_draw_other_keys_and_haystacks(tiny):
    trials = [make_trial(tiny.tokenizer, seed, trial, 300, 0.5) for seed in (0, 1) for trial in range(4)]
    assert len({t.key for t in trials}) == len(trials)
    assert len({tuple(t.input_ids) for t in trials}) == len(trials)


@pytest.mark.parametrize("depth", [0.1, 0.5, 0.9])
def test_the_needle_follows_round_d_times_the_haystack_tokens(tiny, depth):
    tok = tiny.tokenizer
    t = make_trial(tok, 0, 2, 400, depth)
    special = len(leading_special(tok))
    question = len(tok("\nWhat is the pass key? The pass key is", add_special_tokens=False)["input_ids"])
    haystack = 400 - special - t.needle_tokens - question
    assert t.needle_start - special == round(depth * haystack)
    needle = tok.decode(t.input_ids[t.needle_start : t.needle_start + t.needle_tokens])
    assert needle == NEEDLE.format(key=t.key)
    assert tok.decode(t.input_ids[-question:]).endswith("The pass key is")


def test_a_length_without_room_for_a_haystack_is_refused(tiny):
    lowest = min_length(tiny.tokenizer)
    assert len(make_trial(tiny.tokenizer, 0, 0, lowest, 0.5).input_ids) == lowest
    with pytest.raises(SinkEvalError, match="leaves no haystack"):
        make_trial(tiny.tokenizer, 0, 0, lowest - 1, 0.5)


@pytest.mark.parametrize("depth", [0.0, 1.0, -0.2])
def test_a_depth_outside_the_open_unit_interval_is_refused(tiny, depth):
    with pytest.raises(SinkEvalError, match=r"in \(0, 1\)"):
        make_trial(tiny.tokenizer, 0, 0, 300, depth)


@pytest.mark.parametrize(
    ("answer", "correct"),
    [
        (" 12345", True),
        ("12345.", True),
        ("\n 123456", True),  # the first 5 characters are the key
        (" 1234", False),
        (" 12354", False),
        (" the key 12345", False),  # words first: no credit
        (" 1 2 3 4 5", False),
        ("", False),
    ],
)
def test_a_trial_is_correct_only_when_the_stripped_answer_starts_with_the_key(answer, correct):
    assert is_correct("12345", answer) is correct


def _step_by_step_nll(model, ids: torch.Tensor) -> torch.Tensor:
    """Reference: feed one token at a time through a KV cache, taking each step's next-token NLL."""
    cache = DynamicCache(config=model.config)
    out = []
    for t in range(ids.shape[1] - 1):
        logits = model(input_ids=ids[:, t : t + 1], cache=cache, use_cache=True).logits[0, -1].float()
        out.append(-torch.log_softmax(logits, -1)[ids[0, t + 1]])
    return torch.stack(out)


@pytest.mark.parametrize("arch", ["llama", "qwen2", "gemma3"])
def test_one_pass_perplexity_equals_the_token_by_token_reference(arch):
    model = random_model(arch, kv_heads=2, groups=2, head_dim=8, window=8)
    ids = torch.randint(1, 64, (1, 40), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        reference = _step_by_step_nll(model, ids)
    one_pass = token_nll(model, ids, chunk=7)  # chunks that do not divide N - 1
    assert one_pass.shape == (39,)
    torch.testing.assert_close(one_pass, reference, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(token_nll(model, ids), one_pass, atol=1e-6, rtol=1e-6)


SHAPE_CASES = [
    ({0: frozenset({0, 1, 2, 3}), 1: frozenset({5})}, range(3)),  # one whole group, one extra head
    ({1: frozenset({0, 2, 4, 6})}, range(3)),  # no whole group
    ({0: frozenset(range(8)), 2: frozenset({1, 2, 3, 4, 5})}, range(3)),
    ({2: frozenset({0, 1})}, [1, 2]),  # restricted candidate layers
]


@pytest.mark.parametrize(("heads", "layers"), SHAPE_CASES)
def test_a_control_plans_as_many_heads_and_whole_kv_groups_from_the_same_layers(heads, layers):
    shape = model_shape(random_model("llama", kv_heads=4, groups=2, head_dim=4, window=8))
    shape = type(shape)(**{**shape.__dict__, "layers": 3})
    for seed in range(5):
        control = random_heads(heads, shape, layers, seed)
        assert sum(map(len, control.values())) == sum(map(len, heads.values()))
        assert shape.n_whole_groups(control) == shape.n_whole_groups(heads)
        assert set(control) <= set(layers)
        assert control == random_heads(heads, shape, layers, seed)
    assert (
        len(
            {
                tuple(sorted((k, tuple(sorted(v))) for k, v in random_heads(heads, shape, layers, s).items()))
                for s in range(5)
            }
        )
        > 1
    )


def test_a_control_of_a_plan_outside_the_candidate_layers_is_refused():
    shape = model_shape(random_model("llama", kv_heads=2, groups=2, head_dim=4, window=8))
    with pytest.raises(SinkEvalError, match="not a candidate layer"):
        random_heads({0: frozenset({1})}, shape, [1], 0)


def test_a_policy_chooses_well_only_beyond_the_controls_spread_and_its_own_two_se():
    assert verdict(0.9, 0.01, [0.5, 0.6, 0.7]).verdict == CHOOSES_WELL  # d 0.3 > spread 0.2
    assert verdict(0.85, 0.01, [0.5, 0.6, 0.9]).verdict == NOT_DISTINGUISHABLE  # d 0.183 < spread 0.4
    assert verdict(0.7, 0.1, [0.55, 0.55, 0.55]).verdict == NOT_DISTINGUISHABLE  # d 0.15 < 2 SE = 0.2
    assert verdict(0.1, 0.01, [0.5, 0.6, 0.7]).verdict == CHOOSES_WORSE
    with pytest.raises(SinkEvalError):
        verdict(0.5, 0.1, [])


def _longctx(tmp_path, *extra: str) -> int:
    return cli.main(["longctx", "--model", "tiny-llama", "--out", str(tmp_path / "out"), *extra])


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--depths", "0,0.5"], "depths in (0, 1)"),
        (["--depths", "0.5,1"], "depths in (0, 1)"),
        (["--depths", "half"], "numbers in (0, 1)"),
        (["--lengths", "1024,1024"], "distinct whole numbers"),
        (["--lengths", "0"], "at least 1"),
        (["--trials", "0"], "at least 1"),
        (["--seeds", "0"], "at least 1"),
        (["--policy", "last_layer"], "invalid choice"),
    ],
)
def test_bad_longctx_arguments_are_refused_by_the_parser(tmp_path, capsys, args, message):
    with pytest.raises(SystemExit) as exit_info:
        _longctx(tmp_path, *args)
    assert exit_info.value.code == 2
    assert message in capsys.readouterr().err


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--lengths", "8192"], "--device cuda"),
        (["--policy", "hybrid", "--hybrid-base", "first_layer"], "static plans"),
        (["--policy", "oracle"], "longctx evaluates static plans, not the per-prompt policy 'oracle tau=0.8'"),
        (
            ["--policy", "streaming", "--threshold", "0.5"],
            "--threshold: no chosen policy (streaming) reads this option",
        ),
        (["--lengths", "10"], "leaves no haystack"),  # checked once the tokenizer is loaded
    ],
)
def test_longctx_rules_are_one_line_errors_with_exit_status_2(tmp_path, capsys, args, message):
    assert _longctx(tmp_path, *args) == 2
    err = capsys.readouterr().err.strip()
    assert message in err and "\n" not in err
    assert not (tmp_path / "out").exists()


def test_longctx_writes_results_report_and_heatmap_with_unpatched_policy_and_controls(tmp_path, monkeypatch):
    """A plumbing check: the calibrated policy calibrates on the first 8 calibration prompts (to keep the test short)
    and its plan is replaced by a fixed one of 5 heads (a random tiny model's sink scores put every head or none
    past any one threshold)."""
    prompts, evaluation = calibration.default_split()
    monkeypatch.setattr(calibration, "default_split", lambda: (prompts[:8], evaluation))
    monkeypatch.setattr(Calibrated, "plan", lambda *args: CopyPlan.of({0: [0, 1, 2, 3], 1: [1]}))
    args = ["--lengths", "128,160", "--depths", "0.25,0.75", "--trials", "1", "--seeds", "2"]
    assert _longctx(tmp_path, *args) == 0
    out = tmp_path / "out"
    res = LongctxResult.from_json(json.loads((out / "results.json").read_text()), out / "results.json")
    assert [r.role for r in res.runs] == ["unpatched", "policy", "control", "control"]
    policy = res.runs[1]
    assert policy.fraction_heads > 0
    assert all(r.fraction_heads == policy.fraction_heads and r.kv_groups == policy.kv_groups for r in res.runs[2:])
    for r in res.runs:
        assert [row.length for row in r.lengths] == [128, 160]
        for row in r.lengths:
            assert [c.depth for c in row.passkey] == [0.25, 0.75]
            useful = [c.informative for c in row.passkey]
            planned = [1, 1] if r.role == "unpatched" else longctx._plan_trials(useful, res.settings)
            assert [len(c.correct) for c in row.passkey] == planned
    assert res.runs[0].lengths[0].perplexity_ratio is None and policy.lengths[0].perplexity_ratio is not None
    assert [(c.label, c.length) for c in res.comparisons] == [(policy.label, 128), (policy.label, 160)]
    assert (out / "passkey_heatmap.png").stat().st_size > 0
    assert "## Policy x length" in (out / "report.md").read_text()


@pytest.fixture(scope="module")
def tiny_result(tiny):
    plan = CopyPlan.of({0: [0, 1, 2, 3], 1: [1]})
    return longctx.run(tiny, [longctx.NamedPlan("fixed", "calibrated", plan)], [128], [0.5], 1, [0], progress=False)


@pytest.mark.parametrize("warm_up", [True, False])
@pytest.mark.parametrize(
    ("right", "plan_trials"),
    [((True, True), [4, 4]), ((True, False), [4, 0]), ((False, False), [0, longctx.TIMING_TRIALS])],
)
def test_a_plan_runs_the_informative_cells_or_else_timing_trials_of_the_deepest(
    tiny, monkeypatch, right, plan_trials, warm_up
):
    """A random tiny model answers no passkey: `is_correct` is replaced by one that marks the unpatched run's trials
    (the first 2 x 4 scored) right in the cells `right` says, and every later one wrong."""
    calls = []

    def scored(key: str, answer: str) -> bool:
        calls.append(key)
        return len(calls) <= 8 and right[(len(calls) - 1) // 4]

    monkeypatch.setattr(longctx, "is_correct", scored)
    plan = StreamingPlan.of({0: range(model_shape(tiny.model).heads)}, sink=2, window=16)
    named = [longctx.NamedPlan("s", "streaming", plan)]
    res = longctx.run(tiny, named, [128], [0.25, 0.75], 4, [0], progress=False, warm_up=warm_up)
    unpatched, policy, control = (r.lengths[0] for r in res.runs)
    assert [len(c.correct) for c in unpatched.passkey] == [4, 4]
    assert [c.informative for c in unpatched.passkey] == list(right)
    for row in (policy, control):
        assert [len(c.correct) for c in row.passkey] == plan_trials
        assert [c.informative for c in row.passkey] == list(right)
        assert (row.accuracy is None) is (not any(right))  # timing trials never count
        assert None not in (row.speedup, row.prefill_speedup, row.decode_speedup)
        assert 0 < row.kv_bytes < unpatched.kv_bytes  # the streamed cache, measured
    assert len(calls) == 8 + 2 * sum(plan_trials)


def test_a_speedup_sets_the_trials_a_plan_ran_beside_the_same_trials_of_the_unpatched_run():
    def measured(*seconds: list[float]) -> longctx._Measured:
        cells = [longctx._Trials(0.5, [], [], [], s, s, s) for s in seconds]
        return longctx._Measured("r", cells, [1.0], 0)

    reference = measured([1.0, 2.0, 3.0, 4.0], [8.0, 8.0, 8.0, 8.0])
    run = measured([1.0, 1.0, 1.0], [])  # the first 3 trials of the first cell only
    assert longctx._speedup(run, reference, "decode_seconds") == pytest.approx(6.0 / 3.0)
    assert longctx._speedup(measured([], []), reference, "seconds") is None
    assert longctx._speedup(reference, None, "seconds") is None


@pytest.fixture
def fixed_plan_cli(monkeypatch):
    """`sink-eval longctx` on 4 calibration prompts, every policy's plan a fixed copy plan (for the resume tests)."""
    prompts, evaluation = calibration.default_split()
    monkeypatch.setattr(calibration, "default_split", lambda: (prompts[:4], evaluation))
    monkeypatch.setattr(Calibrated, "plan", lambda *args: CopyPlan.of({0: [0, 1, 2, 3], 1: [1]}))


def test_an_interrupted_longctx_run_holds_whole_lengths_and_resumes_to_the_uninterrupted_result(
    fixed_plan_cli, tmp_path, monkeypatch, capsys
):
    from sink_eval.core.resume import work_dir

    args = ["--lengths", "128,160", "--depths", "0.5", "--trials", "1", "--seeds", "1"]
    whole = tmp_path / "whole"
    assert cli.main(["longctx", "--model", "tiny-llama", *args, "--out", str(whole)]) == 0
    real = longctx._measure
    out = tmp_path / "resumed"
    monkeypatch.setattr(longctx, "_measure", counted(real, kill_after=3)[0])
    assert cli.main(["longctx", "--model", "tiny-llama", *args, "--out", str(out)]) == 130
    measure, calls = counted(real)
    monkeypatch.setattr(longctx, "_measure", measure)
    saved = sorted(f.name for f in work_dir(out, "longctx").glob("run-*.json"))
    assert not out.exists() and saved == ["run-000-L128.json", "run-001-L128.json", "run-002-L128.json"]  # length-major
    capsys.readouterr()
    assert cli.main(["longctx", "--model", "tiny-llama", *args, "--out", str(out)]) == 2
    assert "pass --resume" in capsys.readouterr().err
    assert cli.main(["longctx", "--model", "tiny-llama", *args, "--trials", "2", "--out", str(out), "--resume"]) == 2
    assert "another settings" in capsys.readouterr().err
    assert cli.main(["longctx", "--model", "tiny-llama", *args, "--out", str(out), "--resume"]) == 0
    assert len(calls) == 3  # of the 6 (run, length) measurements, the 3 saved ones were read back
    assert not work_dir(out, "longctx").exists()
    results = [json.loads((d / "results.json").read_text()) for d in (whole, out)]
    for res in results:
        del res["provenance"]
        for run in res["runs"]:
            for row in run["lengths"]:
                del row["passkey_seconds"], row["speedup"], row["prefill_speedup"], row["decode_speedup"]
    assert results[1] == results[0]


def test_a_length_left_part_measured_is_measured_again_whole_on_resume(fixed_plan_cli, tmp_path, monkeypatch, capsys):
    from sink_eval.core.resume import work_dir

    args = ["--lengths", "128,160", "--depths", "0.5", "--trials", "1", "--seeds", "1", "--out", str(tmp_path / "r")]
    real = longctx._measure
    monkeypatch.setattr(longctx, "_measure", counted(real, kill_after=4)[0])
    assert cli.main(["longctx", "--model", "tiny-llama", *args]) == 130
    work = work_dir(tmp_path / "r", "longctx")
    begun = {"run-000-L128.json", "run-001-L128.json", "run-002-L128.json", "run-000-L160.json"}
    assert {f.name for f in work.glob("run-*.json")} == begun  # 128 whole, 160 begun
    measure, calls = counted(real)
    monkeypatch.setattr(longctx, "_measure", measure)
    capsys.readouterr()
    assert cli.main(["longctx", "--model", "tiny-llama", *args, "--resume"]) == 0
    assert len(calls) == 3  # the 3 runs at 160, its saved unpatched run among them; 128 read back
    assert "length 160 was left part-measured" in capsys.readouterr().err


def test_a_longctx_baseline_bands_every_run_and_refuses_a_widened_band(tiny_result, tmp_path):
    measured = baselines.make_longctx_baseline(tiny_result, "test", 1.0)
    keys = set(measured.values)
    assert "perplexity/unpatched/L=128" in keys and "perplexity_ratio/fixed/L=128" in keys
    assert {"passkey/unpatched/L=128", "passkey/fixed/L=128", "passkey/random(fixed) seed=0/L=128"} <= keys
    path = tmp_path / "b.json"
    baselines.write_baseline(path, measured)
    assert baselines.read_baseline(path, baselines.LONGCTX) == measured
    data = json.loads(path.read_text())
    data["values"]["perplexity/unpatched/L=128"] |= {"lo": 0, "hi": 1e9}
    path.write_text(json.dumps(data))
    with pytest.raises(SinkEvalError, match="edited by hand"):
        baselines.read_baseline(path, baselines.LONGCTX)


def test_a_longctx_baseline_of_other_plans_is_not_comparable(tiny_result, tmp_path):
    measured = baselines.make_longctx_baseline(tiny_result, "test", 1.0)
    other = baselines.make_longctx_baseline(tiny_result, "test", 1.0)
    other.provenance.plans["fixed"] = CopyPlan.of({0: [0]}).to_json()
    with pytest.raises(SinkEvalError, match="other plans"):
        baselines.check_comparable(other, measured, tmp_path / "b.json", baselines.LONGCTX.identity)


def test_the_committed_longctx_baseline_is_readable():
    path = Path(__file__).parents[1] / "baselines" / "longctx" / "smollm2-135m.json"
    baseline = read_committed_baseline(path, baselines.LONGCTX)
    assert isinstance(baseline, baselines.LongctxBaseline)
    assert set(baseline.passage_nll) == {"unpatched", *baseline.provenance.plans}


def test_the_committed_longctx_grids_read_as_this_schemas_results():
    grids = sorted((Path(__file__).parents[1] / "baselines" / "longctx").glob("*/results.json"))
    assert grids, "baselines/longctx/ holds the committed grids"
    for path in grids:
        res = LongctxResult.from_json(json.loads(path.read_text()), path)
        assert res.provenance.command.startswith("sink-eval longctx") and res.runs[0].label == longctx.UNPATCHED


def test_a_length_past_the_context_or_the_shortest_passage_is_refused(tiny, monkeypatch):
    monkeypatch.setattr(longctx, "model_context", lambda model: 200)
    with pytest.raises(SinkEvalError, match="exceeds tiny-llama's context of 200 tokens"):
        longctx.check_lengths(tiny, [128, 256])
    monkeypatch.setattr(longctx, "model_context", lambda model: None)
    short = [type(p)(p.id, p.domain, p.text[:150]) for p in evaluation_passages()]
    monkeypatch.setattr(longctx, "evaluation_passages", lambda: short)
    with pytest.raises(SinkEvalError, match="exceeds the shortest evaluation long passage"):
        longctx.check_lengths(tiny, [160])
    longctx.check_lengths(tiny, [120])


def test_kv_groups_removed_counts_whole_groups_and_none_for_a_conditional_plan(tiny):
    shape = model_shape(tiny.model)
    g = shape.group_size
    plan = CopyPlan.of({0: range(g), 1: [0]})
    assert plan.kv_groups_removed(shape) == 1
    assert CopyPlan(plan.heads, max_tokens=64).kv_groups_removed(shape) == 0


def test_a_streaming_plan_runs_with_controls_in_its_candidate_layers():
    gemma = load_model("tiny-gemma3")
    layers = StreamingPlan.candidate_layers(gemma.model)
    shape = model_shape(gemma.model)
    plan = StreamingPlan.of({layers[0]: range(shape.heads)}, sink=2, window=16)
    res = longctx.run(gemma, [longctx.NamedPlan("s", "streaming", plan)], [128], [0.5], 1, [0, 1], progress=False)
    policy, *controls = res.runs[1:]
    assert policy.kv_groups == shape.kv_heads and policy.lengths[0].kv_saved_bytes > 0
    for control in controls:
        assert set(map(int, control.plan["heads"])) <= set(layers) and control.kv_groups == policy.kv_groups
        assert control.plan["sink"] == 2 and control.plan["window"] == 16


def test_streaming_llm_gets_no_control_and_the_reproduction_has_three_rows(tiny):
    plan = make_policy("streaming_llm", sink=4, window=32).plan(Target.of(tiny.model, "streaming"))
    res = longctx.run(
        tiny,
        [longctx.NamedPlan("sl", "streaming_llm", plan)],
        [1100],
        [0.5],
        1,
        [0],
        progress=False,
        streaming_llm=True,
    )
    assert [r.role for r in res.runs] == ["unpatched", "policy"] and not res.comparisons
    rep = res.streaming_llm
    assert rep is not None and [(r.sink, r.window) for r in rep.rows] == [(0, 1024), (4, 1020), (None, None)]
    assert rep.rows[-1].perplexity == pytest.approx(res.runs[0].lengths[0].perplexity)


def test_longctx_runs_a_streaming_policy_from_the_command_line(tmp_path, monkeypatch):
    prompts, evaluation = calibration.default_split()
    monkeypatch.setattr(calibration, "default_split", lambda: (prompts[:4], evaluation))
    args = ["--policy", "streaming", "--fraction", "0.5", "--sink", "2", "--window", "16", "--long-tokens", "256"]
    assert _longctx(tmp_path, *args, "--lengths", "128", "--depths", "0.5", "--trials", "1", "--seeds", "1") == 0
    res = LongctxResult.from_json(json.loads((tmp_path / "out" / "results.json").read_text()), "r")
    assert [r.role for r in res.runs] == ["unpatched", "policy", "control"] and res.runs[1].kv_groups > 0
