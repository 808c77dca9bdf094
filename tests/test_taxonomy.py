"""The head taxonomy (`sink-eval taxonomy`): class rules, KV groups under GQA, overlaps, the random repeated
sequences, induction/echo scores against their definitions, bad input, and the command end to end on tiny random
models (whose numbers are never findings)."""

from __future__ import annotations

import json
from types import SimpleNamespace

import pytest
import torch

from sink_eval import cli
from sink_eval.analyses import taxonomy
from sink_eval.analyses.taxonomy import Thresholds
from sink_eval.core.errors import SinkEvalError
from sink_eval.measure.probe import PromptStats, probe
from sink_eval.models.load import load_model
from sink_eval.prompts.prompt_set import Prompt

WINDOWS = [(1, 4), (4, 16)]


def _stats(sink, prev, streaming: dict, n_tokens: int = 100) -> PromptStats:
    sink = torch.tensor(sink, dtype=torch.float)
    return PromptStats(
        n_tokens,
        sink,
        torch.zeros_like(sink),
        torch.tensor(prev, dtype=torch.float),
        {window: torch.tensor(v, dtype=torch.float) for window, v in streaming.items()},
    )


def test_each_class_is_its_score_at_or_above_its_threshold_and_streaming_never_in_a_sliding_layer():
    stats = _stats(
        sink=[[0.8, 0.79], [0.9, 0.1]],
        prev=[[0.0, 0.8], [0.85, 0.0]],
        streaming={(1, 4): [[0.9, 0.95], [0.95, 0.89]], (4, 16): [[float("nan"), 1.0], [1.0, 1.0]]},
    )
    classes = taxonomy.length_classes(stats, WINDOWS, Thresholds(), torch.tensor([False, True]))
    assert classes["sink"].tolist() == [[True, False], [True, False]]
    assert classes["previous"].tolist() == [[False, True], [True, False]]
    assert classes["streaming(1,4)"].tolist() == [[True, True], [False, False]]  # layer 1 is windowed
    assert classes["streaming(4,16)"].tolist() == [[False, True], [False, False]]  # NaN: in no class
    assert classes["windowed"].tolist() == [[False, False], [True, True]]


def test_a_kv_group_is_in_a_class_only_when_all_its_query_heads_are():
    # 6 query heads, group size 3 (GQA): head h belongs to KV group h // 3
    members = torch.tensor([[True, True, True, True, True, False], [False, True, True, True, True, True]])
    assert taxonomy.kv_groups(members, 3).tolist() == [[True, False], [False, True]]
    assert taxonomy.kv_groups(members, 1).tolist() == members.tolist()
    assert taxonomy.kv_groups(members, 6).tolist() == [[False], [False]]


def test_class_fractions_count_heads_and_kv_groups_per_input_and_their_mean():
    # 2 inputs x 1 layer x 4 heads, group size 2
    members = torch.tensor([[[True, True, True, False]], [[True, True, False, False]]])
    stats = taxonomy.class_stats("c", members, members.float(), group_size=2)
    assert stats.per_input_heads == [0.75, 0.5] and stats.heads == pytest.approx(0.625)
    assert stats.per_input_kv_groups == [0.5, 0.5] and stats.kv_groups == pytest.approx(0.5)
    assert stats.kv_groups_se == 0.0 and stats.heads_se is not None and stats.heads_se > 0
    assert stats.consistency == [[1.0, 1.0, 0.5, 0.0]]
    assert stats.members().tolist() == [[True, True, False, False]]  # a member on more than half the inputs


def test_overlaps_count_heads_in_both_classes_with_each_class_on_the_diagonal():
    members = {
        "sink": torch.tensor([[True, False, False]]),
        "streaming(4,256)": torch.tensor([[True, True, False]]),
        "induction": torch.tensor([[False, True, True]]),
    }
    res = taxonomy.overlaps(members)
    assert res.classes == ["sink", "streaming(4,256)", "induction"]
    assert res.heads == [[1, 1, 0], [1, 2, 1], [0, 1, 2]]


def test_primary_class_is_the_first_of_the_stated_precedence_else_other():
    precedence = taxonomy.primary_precedence([(4, 256), (1, 16), (4, 16)])
    assert precedence == [
        "windowed",
        "sink",
        "induction",
        "echo",
        "previous",
        "streaming(1,16)",
        "streaming(4,16)",
        "streaming(4,256)",
    ]
    f, t = False, True
    members = {name: torch.tensor([[f, f, f, f]]) for name in precedence}
    members["sink"] = torch.tensor([[t, f, f, f]])
    members["induction"] = torch.tensor([[t, t, f, f]])
    members["streaming(4,256)"] = torch.tensor([[t, t, t, f]])
    assert taxonomy.primary_classes(members, precedence) == [["sink", "induction", "streaming(4,256)", "other"]]


