"""The GPU suite's parts on CUDA at small sizes (the whole suite is `sink-eval gpu-suite`, minutes on one H100/H200):
its correctness checks pass on the tiny models in fp32 and bf16, and its speed part measures the dry run's shapes on
the device, with the device's peak memory. Skipped, with the reason, where CUDA is absent (CI has none)."""

from __future__ import annotations

import dataclasses
import time

import pytest
import torch

from sink_eval.evals import gpu_suite

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device: the gpu tests run on a GPU machine"),
]


def test_the_suite_correctness_checks_pass_on_cuda_for_the_tiny_models():
    cfg = dataclasses.replace(
        gpu_suite.config(dry_run=False), correctness_models=("tiny-llama", "tiny-gemma3", "tiny-qwen2")
    )
    checks, skipped = gpu_suite.correctness(cfg, progress=lambda message: None)
    assert not skipped and len(checks) == 3 * 2 * 6
    assert [c for c in checks if not c.passed] == []


def test_the_suite_speed_part_measures_small_shapes_on_cuda():
    dry = gpu_suite.config(dry_run=True)
    cfg = dataclasses.replace(dry, device="cuda", speed_dtype="bfloat16", lengths=(512,), batches=(1, 2), window=64)
    cases = gpu_suite.speed_part(cfg, 3.35e12, time.monotonic() + 300, progress=lambda message: None)
    assert len(cases) == 2 * 2
    for case in cases:
        assert case.skipped is None
        assert case.peak_patched_bytes is not None and case.peak_unpatched_bytes is not None
        assert case.kv_patched_bytes < case.kv_unpatched_bytes
