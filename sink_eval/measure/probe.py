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
- streaming score (s, w) = mean over queries i >= s + w of the mass on the keys [0, s) ∪ (i - w, i] (the first s
  tokens plus a window of the last w keys, the query's own included). Earlier queries are left out: their window
  covers their whole context. A prompt with no query i >= s + w has no score for that (s, w) (NaN), never 1;
- offset score k (k >= 1) = mean over queries i >= k + 1 of A[i, i - k]: the mass k keys back, key 0 excluded
  (attention to it is the sink's). On a random sequence of period T repeated, offset T - 1 is the induction
  pattern (the token after the previous occurrence) and offset T the echo (the previous occurrence itself);
with positions counted from the first non-padding token and N the number of non-padding tokens. A prompt of one
token has no query to average: its scores are NaN ("trivial"), never 1.
"""

from __future__ import annotations

import contextvars
import sys
from collections.abc import Sequence
from dataclasses import dataclass, field

import torch
from tqdm import tqdm

from sink_eval.core import attention
from sink_eval.core.errors import SinkEvalError
from sink_eval.core.window import Window, check_windows
from sink_eval.models.load import LoadedModel
from sink_eval.prompts.prompt_set import TokenizedPrompt

PROBE_ATTENTION = "sink_probe"
# Attention rows held at once per layer. Smaller chunks skip more of the causal mask's upper triangle (the keys after a
# chunk are not scored): on smollm2-135m at 2 048 tokens (2 CPU threads) a probed forward cost 1.82x a plain SDPA
# forward with 64 MiB chunks (3 chunks), 1.24x with 8 MiB (19 chunks), 1.25x with 16 MiB, 1.33x with 2 MiB (one
# sweep, medians of 3 paired rounds; the bench gate's own run at 8 MiB: 1.20x).
DEFAULT_CHUNK_BYTES = 8 * 2**20


@dataclass
class PromptStats:
    """Attention statistics of one prompt: arrays of shape (layers, heads)."""

    n_tokens: int
    sink: torch.Tensor
    self_: torch.Tensor
    prev: torch.Tensor
    streaming: dict[Window, torch.Tensor] = field(default_factory=dict)  # (s, w) -> streaming score
    offset: dict[int, torch.Tensor] = field(default_factory=dict)  # k -> offset score


@dataclass
class ProbeResult:
    stats: list[PromptStats]  # one per batch row, in order
    logits: torch.Tensor | None  # None when the forward pass stopped early (`layers`)


@dataclass
class _LayerRecord:
    """Per-query values of one layer, (B, H, T) each; NaN where a query does not count."""

    sink: torch.Tensor
    self_: torch.Tensor
    prev: torch.Tensor
    streaming: dict[Window, torch.Tensor]
    offset: dict[int, torch.Tensor]


class _Recorder:
    def __init__(
        self,
        first: torch.Tensor,
        chunk_bytes: int,
        last_layer: int | None,
        windows: Sequence[Window],
        offsets: Sequence[int],
    ):
        self.first = first  # (B,) first non-padding position per row
        self.chunk_bytes = chunk_bytes
        self.last_layer = last_layer  # stop the forward pass once this layer's attention is recorded
        self.windows = tuple(windows)
        self.offsets = tuple(offsets)
        self.layers: dict[int, _LayerRecord] = {}


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
        raise RuntimeError("sink_probe attention ran outside sink_eval.measure.probe.probe(); use probe() to run it")
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

    def per_query() -> torch.Tensor:
        return torch.full((batch, heads, t_len), float("nan"))

    record = _LayerRecord(
        per_query(),
        per_query(),
        per_query(),
        {window: per_query() for window in recorder.windows},
        {k: per_query() for k in recorder.offsets},
    )
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
        record.sink[:, :, i0:i1] = keep(probs.gather(-1, first.expand(batch, heads, i1 - i0, 1)).squeeze(-1))
        record.self_[:, :, i0:i1] = keep(torch.diagonal(probs, offset=i0, dim1=-2, dim2=-1))
        if i0 == 0:
            record.prev[:, :, 1:i1] = keep(torch.diagonal(probs, offset=-1, dim1=-2, dim2=-1))
        else:
            record.prev[:, :, i0:i1] = keep(torch.diagonal(probs, offset=i0 - 1, dim1=-2, dim2=-1))
        if recorder.windows or recorder.offsets:
            queries = torch.arange(i0, i1, device=probs.device).view(1, 1, -1, 1)  # absolute positions
            relative = queries - first  # (B, 1, chunk, 1), counted from the first real token
        if recorder.windows:
            cumulative = probs.float().cumsum(-1)  # (B, H, chunk, end): mass on keys 0..j
            for (s, w), values in record.streaming.items():
                values[:, :, i0:i1] = keep(_window_mass(cumulative, queries, first, relative, s, w))
        for k, values in record.offset.items():
            at = probs.float().gather(-1, (queries - k).clamp(min=0).expand(batch, heads, -1, 1))  # i - k < i
            values[:, :, i0:i1] = keep(torch.where(relative >= k + 1, at, float("nan")).squeeze(-1))
    recorder.layers[module.layer_idx] = record
    if module.layer_idx == recorder.last_layer:
        raise _Stop
    return out.transpose(1, 2).contiguous(), None


def _window_mass(
    cumulative: torch.Tensor,
    queries: torch.Tensor,
    first: torch.Tensor,
    relative: torch.Tensor,
    s: int,
    w: int,
) -> torch.Tensor:
    """Mass on the first s real tokens plus the last w keys, (B, H, chunk), from the cumulative probabilities
    `cumulative` (B, H, chunk, keys); NaN for queries i < s + w (their window covers everything)."""
    batch, heads, chunk, keys = cumulative.shape

    def mass_through(index: torch.Tensor) -> torch.Tensor:  # mass on keys 0..index; clamped where it won't count
        return cumulative.gather(-1, index.clamp(0, keys - 1).expand(batch, heads, chunk, 1))

    window = mass_through(queries) - mass_through(queries - w)
    sink = mass_through(first + s - 1) if s > 0 else torch.zeros_like(window)
    return torch.where(relative >= s + w, sink + window, float("nan")).squeeze(-1)


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
    windows: Sequence[Window] = (),
    offsets: Sequence[int] = (),
) -> ProbeResult:
    """Run `model` on a (left-padded) batch and return each row's attention statistics and the logits.

    `logits_to_keep=1` keeps only the last position's logits (a 4096-token prompt would otherwise hold N x vocab
    floats); 0 keeps all. `chunk_bytes` bounds the attention rows held at once per layer. `layers=k` measures only
    layers 0..k-1 and stops the forward pass there: the other layers' statistics are NaN and there are no logits.
    `windows` lists the (s, w) whose streaming scores to record, `offsets` the k whose offset scores to record.
    """
    check_windows(windows)
    if any(not isinstance(k, int) or isinstance(k, bool) or k < 1 for k in offsets):
        raise SinkEvalError(f"offsets are key distances of at least 1, not {list(offsets)}")
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
    recorder = _Recorder(input_ids.shape[1] - lengths, chunk_bytes, last_layer, windows, offsets)
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
    some = next(iter(recorder.layers.values()))
    nan = torch.full_like(some.sink, float("nan"))
    unmeasured = _LayerRecord(nan, nan, nan, dict.fromkeys(recorder.windows, nan), dict.fromkeys(recorder.offsets, nan))
    recorded = [recorder.layers.get(layer, unmeasured) for layer in range(n_layers)]

    def stacked(values: list[torch.Tensor]) -> torch.Tensor:  # (B, layers, H, T)
        return torch.stack(values, dim=1)

    sink_q, self_q, prev_q = (stacked([getattr(r, name) for r in recorded]) for name in ("sink", "self_", "prev"))
    streaming_q = {window: stacked([r.streaming[window] for r in recorded]) for window in recorder.windows}
    offset_q = {k: stacked([r.offset[k] for r in recorded]) for k in recorder.offsets}
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
                # NaN marks the queries that do not count; no query that counts gives NaN, "trivial".
                streaming={window: values[b, :, :, queries].nanmean(-1) for window, values in streaming_q.items()},
                offset={k: values[b, :, :, queries].nanmean(-1) for k, values in offset_q.items()},
            )
        )
    return stats


@dataclass
class ProbedPrompt:
    prompt: TokenizedPrompt
    stats: PromptStats


def probe_prompts(
    loaded: LoadedModel,
    prompts: list[TokenizedPrompt],
    progress: bool = True,
    windows: Sequence[Window] = (),
    desc: str | None = None,
) -> list[ProbedPrompt]:
    """Probe each prompt on its own (no padding), recording the streaming scores at `windows`, with a progress bar on
    stderr."""
    device = next(loaded.model.parameters()).device
    bar = tqdm(
        prompts, desc=desc or f"probing {loaded.spec.name}", unit="prompt", disable=not progress, file=sys.stderr
    )
    return [
        ProbedPrompt(tp, probe(loaded.model, torch.tensor([tp.input_ids], device=device), windows=windows).stats[0])
        for tp in bar
    ]
