"""The streaming patch on the real models: the unpatched model where the window covers the prompt, and the same
tokens from the constant-size cache as from a full banded forward over a long real prompt."""

from __future__ import annotations

import pytest
import torch

from sink_eval.patches.streaming.plan import StreamingPlan
from sink_eval.prompts.prompt_set import long_passages

pytestmark = pytest.mark.analysis

PROMPTS = ["The capital of France is", "def add(a, b):\n    return", "Once upon a time, in a small village by the sea,"]
TOKENS = 300  # of a long evaluation passage: several blocks of the banded kernel, a window that wraps
SINK, WINDOW = 4, 64
NEW_TOKENS = 8


def every_head(model, window: int) -> StreamingPlan:
    """StreamingLLM's plan: every head of every full-attention layer."""
    heads = range(model.config.get_text_config(decoder=True).num_attention_heads)
    return StreamingPlan.of({layer: heads for layer in StreamingPlan.candidate_layers(model)}, SINK, window)


def test_a_window_covering_the_prompt_leaves_a_real_model_unchanged(sink_model, sink_model_name):
    loaded = sink_model(sink_model_name)
    tokenizer = loaded.tokenizer
    tokenizer.padding_side = "left"
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    batch = tokenizer(PROMPTS, return_tensors="pt", padding=True)
    real = batch["attention_mask"].bool()
    with torch.no_grad():
        reference = loaded.model(**batch).logits
        with (every_head(loaded.model, batch["input_ids"].shape[1])).patched(loaded.model):
            out = loaded.model(**batch).logits
    assert (out - reference)[real].abs().max() <= 1e-3


def test_the_constant_cache_decodes_what_a_full_streamed_forward_predicts(sink_model, sink_model_name):
    """Greedy tokens from the StreamingCache (every streamed group at s + w entries) are the argmax of one full
    forward under the same plan (the banded kernel) over the prompt and those tokens."""
    loaded = sink_model(sink_model_name)
    text = long_passages("evaluation")[0].text
    ids = torch.tensor([loaded.tokenizer(text)["input_ids"][:TOKENS]])
    plan = every_head(loaded.model, WINDOW)
    generated, cache = plan.generate(loaded.model, ids, max_new_tokens=NEW_TOKENS)
    with torch.no_grad(), plan.patched(loaded.model):
        full = loaded.model(input_ids=generated[:, :-1]).logits
    assert torch.equal(full[:, TOKENS - 1 :].argmax(-1), generated[:, TOKENS:])
    assert cache.get_seq_length() == TOKENS + NEW_TOKENS - 1
