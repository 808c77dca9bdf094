"""Per-head attention statistics, gathered during an ordinary forward pass without any N x N tensor per layer.

`probe(model, input_ids, attention_mask)` runs the model with a registered attention implementation
("sink_probe", transformers' `AttentionInterface`) that computes eager attention over chunks of queries. From each
chunk's attention rows it keeps, per query i and head, A[i, first] (first = the first non-padding position),
A[i, i] and A[i, i-1]; the attention output is the same product P @ V that eager attention computes, so the model's
outputs are unchanged. The mask is transformers' own eager mask (causal, padding, sliding window), registered
beside the function with `AttentionMaskInterface`: without it the function would receive no mask at all.

Definitions (query 0 is excluded: it can attend only to itself, so it is a sink by construction):
- sink score of head (l, h) = mean over queries i = 1..N-1 of A[i, 0];
- self score = mean of A[i, i]; previous-token score = mean of A[i, i-1];
with positions counted from the first non-padding token and N the number of non-padding tokens. A prompt of one
token has no query to average: its scores are NaN ("trivial"), never 1.
"""

from __future__ import annotations

import contextvars
from dataclasses import dataclass

import torch

from sink_eval import attention
from sink_eval.errors import SinkEvalError

PROBE_ATTENTION = "sink_probe"
DEFAULT_CHUNK_BYTES = 64 * 2**20


@dataclass
class PromptStats:
    """Attention statistics of one prompt: arrays of shape (layers, heads)."""

    n_tokens: int
    sink: torch.Tensor
    self_: torch.Tensor
    prev: torch.Tensor


@dataclass
class ProbeResult:
    stats: list[PromptStats]  # one per batch row, in order
    logits: torch.Tensor | None  # None when the forward pass stopped early (`layers`)


class _Recorder:
    def __init__(self, first: torch.Tensor, chunk_bytes: int, last_layer: int | None):
        self.first = first  # (B,) first non-padding position per row
        self.chunk_bytes = chunk_bytes
        self.last_layer = last_layer  # stop the forward pass once this layer's attention is recorded
        self.layers: dict[int, tuple[torch.Tensor, torch.Tensor, torch.Tensor]] = {}


class _Stop(Exception):
    """Raised once the last layer asked for is recorded: the rest of the forward pass is not needed."""


_ACTIVE: contextvars.ContextVar[_Recorder | None] = contextvars.ContextVar("sink_eval_probe", default=None)


def _repeat_kv(x: torch.Tensor, groups: int) -> torch.Tensor:
    return x if groups == 1 else x.repeat_interleave(groups, dim=1)


