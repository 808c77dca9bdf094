"""Builders shared by the unit tests (random-initialised models: never for sink or accuracy figures)."""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path

import pytest
import torch
from hypothesis import strategies as st
from transformers import AutoModelForCausalLM, Gemma3TextConfig, LlamaConfig, Qwen2Config

from sink_eval import baselines

SHAPES = st.tuples(
    st.sampled_from(["llama", "qwen2", "gemma3"]),
    st.integers(1, 3),  # KV heads
    st.integers(1, 3),  # query heads per KV head
    st.sampled_from([4, 8]),  # head dim
    st.integers(2, 12),  # sliding window (gemma3's first layer)
)
"""Attention shapes for `random_model`: (arch, KV heads, query heads per KV head, head dim, sliding window)."""


def padded_batch(
    rows: int, length: int, pads: list[int], seed: int, vocab: int = 64
) -> tuple[torch.Tensor, torch.Tensor]:
    """Random ids (rows, length) below `vocab` and a left-padded mask (rows, length): row i has
    min(pads[i], length - 1) padding positions."""
    gen = torch.Generator().manual_seed(seed)
    ids = torch.randint(1, vocab, (rows, length), generator=gen)
    mask = torch.ones_like(ids)
    for row, pad in enumerate(pads):
        mask[row, : min(pad, length - 1)] = 0
    return ids, mask


def random_model(arch: str, kv_heads: int, groups: int, head_dim: int, window: int):
    """A seeded random Llama, Qwen2 (attention biases) or Gemma 3 (sliding window, then global layer) of the given
    attention shape."""
    common = dict(
        vocab_size=64,
        hidden_size=kv_heads * groups * head_dim,
        intermediate_size=64,
        num_hidden_layers=2,
        head_dim=head_dim,
        num_attention_heads=kv_heads * groups,
        num_key_value_heads=kv_heads,
        max_position_embeddings=512,
        pad_token_id=0,
    )
    if arch == "llama":
        config = LlamaConfig(**common)
    elif arch == "qwen2":
        config = Qwen2Config(**common)
    else:
        config = Gemma3TextConfig(
            **common,
            sliding_window=window,
            layer_types=["sliding_attention", "full_attention"],
            query_pre_attn_scalar=head_dim,
        )
    torch.manual_seed(0)
    return AutoModelForCausalLM.from_config(config, dtype=torch.float32).eval()


def read_committed_baseline(path: Path, kind: baselines.Kind) -> baselines.Baseline:
    """A committed baseline file, read and checked; skipped while it is of an older schema of its kind than this
    sink_eval reads (it is regenerated from the real models, which the unit tests never load)."""
    found = json.loads(path.read_text()).get("schema")
    family, version = kind.cls.SCHEMA.rsplit("/", 1)
    older = str(found).removeprefix(f"{family}/")
    if str(found).startswith(f"{family}/") and older.isdigit() and int(older) < int(version):
        pytest.skip(f"{path.name} has the older schema {found!r}, not {kind.cls.SCHEMA!r}: {kind.fix}")
    return baselines.read_baseline(path, kind)


def counted(real: Callable, kill_after: int | None = None) -> tuple[Callable, list[int]]:
    """`real`, wrapped to count its calls in the returned list; with `kill_after`, the call after that many raises
    KeyboardInterrupt instead (a run killed part-way, for the resume tests)."""
    calls: list[int] = []

    def wrapped(*args, **kwargs):
        if kill_after is not None and len(calls) == kill_after:
            raise KeyboardInterrupt
        calls.append(1)
        return real(*args, **kwargs)

    return wrapped, calls
