"""`sink-eval gpu-suite`: its dry run (the suite's code path on the CPU at tiny shapes, as CI runs it), its argument
checks, the bytes-floor arithmetic at the Llama-3.1-8B shape, and the resumable lm-eval part."""

from __future__ import annotations

import json
import time

import pytest
import torch

pytest.importorskip("lm_eval", reason="the evals extra (lm-eval) is not installed")

from sink_eval import cli  # noqa: E402
from sink_eval.core.errors import SinkEvalError  # noqa: E402
from sink_eval.core.resume import work_dir  # noqa: E402
from sink_eval.evals import gpu_suite  # noqa: E402
from sink_eval.evals.gpu_suite import GpuSuiteResult  # noqa: E402

GIB = 2**30


def test_the_dry_run_writes_every_part_labelled_as_no_gpu_figure(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)  # where a GPU run would write baselines/gpu/: the dry run must not
    start = time.monotonic()
    assert cli.main(["gpu-suite", "--dry-run", "--out", "suite"]) == 0
    wall = time.monotonic() - start
    res = GpuSuiteResult.read(tmp_path / "suite")
    assert res.device.dry_run and res.device.name == "cpu (dry run)"
    assert "not a measurement" in res.device.bandwidth.source
    cfg = gpu_suite.config(dry_run=True)
    assert len(res.correctness) == len(cfg.correctness_models) * len(cfg.dtypes) * 6 and not res.failed
    assert {c.dtype for c in res.correctness} == {"float32", "bfloat16"}
    bf16 = [c for c in res.correctness if c.dtype == "bfloat16" and "relative error" in c.what]
    assert all(0 < c.value < c.tolerance for c in bf16)  # a real rounding difference, within its tolerance
    assert len(res.speed) == len(cfg.speed_models) * len(cfg.lengths) * len(cfg.batches)
    for case in res.speed:
        assert case.skipped is None and case.label.startswith("dry run:") and "not a GPU figure" in case.label
        assert case.kv_patched_bytes < case.kv_unpatched_bytes  # the streamed groups keep s + w entries
        assert case.floor_speedup > 1 and case.decode_ceiling >= 1 and case.prefill_ceiling >= 1
        assert case.peak_unpatched_bytes is None  # no device memory on the CPU
    (part,) = res.evals
    assert part.status == "complete" and part.results_file == "eval-tiny-llama.json"
    assert set(part.summary) == {"unpatched", "calibrated p=0.9 tau=0.8"}
    assert json.loads((tmp_path / "suite" / part.results_file).read_text())["schema"] == "sink_eval.eval/3"
    report = (tmp_path / "suite" / "report.md").read_text()
    assert "none of its numbers is a GPU figure" in report and "| FAIL" not in report
    assert not (tmp_path / "baselines").exists() and not work_dir(tmp_path / "suite", "gpu-suite").exists()
    assert "correctness checks passed" in capsys.readouterr().out
    assert wall < 180  # about 30 s here on a busy machine; CI-sized


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--out", "x"], "no CUDA device here"),
        (["--dry-run", "--device", "cuda", "--out", "x"], "drop --device"),
        (["--dry-run", "--budget-s", "10", "--out", "x"], "leaves no time"),
        (["--dry-run", "--parts", "speed,bogus", "--out", "x"], "--parts"),
        (["--dry-run", "--resume", "--out", "x"], None),  # --resume of nothing: allowed, checked below
    ],
)
def test_arguments_are_checked_before_anything_loads(tmp_path, monkeypatch, capsys, args, message):
    monkeypatch.chdir(tmp_path)
    if message is None:
        return
    monkeypatch.setattr(gpu_suite, "run", lambda *a, **k: pytest.fail("the suite ran"))
    assert cli.main(["gpu-suite", *args]) == 2
    err = capsys.readouterr().err
    assert message in err and len(err.strip().splitlines()) == 1