def test_repeated_random_ids_are_fixed_by_the_seed_and_repeat_with_the_period():
    tokenizer = load_model("tiny-gemma3").tokenizer
    ids = taxonomy.repeated_random_ids(tokenizer, seed=3, period=16, repeats=4)
    assert ids == taxonomy.repeated_random_ids(tokenizer, seed=3, period=16, repeats=4)
    assert ids != taxonomy.repeated_random_ids(tokenizer, seed=4, period=16, repeats=4)
    prefix = tokenizer("")["input_ids"]
    assert prefix == [tokenizer.bos_token_id] and ids[:1] == prefix and len(ids) == 1 + 4 * 16
    body = ids[1:]
    assert all(body[i] == body[i % 16] for i in range(len(body)))
    assert not set(body) & set(tokenizer.all_special_ids)
    assert taxonomy.repeated_random_ids(load_model("tiny-llama").tokenizer, seed=3, period=16)[:16] == body[:16]


def test_ordinary_ids_leave_out_special_and_added_tokens_and_gguf_padding_placeholders():
    assert taxonomy.ordinary_token_ids(load_model("tiny-llama").tokenizer).tolist() == list(range(3, 259))
    vocab = {"<s>": 0, "a": 1, "b": 2, "<|fim|>": 3, "[PAD4]": 4, "[PAD]": 5}
    stub = SimpleNamespace(
        backend_tokenizer=SimpleNamespace(get_vocab=lambda with_added_tokens: vocab),
        all_special_ids=[0],
        added_tokens_decoder={3: "<|fim|>"},
    )
    assert taxonomy.ordinary_token_ids(stub).tolist() == [1, 2, 5]


def _eager_attentions(model, ids: list[int]) -> torch.Tensor:
    model.set_attn_implementation("eager")
    try:
        out = model(input_ids=torch.tensor([ids]), use_cache=False, output_attentions=True)
    finally:
        model.set_attn_implementation("sdpa")
    return torch.stack(out.attentions, dim=1)[0]  # (layers, heads, N, N)


@pytest.mark.parametrize("name", ["tiny-llama", "tiny-gemma3"])  # no prefix; a <bos> prefix and sliding layers
def test_induction_and_echo_scores_equal_their_per_query_definitions_on_eager_attention(name):
    loaded = load_model(name)
    period, repeats = 8, 4
    ids = taxonomy.repeated_random_ids(loaded.tokenizer, seed=0, period=period, repeats=repeats)
    stats = probe(loaded.model, torch.tensor([ids]), offsets=taxonomy.repeat_offsets(period, repeats)).stats[0]
    attn = _eager_attentions(loaded.model, ids)
    n = len(ids)
    successors = torch.stack(
        [sum(attn[..., i, i - r * period + 1] for r in range(1, repeats) if i >= r * period) for i in range(period, n)]
    )
    occurrences = torch.stack(
        [
            sum(attn[..., i, i - r * period] for r in range(1, repeats) if i - r * period >= 1)
            for i in range(period + 1, n)
        ]
    )
    torch.testing.assert_close(taxonomy.induction_score(stats, period, repeats), successors.mean(0), atol=1e-5, rtol=0)
    torch.testing.assert_close(taxonomy.echo_score(stats, period, repeats), occurrences.mean(0), atol=1e-5, rtol=0)


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("4-256", "write each window as s:w"),
        ("4:256,", "write each window as s:w"),
        ("a:b", "write each window as s:w"),
        ("-1:16", r"s >= 0 sink tokens and w >= 1 keys, not \(-1, 16\)"),
        ("1:0", r"s >= 0 sink tokens and w >= 1 keys, not \(1, 0\)"),
        ("1:16,1:16", "gives 1:16 twice"),
    ],
)
def test_bad_windows_are_refused_with_what_to_write(text, message):
    with pytest.raises(SinkEvalError, match=message):
        taxonomy.parse_windows(text)


def test_windows_parse_in_order():
    assert taxonomy.parse_windows("1:16, 4:256,0:8") == [(1, 16), (4, 256), (0, 8)]


def test_a_length_not_beyond_s_plus_w_is_refused_naming_the_window_and_why():
    taxonomy.check_lengths([261], [(4, 256)])
    with pytest.raises(SinkEvalError) as err:
        taxonomy.check_lengths([1024, 260], [(1, 16), (4, 256)])
    assert str(err.value) == (
        "length 260 is not longer than s + w = 4 + 256 = 260 of window 4:256: a 260-token input has no query "
        "i >= s + w, so its streaming score would be undefined; give lengths above 260 or a smaller window"
    )