def probe_attention(
    module: torch.nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: torch.Tensor | None,
    scaling: float | None = None,
    softcap: float | None = None,
    **kwargs,
) -> tuple[torch.Tensor, None]:
    """Eager attention over query chunks that also records first-token, self and previous-token mass.

    query (B, H, T, D), key/value (B, H_kv, S, D) -> output (B, T, H, D), as transformers expects.
    """
    recorder = _ACTIVE.get()
    if recorder is None:
        raise RuntimeError("sink_probe attention ran outside sink_eval.probe.probe(); use probe() to run it")
    if module.training:
        raise SinkEvalError("the probe measures inference: call model.eval() first")
    batch, heads, t_len, _ = query.shape
    s_len = key.shape[2]
    if t_len != s_len:
        raise SinkEvalError("the probe measures a full forward pass: run it without a KV cache (use_cache=False)")
    groups = heads // key.shape[1]
    key, value = _repeat_kv(key, groups), _repeat_kv(value, groups)
    scaling = query.shape[-1] ** -0.5 if scaling is None else scaling

    out = torch.empty_like(query)
    sink_q, self_q, prev_q = (torch.full((batch, heads, t_len), float("nan")) for _ in range(3))
    first = recorder.first.to(query.device).view(batch, 1, 1, 1)

    def keep(values: torch.Tensor) -> torch.Tensor:
        return values.float().cpu()

    last_first = int(recorder.first.max())  # with left padding, the first real token of the last-padded row
    chunk = max(1, recorder.chunk_bytes // (4 * batch * heads * s_len))
    for i0 in range(0, t_len, chunk):
        i1 = min(t_len, i0 + chunk)
        mask = None if attention_mask is None else attention_mask[:, :, i0:i1, :s_len]
        # Keys the mask blocks for every query of the chunk get probability exactly 0 (exp underflows): under a
        # causal mask that is every key after the chunk, so those columns need not be computed at all.
        end = max(i1, last_first + 1) if mask is not None and _blocked(mask[..., i1:]) else s_len
        scores = torch.matmul(query[:, :, i0:i1], key[:, :, :end].transpose(2, 3)) * scaling
        if softcap is not None:
            scores = torch.tanh(scores / softcap) * softcap
        if mask is not None:
            scores = scores + mask[..., :end]
        probs = torch.softmax(scores, dim=-1, dtype=torch.float32).to(query.dtype)
        out[:, :, i0:i1] = torch.matmul(probs, value[:, :, :end])
        sink_q[:, :, i0:i1] = keep(probs.gather(-1, first.expand(batch, heads, i1 - i0, 1)).squeeze(-1))
        self_q[:, :, i0:i1] = keep(torch.diagonal(probs, offset=i0, dim1=-2, dim2=-1))
        if i0 == 0:
            prev_q[:, :, 1:i1] = keep(torch.diagonal(probs, offset=-1, dim1=-2, dim2=-1))
        else:
            prev_q[:, :, i0:i1] = keep(torch.diagonal(probs, offset=i0 - 1, dim1=-2, dim2=-1))
    recorder.layers[module.layer_idx] = (sink_q, self_q, prev_q)
    if module.layer_idx == recorder.last_layer:
        raise _Stop
    return out.transpose(1, 2).contiguous(), None


def _blocked(mask: torch.Tensor) -> bool:
    """Whether an additive eager mask blocks every entry (its minimum value, or -inf) of this slice."""
    return mask.numel() == 0 or bool((mask <= torch.finfo(mask.dtype).min).all())


@torch.no_grad()
def probe(
    model: torch.nn.Module,
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor | None = None,
    logits_to_keep: int = 1,
    chunk_bytes: int = DEFAULT_CHUNK_BYTES,
    layers: int | None = None,
) -> ProbeResult:
    """Run `model` on a (left-padded) batch and return each row's attention statistics and the logits.

    `logits_to_keep=1` keeps only the last position's logits (a 4096-token prompt would otherwise hold N x vocab
    floats); 0 keeps all. `chunk_bytes` bounds the attention rows held at once per layer. `layers=k` measures only
    layers 0..k-1 and stops the forward pass there: the other layers' statistics are NaN and there are no logits.
    """
    if input_ids.ndim != 2 or input_ids.shape[1] == 0:
        raise SinkEvalError("probe() needs a non-empty batch of token ids of shape (batch, tokens)")
    if attention_mask is None:
        attention_mask = torch.ones_like(input_ids)
    lengths = attention_mask.sum(dim=1)
    if bool((lengths == 0).any()):
        raise SinkEvalError("a prompt in the batch has no tokens; empty prompts cannot be probed")
    if bool((attention_mask[:, -1] == 0).any()):
        raise SinkEvalError("probe() needs left padding: set tokenizer.padding_side = 'left'")
    from transformers.masking_utils import eager_mask

    n_layers = model.config.get_text_config(decoder=True).num_hidden_layers
    if layers is not None and not 1 <= layers <= n_layers:
        raise SinkEvalError(f"probe(layers=...) takes 1..{n_layers} for this model, not {layers}")
    last_layer = None if layers is None else layers - 1
    recorder = _Recorder(first=input_ids.shape[1] - lengths, chunk_bytes=chunk_bytes, last_layer=last_layer)
    token = _ACTIVE.set(recorder)
    logits = None
    try:
        with attention.use(model, PROBE_ATTENTION, probe_attention, eager_mask):
            logits = model(
                input_ids=input_ids, attention_mask=attention_mask, use_cache=False, logits_to_keep=logits_to_keep
            ).logits
    except _Stop:
        pass
    finally:
        _ACTIVE.reset(token)
    return ProbeResult(stats=_per_prompt(recorder, lengths, n_layers), logits=logits)


def _per_prompt(recorder: _Recorder, lengths: torch.Tensor, n_layers: int) -> list[PromptStats]:
    unmeasured = torch.full_like(next(iter(recorder.layers.values()))[0], float("nan"))
    recorded = [recorder.layers.get(layer, (unmeasured,) * 3) for layer in range(n_layers)]
    sink_q, self_q, prev_q = (torch.stack([values[k] for values in recorded], dim=1) for k in range(3))
    stats = []
    for b, n in enumerate(lengths.tolist()):
        start = int(recorder.first[b])
        queries = slice(start + 1, None)  # query 0 (the first real token) is a sink by construction
        stats.append(
            PromptStats(
                n_tokens=n,
                sink=sink_q[b, :, :, queries].mean(-1),
                self_=self_q[b, :, :, queries].mean(-1),
                prev=prev_q[b, :, :, queries].mean(-1),
            )
        )
    return stats
