"""Policies by name: a lazy registry, as lm-eval's `register_model`.

Listing the names imports nothing (the command line builds its `--policy` choices from `names()` without importing
torch); a policy's class is imported the first time it is asked for (`policy_class`). Three sources, in order:
- the built-in policies below, one module each, as "module:Class" targets;
- classes registered from Python with the `register_policy` decorator (a test module, a notebook, a plugin);
- installed packages' entry points in the group "sink_eval.policies" (name = "module:Class").
A class's `name` must be the name it is registered under.
"""

from __future__ import annotations

import importlib
from importlib.metadata import entry_points
from typing import TYPE_CHECKING, Any

from sink_eval.core.errors import SinkEvalError

if TYPE_CHECKING:
    from sink_eval.policies.base import Policy

ENTRY_POINT_GROUP = "sink_eval.policies"
BUILT_IN = {
    "first_layer": "sink_eval.policies.first_layer:FirstLayer",
    "calibrated": "sink_eval.policies.calibrated:Calibrated",
    "oracle": "sink_eval.policies.oracle:Oracle",
    "hybrid": "sink_eval.policies.hybrid:Hybrid",
    "streaming": "sink_eval.policies.streaming:Streaming",
    "random": "sink_eval.policies.random:Random",
    "streaming_llm": "sink_eval.policies.streaming_llm:StreamingLLM",
}
_REGISTERED: dict[str, type[Policy]] = {}


def register_policy(cls: type[Policy]) -> type[Policy]:
    """Class decorator: make the policy `cls` known by its `name` (to the command line too)."""
    if cls.name in BUILT_IN:
        raise SinkEvalError(f"{cls.name!r} is a built-in policy; register yours under another name")
    _REGISTERED[cls.name] = cls
    return cls


def _entry_points() -> dict[str, str]:
    return {ep.name: ep.value for ep in entry_points(group=ENTRY_POINT_GROUP)}


def names() -> list[str]:
    """Every policy name: the built-ins, then the registered ones, then the installed entry points'."""
    return list(dict.fromkeys([*BUILT_IN, *_REGISTERED, *_entry_points()]))


def policy_class(name: str) -> type[Policy]:
    """The class of policy `name`, imported now if it is not yet."""
    if name in _REGISTERED:
        return _REGISTERED[name]
    target = BUILT_IN.get(name) or _entry_points().get(name)
    if target is None:
        raise SinkEvalError(f"unknown policy {name!r}; choose one of {', '.join(names())}")
    module, _, attribute = target.partition(":")
    cls = getattr(importlib.import_module(module), attribute)
    if cls.name != name:
        raise SinkEvalError(f"the policy registered as {name!r} ({target}) calls itself {cls.name!r}")
    return cls


def make_policy(name: str, **options: Any) -> Policy:
    """Policy `name` with these options (each one a field of its `Options`; the others keep their defaults)."""
    return policy_class(name).with_options(**options)