def test_a_length_beyond_a_passage_or_the_context_is_refused_before_any_probe():
    loaded = load_model("tiny-llama")
    with pytest.raises(SinkEvalError, match="exceeds tiny-llama's context of 4096 tokens"):
        taxonomy.passage_inputs(loaded, [1024, 8192])
    short = [Prompt("p", "prose", "x" * 100), Prompt("q", "code", "y" * 50)]
    with pytest.raises(SinkEvalError, match="exceeds the long passage 'q', 50 tokens .*give lengths up to 50"):
        taxonomy.passage_inputs(loaded, [64], short)
    cut = taxonomy.passage_inputs(loaded, [16, 32], short)
    assert [len(p.input_ids) for p in cut[16]] == [16, 16] and [p.n_tokens for p in cut[32]] == [100, 50]


def test_a_period_below_two_or_too_long_for_the_context_is_refused():
    loaded = load_model("tiny-llama")
    with pytest.raises(SinkEvalError, match="at least 2 tokens"):
        taxonomy.check_repeats_fit(loaded, 1)
    with pytest.raises(SinkEvalError, match="4 repeats make 4100 tokens, beyond tiny-llama's context of 4096"):
        taxonomy.check_repeats_fit(loaded, 1025)


def test_sliding_window_layers_are_windowed_and_the_rest_global():
    gemma = taxonomy.layout(load_model("tiny-gemma3"))
    assert (gemma.windowed_layers, gemma.global_layers, gemma.sliding_window, gemma.group_size) == (
        [0, 1, 2],
        [3],
        8,
        2,
    )
    qwen = taxonomy.layout(load_model("tiny-qwen2"))
    assert (qwen.windowed_layers, qwen.global_layers, qwen.sliding_window, qwen.group_size) == (
        [],
        [0, 1, 2, 3],
        None,
        7,
    )


def test_gqa_kv_group_fractions_on_tiny_qwen2_follow_the_all_query_heads_rule():
    loaded = load_model("tiny-qwen2")  # 7 query heads per KV group
    passages = taxonomy.passage_inputs(loaded, [40])
    probed = taxonomy.probe_inputs(loaded, passages, [(1, 4), (1, 32)], seeds=2, period=8, progress=False)
    res = taxonomy.results(loaded, probed, [(1, 4), (1, 32)], Thresholds(streaming=0.5), period=8)
    for window in ((1, 4), (1, 32)):
        maps = torch.stack([s.streaming[window] >= 0.5 for s in probed.passage_stats[40]])  # (inputs, layers, 7)
        got = res.at(40).get(taxonomy.streaming_name(window))
        assert got.per_input_kv_groups == pytest.approx(maps.all(-1).float().mean(dim=1).tolist())
        assert got.per_input_heads == pytest.approx(maps.float().mean(dim=(1, 2)).tolist())


def _taxonomy_args(out, *extra: str) -> list[str]:
    return [
        "taxonomy",
        "--model",
        "tiny-llama",
        "--lengths",
        "64,128",
        "--windows",
        "1:4,4:16",
        "--period",
        "16",
        "--seeds",
        "2",
        "--out",
        str(out),
        *extra,
    ]


@pytest.fixture(scope="module")
def taxonomy_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("taxonomy") / "out"
    assert cli.main(_taxonomy_args(out)) == 0
    return out


def test_taxonomy_command_writes_results_report_and_class_map(taxonomy_run):
    assert sorted(p.name for p in taxonomy_run.iterdir()) == [
        ".sink_eval-output.json",
        "class_map.png",
        "report.md",
        "results.json",
    ]
    assert json.loads((taxonomy_run / "results.json").read_text())["schema"] == "sink_eval.taxonomy/1"
    res = taxonomy.TaxonomyResult.read(taxonomy_run)
    assert res.model.name == "tiny-llama" and res.model.fingerprint.startswith("tiny-sha256:")
    assert res.settings.lengths == [64, 128] and res.settings.windows == [[1, 4], [4, 16]]
    assert [len(s.inputs) for s in res.lengths] == [8, 8] and len(res.settings.passages) == 8
    assert [c.name for c in res.at(64).classes] == ["windowed", "sink", "previous", "streaming(1,4)", "streaming(4,16)"]
    assert res.at(128).overlaps.classes[-2:] == ["induction", "echo"]
    assert len(res.at(128).primary) == 4 and len(res.at(128).primary[0]) == 4
    assert res.repeats.seeds == [0, 1] and res.repeats.n_tokens == 64 and res.repeats.prefix == []
    assert res.provenance.versions["torch"] == torch.__version__
    report = (taxonomy_run / "report.md").read_text()
    assert "![primary class per layer and head](class_map.png)" in report
    assert "## Streaming KV groups against pure sinks" in report and "Every layer is global" in report


