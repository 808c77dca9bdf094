"""Speed gate of the probe: a probed forward at 2048 tokens costs at most 1.3x a plain SDPA forward.

The gate is a ratio of medians measured in one run, the two forwards interleaved round by round (machines are shared
and noisy); the absolute medians are recorded in the benchmark's extra_info for reference only.
"""

from __future__ import annotations

import statistics

import pytest
import torch

from sink_eval.evals.speed import clock
from sink_eval.measure.probe import probe
from sink_eval.prompts.prompt_set import default_prompts

pytestmark = pytest.mark.bench

TOKENS = 2048
ROUNDS = 5
GATE = 1.3  # the probe's chunked eager attention against SDPA's (`sink_eval.measure.probe.DEFAULT_CHUNK_BYTES`)


def test_probe_forward_at_2048_tokens_costs_at_most_1_3_times_a_plain_sdpa_forward(benchmark, sink_model):
    loaded = sink_model("smollm2-135m")
    text = "\n\n".join(p.text for p in default_prompts() if p.domain in ("prose", "code"))
    ids = torch.tensor([loaded.tokenizer(text)["input_ids"][:TOKENS]])
    assert ids.shape[1] == TOKENS

    def plain() -> None:
        with torch.no_grad():
            loaded.model(input_ids=ids, use_cache=False, logits_to_keep=1)

    times: dict[str, list[float]] = {"sdpa": [], "probe": []}

    def one_round() -> None:
        for name, forward in (("sdpa", plain), ("probe", lambda: probe(loaded.model, ids))):
            start = clock(ids.device)
            forward()
            times[name].append(clock(ids.device) - start)

    one_round()  # warm-up, not counted
    for values in times.values():
        values.clear()
    benchmark.pedantic(one_round, rounds=ROUNDS, iterations=1)
    medians = {name: statistics.median(values) for name, values in times.items()}
    ratio = medians["probe"] / medians["sdpa"]
    benchmark.extra_info.update({"tokens": TOKENS, "median_s": medians, "probe_over_sdpa": ratio})
    print(f"\n{TOKENS} tokens: sdpa {medians['sdpa']:.2f} s, probe {medians['probe']:.2f} s, ratio {ratio:.2f}")
    assert ratio <= GATE
