"""Registered attention implementations: one place that registers them with transformers and switches a model to one.

transformers looks attention functions up by name (`AttentionInterface`) and builds the mask each one receives with
the mask function registered under the same name (`AttentionMaskInterface`): a function registered without a mask
receives none. `use(model, name, function, mask)` registers both and switches `model` to them for a block, restoring
the previous implementation on exit, also after an exception.

Rule: the patches (`use(..., patch=True)`: the copy and the streaming patch) do not nest. An inner patch would
replace the outer one's attention outright, so a head planned by both would be copied or streamed, never both, and
silently; entering a patch while another runs on the same model is refused instead.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager

import torch

from sink_eval.core.errors import SinkEvalError

_PATCHES: set[str] = set()  # names registered as patches


def register(name: str, function: Callable, mask: Callable) -> None:
    """Register `function` as attention implementation `name`, with the mask function `mask` beside it."""
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface

    AttentionInterface.register(name, function)
    AttentionMaskInterface.register(name, mask)


@contextmanager
def attention_implementation(model: torch.nn.Module, name: str) -> Iterator[None]:
    """Switch `model` to the registered attention implementation `name`, restoring the previous one on exit."""
    previous = model.config._attn_implementation
    model.set_attn_implementation(name)
    try:
        yield
    finally:
        model.set_attn_implementation(previous)


@contextmanager
def use(model: torch.nn.Module, name: str, function: Callable, mask: Callable, patch: bool = False) -> Iterator[None]:
    """Register `function` (with `mask`) as `name` and run `model` with it inside the block; a `patch` is refused
    while another patch runs on `model`."""
    current = model.config._attn_implementation
    if patch and current in _PATCHES:
        raise SinkEvalError(
            f"the model already runs under the {current!r} patch; patches do not nest (a head is copied or streamed, "
            "never both): run one plan at a time"
        )
    if patch:
        _PATCHES.add(name)
    register(name, function, mask)
    with attention_implementation(model, name):
        yield
