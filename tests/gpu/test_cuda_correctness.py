"""The probe and the copy patch on CUDA (fp32 and bf16): the same results as on the CPU, within dtype tolerances.

Skipped, with the reason, where CUDA is absent (CI has none). Speed and memory on CUDA: `sink-eval gpu-suite`
(its parts at small sizes: test_gpu_suite_cuda.py).
"""

from __future__ import annotations

import pytest
import torch
from helpers import random_model

from sink_eval.measure.probe import probe
from sink_eval.patches.copy import CopyPlan

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device: the gpu tests run on a GPU machine"),
]

TOLERANCE = {torch.float32: 1e-4, torch.bfloat16: 3e-2}


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("arch", ["llama", "qwen2", "gemma3"])
def test_probe_and_empty_plan_match_the_cpu_on_cuda(arch, dtype):
    cpu = random_model(arch, kv_heads=2, groups=2, head_dim=16, window=8)
    gpu = random_model(arch, kv_heads=2, groups=2, head_dim=16, window=8).to("cuda", dtype)
    ids = torch.randint(1, 64, (2, 24), generator=torch.Generator().manual_seed(0))
    mask = torch.ones_like(ids)
    mask[0, :5] = 0
    reference = probe(cpu, ids, mask)
    measured = probe(gpu, ids.cuda(), mask.cuda())
    for ref, got in zip(reference.stats, measured.stats, strict=True):
        assert torch.allclose(got.sink, ref.sink, atol=TOLERANCE[dtype])
    with torch.no_grad():
        exact = gpu(input_ids=ids.cuda(), attention_mask=mask.cuda()).logits
        with CopyPlan().patched(gpu):
            same = gpu(input_ids=ids.cuda(), attention_mask=mask.cuda()).logits
    assert torch.equal(same, exact)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_generation_under_a_plan_is_the_same_on_cuda_as_on_the_cpu(dtype):
    plan = CopyPlan.of({0: [0, 1], 1: [3]})
    cpu = random_model("llama", kv_heads=2, groups=2, head_dim=16, window=8).to(dtype)
    gpu = random_model("llama", kv_heads=2, groups=2, head_dim=16, window=8).to("cuda", dtype)
    ids = torch.randint(1, 64, (1, 16), generator=torch.Generator().manual_seed(1))
    on_cpu, _ = plan.generate(cpu, ids, max_new_tokens=4)
    on_gpu, _ = plan.generate(gpu, ids.cuda(), max_new_tokens=4)
    assert torch.equal(on_gpu.cpu()[:, :17], on_cpu[:, :17])  # the first new token; later ones may differ by rounding
