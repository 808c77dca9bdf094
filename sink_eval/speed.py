"""Speed of the patched vs the unpatched model: interleaved timings, attention share, ceilings.

Speed figures are ratios measured in one run, patched and unpatched interleaved round by round; absolute medians
are kept for reference only. Definitions:
- attention share a of a timed region = (t - t_without) / t, where t_without is the same region with every attention
  call returning at once (the "sink_none" implementation): the time the attention computation itself takes;
- ceiling of a plan copying a fraction f of the heads = 1 / (1 - f * a): the speed-up if copied heads cost nothing;
- a gate passes when the patch saves at least 80 % of what the ceiling says can be saved:
  t_unpatched - t_patched >= 0.8 * (t_unpatched - t_unpatched / ceiling), i.e. with the speed-up s = t_unpatched /
  t_patched: 1 - 1/s >= 0.8 * (1 - 1/ceiling);
- paired speed-up (`paired`): each timing of a variant is set beside a timing of the unpatched region taken just
  before it, and the speed-up is the median of those ratios, so that a drift of a shared machine between variants
  does not show up as a speed-up or a slow-down.
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable
from contextlib import nullcontext
from dataclasses import dataclass

import torch
from transformers import AttentionInterface, DynamicCache
from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

from sink_eval.patch import CopyPlan, kv_cache_bytes, new_cache, patched
from sink_eval.probe import attention_implementation

NO_ATTENTION = "sink_none"
GATE_SHARE = 0.8


def ceiling(fraction: float, share: float) -> float:
    """1 / (1 - f * a): the best speed-up from skipping a fraction f of work that takes a share a of the time."""
    return 1.0 / (1.0 - fraction * share)


def gate_passes(speedup: float, ceiling_: float, share: float = GATE_SHARE) -> bool:
    """Whether a speed-up saves at least `share` of the time the ceiling says can be saved."""
    return 1 - 1 / speedup >= share * (1 - 1 / ceiling_)


@dataclass
class Paired:
    speedup: float  # median over rounds of t_unpatched / t_variant, timed back to back
    unpatched_s: float  # medians, for reference
    variant_s: float


def paired(
    unpatched: Callable[[], float | None],
    variants: dict[str, Callable[[], float | None]],
    rounds: int,
    warmup: bool = True,
) -> dict[str, Paired]:
    """Time each variant right after a run of `unpatched`, `rounds` times; a function may return its own timing
    (e.g. of the decode steps only), else its wall time counts."""

    def timed(fn: Callable[[], float | None]) -> float:
        start = time.perf_counter()
        own = fn()
        return own if own is not None else time.perf_counter() - start

    if warmup:
        for fn in (unpatched, *variants.values()):
            fn()
    pairs: dict[str, list[tuple[float, float]]] = {name: [] for name in variants}
    for _ in range(rounds):
        for name, fn in variants.items():
            pairs[name].append((timed(unpatched), timed(fn)))
    return {
        name: Paired(
            speedup=statistics.median(u / v for u, v in p),
            unpatched_s=statistics.median(u for u, _ in p),
            variant_s=statistics.median(v for _, v in p),
        )
        for name, p in pairs.items()
    }


def _no_attention(module, query, key, value, attention_mask, **kwargs):
    return query.transpose(1, 2), None


def without_attention(model: torch.nn.Module):
    """Context manager: every attention call of `model` returns at once (for the attention share only)."""
    AttentionInterface.register(NO_ATTENTION, _no_attention)
    AttentionMaskInterface.register(NO_ATTENTION, sdpa_mask)
    return attention_implementation(model, NO_ATTENTION)


def interleaved(fns: dict[str, Callable[[], None]], rounds: int, warmup: int = 1) -> dict[str, float]:
    """Median seconds of each function, timed in turn within each round (so drifts of a shared machine hit all)."""
    for _ in range(warmup):
        for fn in fns.values():
            fn()
    times: dict[str, list[float]] = {name: [] for name in fns}
    for _ in range(rounds):
        for name, fn in fns.items():
            start = time.perf_counter()
            fn()
            times[name].append(time.perf_counter() - start)
    return {name: statistics.median(t) for name, t in times.items()}


@dataclass
class SpeedResult:
    tokens: int
    prefill_unpatched_s: float
    prefill_patched_s: float
    prefill_share: float
    decode_steps: int
    decode_unpatched_s: float  # per step
    decode_patched_s: float
    decode_share: float
    kv_bytes_unpatched: int
    kv_bytes_patched: int

    def as_dict(self) -> dict:
        return dict(self.__dict__)


@torch.no_grad()
def measure(model: torch.nn.Module, plan: CopyPlan, input_ids: torch.Tensor, rounds: int = 3, decode_steps: int = 8):
    """Prefill and decode speed of `input_ids` (one row, no padding), unpatched vs patched, in one run."""
    mask = torch.ones_like(input_ids)

    def prefill_unpatched():
        model(input_ids=input_ids, use_cache=False, logits_to_keep=1)

    def prefill_patched():
        with patched(model, plan):
            model(input_ids=input_ids, use_cache=False, logits_to_keep=1)

    def prefill_without():
        with without_attention(model):
            model(input_ids=input_ids, use_cache=False, logits_to_keep=1)

    prefill = interleaved(
        {"unpatched": prefill_unpatched, "patched": prefill_patched, "without": prefill_without}, rounds
    )

    variants = {
        "unpatched": (lambda: DynamicCache(config=model.config), lambda cache: nullcontext()),
        "patched": (lambda: new_cache(model, plan, mask), lambda cache: patched(model, plan, cache)),
        "without": (lambda: DynamicCache(config=model.config), lambda cache: without_attention(model)),
    }
    decode_times: dict[str, list[float]] = {name: [] for name in variants}
    caches: dict[str, DynamicCache] = {}
    for _ in range(rounds):
        for name, (make_cache, context) in variants.items():
            caches[name] = make_cache()
            with context(caches[name]):
                decode_times[name].append(_decode_per_step(model, input_ids, caches[name], decode_steps))
    per_step = {name: statistics.median(t) for name, t in decode_times.items()}
    return SpeedResult(
        tokens=input_ids.shape[1],
        prefill_unpatched_s=prefill["unpatched"],
        prefill_patched_s=prefill["patched"],
        prefill_share=max(0.0, 1 - prefill["without"] / prefill["unpatched"]),
        decode_steps=decode_steps,
        decode_unpatched_s=per_step["unpatched"],
        decode_patched_s=per_step["patched"],
        decode_share=max(0.0, 1 - per_step["without"] / per_step["unpatched"]),
        kv_bytes_unpatched=kv_cache_bytes(caches["unpatched"]),
        kv_bytes_patched=kv_cache_bytes(caches["patched"]),
    )


def _decode_per_step(model: torch.nn.Module, input_ids: torch.Tensor, cache: DynamicCache, steps: int) -> float:
    """Prefill `input_ids` into `cache`, then the mean seconds of one greedy decode step over `steps` steps."""
    token = model(input_ids=input_ids, past_key_values=cache, logits_to_keep=1).logits.argmax(-1)
    start = time.perf_counter()
    for _ in range(steps):
        token = model(input_ids=token, past_key_values=cache, logits_to_keep=1).logits.argmax(-1)
    return (time.perf_counter() - start) / steps
