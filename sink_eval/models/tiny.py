"""Seeded, random-initialised tiny models over a byte tokenizer, built from a config in code: for unit tests and
speed only, never for a sink, fidelity or accuracy figure."""

from __future__ import annotations

import hashlib
from typing import TYPE_CHECKING

import torch

if TYPE_CHECKING:
    from transformers import PretrainedConfig, PreTrainedModel, PreTrainedTokenizerBase


def _byte_tokenizer(add_bos: bool) -> PreTrainedTokenizerBase:
    """A byte-level tokenizer built in code: 256 byte tokens and <pad>, <bos>, <eos>; no download."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    specials = ["<pad>", "<bos>", "<eos>"]
    # alphabet() comes in a different order on every call: sorted, the ids are the same in every load.
    vocab = {tok: i for i, tok in enumerate(specials + sorted(pre_tokenizers.ByteLevel.alphabet()))}
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    tok.decoder = decoders.ByteLevel()
    if add_bos:
        tok.post_processor = processors.TemplateProcessing(
            single="<bos> $A", pair="<bos> $A $B", special_tokens=[("<bos>", vocab["<bos>"])]
        )
    return PreTrainedTokenizerFast(
        tokenizer_object=tok, pad_token="<pad>", bos_token="<bos>", eos_token="<eos>", padding_side="left"
    )


TINY_SEED = 0
# 4 layers x 4 heads (2 KV heads) of dimension 16 over the byte tokenizer's 3 + 256 ids, ids 0/1/2 = pad/bos/eos.
TINY_SHAPE = dict(
    vocab_size=3 + 256,
    hidden_size=64,
    intermediate_size=128,
    num_hidden_layers=4,
    num_attention_heads=4,
    num_key_value_heads=2,
    head_dim=16,
    max_position_embeddings=4096,
    pad_token_id=0,
    bos_token_id=1,
    eos_token_id=2,
)


def llama_config() -> PretrainedConfig:
    from transformers import LlamaConfig

    return LlamaConfig(**TINY_SHAPE, tie_word_embeddings=True)


def gemma3_config() -> PretrainedConfig:
    from transformers import Gemma3TextConfig

    layer_types = ["sliding_attention", "sliding_attention", "sliding_attention", "full_attention"]
    return Gemma3TextConfig(**TINY_SHAPE, sliding_window=8, layer_types=layer_types, query_pre_attn_scalar=16)


def qwen2_config() -> PretrainedConfig:
    """Qwen2's attention biases and a 7:1 GQA ratio, as in Qwen2.5-Coder-0.5B (14 query heads, 2 KV heads)."""
    from transformers import Qwen2Config

    shape = TINY_SHAPE | dict(hidden_size=112, num_attention_heads=7, num_key_value_heads=1)
    return Qwen2Config(**shape, tie_word_embeddings=True)


def build(config: PretrainedConfig, add_bos: bool) -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
    from transformers import AutoModelForCausalLM

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(TINY_SEED)
        model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    return model.eval(), _byte_tokenizer(add_bos)


def fingerprint(model: PreTrainedModel) -> str:
    """Identifies a tiny model: its config and seed."""
    return (
        "tiny-sha256:"
        + hashlib.sha256(f"{model.config.to_json_string(use_diff=False)}seed={TINY_SEED}".encode()).hexdigest()
    )