def test_taxonomy_results_round_trip_through_json_unchanged(taxonomy_run):
    res = taxonomy.TaxonomyResult.read(taxonomy_run)
    assert taxonomy.TaxonomyResult.from_json(json.loads(json.dumps(res.to_json())), "x") == res
    assert res.to_json() == json.loads((taxonomy_run / "results.json").read_text())


def test_a_mistyped_or_missing_taxonomy_field_is_an_error_naming_file_and_field(taxonomy_run, tmp_path):
    data = json.loads((taxonomy_run / "results.json").read_text())
    data["lengths"][1]["classes"][2]["kv_groups"] = "many"
    path = tmp_path / "results.json"
    path.write_text(json.dumps(data))
    with pytest.raises(SinkEvalError, match=rf"^{path}: lengths\[1\]\.classes\[2\]\.kv_groups should be a number"):
        taxonomy.TaxonomyResult.read(path)
    data = json.loads((taxonomy_run / "results.json").read_text())
    del data["repeats"]["induction"]
    with pytest.raises(SinkEvalError, match=r"^x: repeats\.induction is missing$"):
        taxonomy.TaxonomyResult.from_json(data, "x")


def test_an_existing_taxonomy_output_is_replaced_only_with_overwrite(taxonomy_run, capsys):
    assert cli.main(_taxonomy_args(taxonomy_run)) == 2
    assert "already exists" in capsys.readouterr().err


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        (["--windows", "4/16"], "--windows '4/16': write each window as s:w"),
        (["--windows", "1:0"], "w >= 1 keys"),
        (["--windows=-2:8"], "s >= 0 sink tokens"),
        (["--lengths", "16,128"], "length 16 is not longer than s + w = 4 + 16 = 20 of window 4:16"),
        (["--lengths", "64,99999"], "exceeds tiny-llama's context of 4096 tokens"),
    ],
)
def test_bad_taxonomy_input_is_a_one_line_error_and_exit_2_before_any_probe(
    tmp_path, capsys, monkeypatch, extra, message
):
    def no_probe(*args, **kwargs):
        raise AssertionError("probed despite bad input")

    monkeypatch.setattr(taxonomy, "probe", no_probe)
    assert cli.main([*_taxonomy_args(tmp_path / "out"), *extra]) == 2
    err = capsys.readouterr().err
    assert err.startswith("sink-eval: error: ") and message in err and err.count("\n") == 1
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("lengths", ["1024,1024", "1024,x", "0"])
def test_a_bad_taxonomy_length_list_is_refused_by_the_parser(tmp_path, capsys, lengths):
    with pytest.raises(SystemExit) as exit_info:
        cli.main([*_taxonomy_args(tmp_path / "out"), "--lengths", lengths])
    assert exit_info.value.code == 2
    assert "argument --lengths" in capsys.readouterr().err


def test_cli_defaults_are_the_taxonomy_defaults():
    args = cli.build_parser().parse_args(["taxonomy", "--out", "x"])
    assert args.lengths == list(taxonomy.DEFAULT_LENGTHS)
    assert taxonomy.parse_windows(args.windows) == list(taxonomy.DEFAULT_WINDOWS)
    assert Thresholds(args.tau, args.threshold, args.induction_threshold) == Thresholds()
    assert (args.period, args.seeds) == (taxonomy.PERIOD, taxonomy.REPEAT_SEEDS)


def test_heads_of_sliding_window_layers_are_windowed_never_streaming_and_the_report_says_so():
    from sink_eval.reports.taxonomy import headline_table, taxonomy_report

    loaded = load_model("tiny-gemma3")  # layers 0-2 slide over 8 keys: all their mass is in the last 32 keys
    passages = taxonomy.passage_inputs(loaded, [48])
    probed = taxonomy.probe_inputs(loaded, passages, [(1, 32)], seeds=2, period=8, progress=False)
    res = taxonomy.results(loaded, probed, [(1, 32)], period=8)
    streaming = res.at(48).get("streaming(1,32)")
    assert all(v == pytest.approx(1.0, abs=1e-4) for row in streaming.mean_score[:3] for v in row)
    assert all(v == 0.0 for row in streaming.consistency[:3] for v in row)
    assert res.at(48).get("windowed").heads == 0.75 and res.at(48).get("windowed").kv_groups == 0.75
    assert all(c == "windowed" for row in res.at(48).primary[:3] for c in row)
    report = taxonomy_report(res, "class_map.png")
    assert "sliding-window layers (window 8, `layer_types` = sliding_attention): [0, 1, 2]" in report
    assert "streaming score >= 0.9 (global layers only)" in report
    assert "streaming(1,32), of global-layer heads" in headline_table(res)  # the only candidates
