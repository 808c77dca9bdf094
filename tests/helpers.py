"""Builders shared by the unit tests (random-initialised models: never for sink or accuracy figures)."""

from __future__ import annotations

import torch
from transformers import AutoModelForCausalLM, Gemma3TextConfig, LlamaConfig


def random_model(arch: str, kv_heads: int, groups: int, head_dim: int, window: int):
    """A seeded random Llama or Gemma 3 (sliding window, then global layer) of the given attention shape."""
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
    else:
        config = Gemma3TextConfig(
            **common,
            sliding_window=window,
            layer_types=["sliding_attention", "full_attention"],
            query_pre_attn_scalar=head_dim,
        )
    torch.manual_seed(0)
    return AutoModelForCausalLM.from_config(config, dtype=torch.float32).eval()