def test_an_interrupted_suite_is_refused_without_resume(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    work_dir(tmp_path / "suite", "gpu-suite").mkdir()
    assert cli.main(["gpu-suite", "--dry-run", "--out", "suite"]) == 2
    assert "--resume" in capsys.readouterr().err


def test_the_llama_8b_shape_holds_128_kib_of_kv_a_token_and_its_bytes_floor_bounds_the_decode_gain():
    """The figures the suite's speed part sits beside: 128 KiB of KV per token (4 GiB at 32k); a plan streaming half
    the KV groups can gain at most ~1.12x decode at batch 1 and ~1.5x at batch 8 (1.53) from the bytes it stops
    reading."""
    from transformers import AutoModelForCausalLM, LlamaConfig

    config = LlamaConfig(**gpu_suite.LLAMA_8B_SHAPE)
    per_token = gpu_suite.kv_bytes_per_token(config, 2)
    assert per_token == 128 * 2**10 and 32768 * per_token == 4 * GIB
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config, dtype=torch.bfloat16)
    weights = gpu_suite.weight_bytes_read(model)  # 8.03 B parameters less the untied input embedding, in bf16
    assert 14.9e9 < weights < 15.1e9
    bandwidth = gpu_suite.bandwidth_of("NVIDIA H200").bytes_per_s
    for batch, bound in ((1, 1.12), (8, 1.53)):
        kv = batch * 32768 * per_token
        kv_streamed = (
            kv // 2 + batch * 32 * 4 * (4 + 256) * 2 * 128 * 2
        )  # half the groups whole; the other half's s + w

        ratio = gpu_suite.bytes_floor(weights, kv, bandwidth) / gpu_suite.bytes_floor(weights, kv_streamed, bandwidth)
        assert ratio == pytest.approx(bound, abs=0.01)
    assert gpu_suite.bytes_floor(weights, 32768 * per_token, bandwidth) == pytest.approx((weights + 4 * GIB) / 4.8e12)


@pytest.mark.parametrize(
    ("name", "label", "value"),
    [
        ("NVIDIA H200", "H200 (HBM3e)", 4.8e12),
        ("NVIDIA H100 80GB HBM3", "H100 SXM", 3.35e12),
        ("NVIDIA H100 PCIe", "H100 PCIe", 2.0e12),
        ("NVIDIA A100-SXM4-80GB", "A100 SXM 80GB", 2.039e12),
    ],
)
def test_the_bandwidth_is_the_tables_by_device_name(name, label, value):
    found = gpu_suite.bandwidth_of(name)
    assert (found.name, found.bytes_per_s) == (label, value)
    assert gpu_suite.bandwidth_of(name, given=1e12).bytes_per_s == 1e12


def test_an_unknown_device_needs_its_bandwidth_given():
    with pytest.raises(SinkEvalError, match="--bandwidth"):
        gpu_suite.bandwidth_of("Some Future GPU")


def test_the_eval_part_stops_at_its_budget_and_resumes_to_the_whole_run(tmp_path, monkeypatch, capsys):
    """A budget that ends before the first shard leaves the lm-eval job partial, its work kept; --resume finishes it
    and keeps the parts it does not rerun."""
    monkeypatch.chdir(tmp_path)
    assert cli.main(["gpu-suite", "--dry-run", "--parts", "eval", "--budget-s", "20.5", "--out", "suite"]) == 0
    (part,) = GpuSuiteResult.read(tmp_path / "suite").evals
    assert part.status == "partial" and part.shards_done < part.shards_total == 2
    assert work_dir(tmp_path / "suite", "gpu-suite").is_dir()
    assert cli.main(["gpu-suite", "--dry-run", "--parts", "eval", "--out", "suite"]) == 2  # not without --resume
    assert cli.main(["gpu-suite", "--dry-run", "--parts", "eval", "--resume", "--out", "suite"]) == 0
    res = GpuSuiteResult.read(tmp_path / "suite")
    (part,) = res.evals
    assert (part.status, part.shards_done) == ("complete", 2) and (tmp_path / "suite" / part.results_file).is_file()
    assert not work_dir(tmp_path / "suite", "gpu-suite").exists()
    assert res.correctness == [] and res.speed == []
