"""The probe on the real models: equal to eager attention's matrices, invisible in the logits, O(N) in memory."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
import torch

from conftest import REAL_MODELS
from sink_eval.probe import probe
from sink_eval.prompts import default_prompts

pytestmark = pytest.mark.analysis


@pytest.mark.parametrize("name", REAL_MODELS)
def test_probe_equals_eager_attention_on_real_prompts(bundled_model, name):
    loaded = bundled_model(name)
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


# Peak RSS from /proc/self/status VmHWM: getrusage's ru_maxrss survives fork+exec on Linux and would report the
# pytest parent's peak instead of this process's.
PEAK_RSS = """
import json, re, torch
from sink_eval.models import load_model
from sink_eval.probe import probe
from sink_eval.prompts import default_prompts
loaded = load_model("smollm2-135m")
text = "\\n\\n".join(p.text for p in default_prompts() if p.domain in ("prose", "code"))
ids = loaded.tokenizer(text)["input_ids"]
assert len(ids) >= 4096, len(ids)
stats = probe(loaded.model, torch.tensor([ids[:4096]])).stats[0]
peak_kb = int(re.search(r"VmHWM:\\s+(\\d+) kB", open("/proc/self/status").read()).group(1))
finite = bool(torch.isfinite(stats.sink).all())
print(json.dumps({"n_tokens": stats.n_tokens, "peak_rss_gb": peak_kb / 2**20, "finite": finite}))
"""


def test_a_4096_token_prompt_is_probed_in_under_3_gb_peak_rss(bundled_model):
    bundled_model("smollm2-135m")  # converted and cached before the subprocess loads it
    proc = subprocess.run([sys.executable, "-c", PEAK_RSS], capture_output=True, text=True, check=True)
    measured = json.loads(proc.stdout.strip().splitlines()[-1])
    print(measured)
    assert measured["n_tokens"] == 4096 and measured["finite"]
    assert measured["peak_rss_gb"] < 3.0, measured
