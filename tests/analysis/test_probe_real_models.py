"""The probe on the real models: equal to eager attention's matrices, invisible in the logits, O(N) in memory."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten

from sink_eval.measure.probe import DEFAULT_CHUNK_BYTES, probe
from sink_eval.prompts.prompt_set import default_prompts, long_passages

pytestmark = pytest.mark.analysis


def test_probe_equals_eager_attention_on_real_prompts(sink_model, sink_model_name):
    loaded = sink_model(sink_model_name)
    model, tok = loaded.model, loaded.tokenizer
    texts = [p.text for p in default_prompts() if p.id in ("prose-50-199-0", "code-20-49-1", "qa-10-19-2")]
    tok.padding_side = "left"
    batch = tok(texts, return_tensors="pt", padding=True)
    result = probe(model, batch["input_ids"], batch["attention_mask"], logits_to_keep=0)
    with torch.no_grad():
        plain = model(**batch, use_cache=False).logits
    model.set_attn_implementation("eager")
    try:
        with torch.no_grad():
            eager = model(**batch, use_cache=False, output_attentions=True)
    finally:
        model.set_attn_implementation("sdpa")
    attn = torch.stack(eager.attentions, dim=1)
    for b, stats in enumerate(result.stats):
        first = int((batch["attention_mask"][b] == 0).sum())
        q = torch.arange(first + 1, batch["input_ids"].shape[1])
        torch.testing.assert_close(stats.sink, attn[b][:, :, q, first].mean(-1), atol=1e-5, rtol=0)
        torch.testing.assert_close(stats.self_, attn[b][:, :, q, q].mean(-1), atol=1e-5, rtol=0)
        torch.testing.assert_close(stats.prev, attn[b][:, :, q, q - 1].mean(-1), atol=1e-5, rtol=0)
        torch.testing.assert_close(result.logits[b, first:], plain[b, first:], atol=1e-4, rtol=0)


class _LargestAllocation(TorchDispatchMode):
    """Records the largest new storage (bytes) an operation returns while active; views of an input (a weight's
    transpose, a slice) allocate nothing and are not counted."""

    def __init__(self) -> None:
        super().__init__()
        self.bytes = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        inputs = {
            t.untyped_storage().data_ptr() for t in tree_flatten((args, kwargs))[0] if isinstance(t, torch.Tensor)
        }
        for value in tree_flatten(out)[0]:
            if isinstance(value, torch.Tensor) and value.untyped_storage().data_ptr() not in inputs:
                self.bytes = max(self.bytes, value.untyped_storage().nbytes())
        return out


def _peak_kb() -> int:
    return int(re.search(r"VmHWM:\s+(\d+) kB", Path("/proc/self/status").read_text()).group(1))


def layers_of_every_kind(config) -> int:
    """How many first layers hold one layer of each attention kind the model has (`layer_types`: full, sliding;
    Llama has one kind). Every layer of a kind runs the same code on tensors of the same shapes."""
    kinds = getattr(config.get_text_config(decoder=True), "layer_types", None) or ["full_attention"]
    return max(kinds.index(kind) for kind in set(kinds)) + 1


def test_probing_4096_tokens_never_allocates_a_per_head_score_matrix(sink_model, sink_model_name):
    """O(N) memory per head: while 4096 tokens are probed, no single allocation is larger than the largest of the
    probe's chunk budget, transformers' own (batch, 1, N, N) eager mask and the MLP's (N, intermediate) activations;
    eager attention would allocate heads x N x N scores in every layer (4-14 times the mask, and more than each of
    the three here). The probe measures the first `layers_of_every_kind` layers and stops there (the whole depth
    would cost CI 2 minutes on the 1.5B alone); the process's peak resident memory is printed."""
    loaded = sink_model(sink_model_name)
    ids = torch.tensor([loaded.tokenizer(long_passages()[0].text)["input_ids"][:4096]])
    assert ids.shape[1] == 4096
    config = loaded.model.config
    n, heads = ids.shape[1], config.num_attention_heads
    allowed = max(DEFAULT_CHUNK_BYTES, n * n * 4, n * config.intermediate_size * 4)
    assert heads * n * n * 4 > allowed, "the bound would not tell the probe from eager attention"
    layers = layers_of_every_kind(config)
    with _LargestAllocation() as largest:
        stats = probe(loaded.model, ids, layers=layers).stats[0]
    print(
        f"{sink_model_name}, layers 0-{layers - 1}: largest allocation {largest.bytes / 2**20:.0f} MiB, allowed "
        f"{allowed / 2**20:.0f} MiB (eager: {heads * n * n * 4 / 2**20:.0f} MiB per layer); process peak RSS "
        f"{_peak_kb() / 2**20:.2f} GB"
    )
    assert bool(torch.isfinite(stats.sink[:layers]).all())
    assert largest.bytes <= allowed, f"{sink_model_name}: an allocation of {largest.bytes} bytes > {allowed}"
