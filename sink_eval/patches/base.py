"""What the two patches (`sink_eval.patches.copy`, `sink_eval.patches.streaming.patch`) share: the running patch's state in a context
variable read by its registered attention function, the checks on every patched call, `layer_errors` (the exact
attention, recording each layer's patched error), and greedy generation into a plan's cache.

A patch hands in its own parts: `planned(state, module, query, key, value, mask, scaling)`, the patched output
(B, T, H, D) of one layer or None where its plan changes nothing there, and `first(state, mask, query)`, the first
non-padding position (B,) of each row.
"""

from __future__ import annotations

import contextvars
from collections.abc import Callable, Iterator
from contextlib import AbstractContextManager, contextmanager
from typing import Any, Protocol, TypeVar

import torch
from transformers import LogitsProcessorList
from transformers.cache_utils import Cache
from transformers.integrations.sdpa_attention import sdpa_attention_forward
from transformers.masking_utils import sdpa_mask

from sink_eval.core import attention
from sink_eval.core.errors import SinkEvalError


class PatchState(Protocol):
    errors: dict[int, float]  # per layer, filled by the error attention (layer_errors)


S = TypeVar("S", bound=PatchState)
C = TypeVar("C", bound=Cache)
P = TypeVar("P")  # a patch's plan
Planned = Callable[..., torch.Tensor | None]
First = Callable[[Any, torch.Tensor | None, torch.Tensor], torch.Tensor]


def active_state(var: contextvars.ContextVar[S | None], module: torch.nn.Module, kwargs: dict, patch: str) -> S:
    """The running `patch`'s state, after checking that the attention call is one the patch supports."""
    state = var.get()
    if state is None:
        raise RuntimeError(f"the {patch} patch's attention ran outside its module's patched() or layer_errors()")
    if kwargs.get("softcap") is not None:
        raise SinkEvalError(f"the {patch} patch does not support attention logit soft-capping")
    if module.training:
        raise SinkEvalError(f"the {patch} patch is for inference: call model.eval() first")
    return state


@contextmanager
def running(
    model: torch.nn.Module,
    var: contextvars.ContextVar[S | None],
    state: S,
    name: str,
    function: Callable,
    patch: bool,
) -> Iterator[None]:
    """Run `model` with attention `function` (registered as `name`, with SDPA's masks) reading `state` from `var`;
    `patch`: a patch, which another patch may not nest in (`attention.use`)."""
    token = var.set(state)
    try:
        with attention.use(model, name, function, sdpa_mask, patch=patch):
            yield
    finally:
        var.reset(token)


def error_attention(var: contextvars.ContextVar[Any], patch: str, planned: Planned, first: First) -> Callable:
    """`layer_errors`' attention for a patch: records the relative error of the patched output (B, T, H, D) against
    the exact one, and returns the exact one, so that every layer sees the exact model's hidden states."""

    def attend(
        module: torch.nn.Module,
        query: torch.Tensor,
        key: torch.Tensor,
        value: torch.Tensor,
        attention_mask: torch.Tensor | None,
        dropout: float = 0.0,
        scaling: float | None = None,
        **kwargs,
    ) -> tuple[torch.Tensor, None]:
        state = active_state(var, module, kwargs, patch)
        out = planned(state, module, query, key, value, attention_mask, scaling)
        exact, _ = sdpa_attention_forward(module, query, key, value, attention_mask, dropout, scaling, **kwargs)
        if out is not None:
            state.errors[module.layer_idx] = relative_error(out, exact, first(state, attention_mask, query))
        return exact, None

    return attend


def relative_error(out: torch.Tensor, exact: torch.Tensor, first: torch.Tensor) -> float:
    """||out - exact|| / ||exact|| over the non-padding queries: outputs (B, T, H, D), `first` (B,) the first real
    position of each row (the per-layer error of `layer_errors`, for either patch)."""
    t_len = exact.shape[1]
    real = torch.arange(t_len, device=exact.device)[None, :] >= first[:, None]  # (B, T) non-padding queries
    return float(torch.linalg.vector_norm((out - exact)[real].float()) / torch.linalg.vector_norm(exact[real].float()))


@torch.no_grad()
def layer_errors(
    model: torch.nn.Module,
    var: contextvars.ContextVar[S | None],
    state: S,
    name: str,
    function: Callable,
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor | None,
) -> dict[int, float]:
    """Per-layer relative error of a patch on input_ids (B, N): one forward pass with its error attention `function`
    (registered as `name`) reading `state` (layers the plan does not touch are left out)."""
    if attention_mask is None:
        attention_mask = torch.ones_like(input_ids)
    first_positions(attention_mask)
    with running(model, var, state, name, function, patch=False):
        model(input_ids=input_ids, attention_mask=attention_mask, use_cache=False, logits_to_keep=1)
    return dict(sorted(state.errors.items()))


def first_positions(attention_mask: torch.Tensor) -> torch.Tensor:
    """First non-padding position per row of a left-padded (batch, tokens) mask."""
    if bool((attention_mask[:, -1] == 0).any()):
        raise SinkEvalError("the patches need left padding: set tokenizer.padding_side = 'left'")
    return attention_mask.long().argmax(dim=-1)


def is_index(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


@torch.no_grad()
def generate(
    model: torch.nn.Module,
    plan: P,
    new_cache: Callable[[torch.nn.Module, P, torch.Tensor], C],
    patched: Callable[[torch.nn.Module, P, C], AbstractContextManager[None]],
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor | None,
    max_new_tokens: int,
    logits_processor: LogitsProcessorList | None,
) -> tuple[torch.Tensor, C]:
    """Greedy generation of `max_new_tokens` (at least 1) after input_ids (B, N) under a patch's `plan`, into its
    cache `new_cache(model, plan, mask)`, inside `patched(model, plan, cache)`: (prompt + new token ids, the cache)."""
    if not is_index(max_new_tokens) or max_new_tokens < 1:
        raise SinkEvalError(f"max_new_tokens is the number of tokens to generate, at least 1, not {max_new_tokens!r}")
    if attention_mask is None:
        attention_mask = torch.ones_like(input_ids)
    cache = new_cache(model, plan, attention_mask)
    with patched(model, plan, cache):
        ids = greedy(model, input_ids, attention_mask, cache, max_new_tokens, logits_processor)
    return ids, cache


def greedy(
    model: torch.nn.Module,
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor,
    cache: Cache,
    new_tokens: int,
    logits_processor: LogitsProcessorList | None = None,
) -> torch.Tensor:
    """Plain `model.generate`, greedy, of exactly `new_tokens` tokens after input_ids (B, N) into `cache`: the
    prompt and new ids (B, N + new_tokens). `logits_processor`: generate's, e.g. a `speed.StepClock`."""
    return model.generate(
        input_ids=input_ids,
        attention_mask=attention_mask,
        cache=cache,  # generate's name for past_key_values since transformers 5.x
        max_new_tokens=new_tokens,
        min_new_tokens=new_tokens,
        do_sample=False,
        pad_token_id=pad_id(model),
        logits_processor=logits_processor,
    )


def pad_id(model: torch.nn.Module) -> int:
    """The id generation pads with: the model's pad token, else its (first) EOS token, else 0."""
    config = model.generation_config
    pad = config.pad_token_id if config.pad_token_id is not None else config.eos_token_id
    if isinstance(pad, list):
        pad = pad[0]
    return 0 if pad is None else pad
