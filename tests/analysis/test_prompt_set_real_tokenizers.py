"""The committed prompt set's long split is long enough for every real model's tokenizer."""

from __future__ import annotations

import pytest

from sink_eval.prompts.prompt_set import long_passages

pytestmark = pytest.mark.analysis

LONG_TOKENS = 4096


def test_every_long_passage_has_at_least_4096_tokens(sink_model, sink_model_name):
    tokenizer = sink_model(sink_model_name).tokenizer
    lengths = {p.id: len(tokenizer(p.text)["input_ids"]) for p in long_passages()}
    assert min(lengths.values()) >= LONG_TOKENS, lengths
