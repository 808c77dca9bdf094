"""Speed of the patched vs the unpatched model: interleaved timings, attention share, ceilings.

Speed figures are ratios measured in one run, patched and unpatched interleaved round by round; absolute medians
are kept for reference only. Definitions:
- attention share a of a timed region = (t - t_without) / t, where t_without is the same region with every attention
  call returning at once (the "sink_none" implementation): the time the attention computation itself takes;
- growth share g of decode = (t_without - t_static) / t, t_static the "without" region on a cache of full-attention
  layers preallocated and written in place (`growth_free_cache`): transformers' `DynamicCache` concatenates each
  step's keys and values onto the whole cache, a copy of all of it per layer and step (377 MB a step at 8 192
  tokens on smollm2-135m), which a KV group whose cache stops growing (dropped by a copy plan, a ring of s + w by a
  streaming plan) no longer pays;
- ceiling of a plan removing a fraction f of the attention work and stopping the growth of a fraction f_g of the KV
  groups' caches = 1 / (1 - f * a - f_g * g): the speed-up if the removed work cost nothing and the rest cost what
  it did (f: `Plan.work_removed`; f_g: `Plan.kv_groups_removed`
  over all KV groups; f_g = 0 in prefill, which builds the cache once);
- a gate passes when the patch saves at least 80 % of what the ceiling says can be saved:
  t_unpatched - t_patched >= 0.8 * (t_unpatched - t_unpatched / ceiling), i.e. with the speed-up s = t_unpatched /
  t_patched: 1 - 1/s >= 0.8 * (1 - 1/ceiling); a real plan's gate (`deployable`): s >= 0.97 where the ceiling is
  below 1.05, that rule above it;
- paired speed-up (`paired`): each timing of a variant is set beside a timing of the unpatched region taken just
  before it, and the speed-up is the median of those ratios, so that a drift of a shared machine between variants
  does not show up as a speed-up or a slow-down;
- every clock read waits for the device first (`clock`): on an accelerator kernels run asynchronously, and an
  unsynchronised read would time their launch, not their work.
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable, Mapping
from contextlib import AbstractContextManager, nullcontext
from dataclasses import dataclass

import torch
from transformers import Cache, DynamicCache, LogitsProcessor
from transformers.cache_utils import DynamicLayer, StaticLayer
from transformers.masking_utils import sdpa_mask

from sink_eval.core import attention
from sink_eval.patches.base import Plan, kv_cache_bytes

NO_ATTENTION = "sink_none"
GATE_SHARE = 0.8
SMALL_CEILING = 1.05  # below it a plan is only held to lose no time (`deployable`)
NO_LOSS = 0.97
CPU = torch.device("cpu")


def ceiling(fraction: float, share: float, growth_fraction: float = 0.0, growth_share: float = 0.0) -> float:
    """1 / (1 - f * a - f_g * g): the best speed-up from skipping a fraction f of work that takes a share a of the time
    and a fraction f_g of the cache growth that takes a share g (module doc)."""
    return 1.0 / (1.0 - fraction * share - growth_fraction * growth_share)


def gate_passes(speedup: float, ceiling_: float, share: float = GATE_SHARE) -> bool:
    """Whether a speed-up saves at least `share` of the time the ceiling says can be saved."""
    return 1 - 1 / speedup >= share * (1 - 1 / ceiling_)


def deployable(speedup: float, ceiling_: float) -> bool:
    """The gate of a plan a user would deploy: where its ceiling is below
    `SMALL_CEILING` (little to save) it is at least `NO_LOSS` times as fast as the unpatched model, else it saves
    `GATE_SHARE` of what the ceiling allows (`gate_passes`). Read on the lower quartile of the paired ratios."""
    if ceiling_ < SMALL_CEILING:
        return speedup >= NO_LOSS
    return gate_passes(speedup, ceiling_)


def synchronize(device: torch.device) -> None:
    """Wait until the work queued on `device` is done (a no-op on the CPU, whose work is done when a call returns)."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def clock(device: torch.device) -> float:
    """`time.perf_counter()` once `device` has finished its queued work."""
    synchronize(device)
    return time.perf_counter()


class StepClock(LogitsProcessor):
    """A logits processor that reads the clock (`clock`) at the end of each forward pass of a `generate` call, as
    generate hands it that step's logits: `times[0]` ends the prefill, `times[k]` decode step k. With the clock read
    before the call (`start`): prefill seconds = times[0] - start, decode seconds = times[-1] - times[0] (the
    new_tokens - 1 decode forwards, each with generate's own per-step work)."""

    def __init__(self, device: torch.device) -> None:
        self.device = device
        self.start = clock(device)
        self.times: list[float] = []

    def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor) -> torch.Tensor:
        self.times.append(clock(self.device))
        return scores

    def prefill_seconds(self) -> float:
        return self.times[0] - self.start

    def decode_seconds(self) -> float:
        return self.times[-1] - self.times[0]


@dataclass
class Paired:
    speedup: float  # median over rounds of t_unpatched / t_variant, timed back to back
    unpatched_s: float  # medians, for reference
    variant_s: float
    ratios: list[float]  # t_unpatched / t_variant of each round, in order

    @property
    def lower_quartile(self) -> float:
        """The 25th percentile of the paired ratios (the median itself with one round)."""
        return _quartiles(self.ratios)[0]

    @property
    def iqr(self) -> float:
        """Interquartile range of the paired ratios: their spread (0 with one round)."""
        low, high = _quartiles(self.ratios)
        return high - low


def _quartiles(values: list[float]) -> tuple[float, float]:
    if len(values) < 2:
        return values[0], values[0]
    low, _, high = statistics.quantiles(values, n=4, method="inclusive")
    return low, high


def paired(
    unpatched: Callable[[], float | None],
    variants: Mapping[str, Callable[[], float | None]],
    rounds: int,
    warmup: bool = True,
    device: torch.device = CPU,
) -> dict[str, Paired]:
    """Time each variant right after a run of `unpatched`, `rounds` times; a function may return its own timing
    (e.g. of the decode steps only), else its wall time counts. `device` is the one the functions run on."""

    def timed(fn: Callable[[], float | None]) -> float:
        start = clock(device)
        own = fn()
        return own if own is not None else clock(device) - start

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
            ratios=[u / v for u, v in p],
        )
        for name, p in pairs.items()
    }


def _no_attention(module, query, key, value, attention_mask, **kwargs):
    return query.transpose(1, 2), None


def without_attention(model: torch.nn.Module):
    """Context manager: every attention call of `model` returns at once (for the attention share only)."""
    return attention.use(model, NO_ATTENTION, _no_attention, sdpa_mask)


@dataclass
class SpeedResult:
    tokens: int
    prefill_unpatched_s: float
    prefill_patched_s: float
    prefill_speedup: float  # paired (see `paired`)
    prefill_share: float
    decode_steps: int
    decode_unpatched_s: float  # per step
    decode_patched_s: float
    decode_speedup: float
    decode_share: float
    decode_growth_share: float | None  # g: the share of a decode step the cache's growth takes (None: older file)
    kv_bytes_unpatched: int
    kv_bytes_patched: int


def growth_free_cache(model: torch.nn.Module, positions: int) -> DynamicCache:
    """The model's own cache with every full-attention layer preallocated for `positions` positions and written in
    place (a transformers `StaticLayer`); sliding-window layers keep their own bounded layer, which no plan shrinks.
    For the growth share g (module doc)."""
    cache = DynamicCache(config=model.config)
    cache.layers = [
        StaticLayer(max_cache_len=positions) if type(layer) is DynamicLayer else layer for layer in cache.layers
    ]
    return cache


def attention_share(without: Paired) -> float:
    """a = (t - t_without) / t from the paired ratio of the "without" region (module doc), at least 0."""
    return max(0.0, 1 - 1 / without.speedup)


def growth_share(without: Paired, static: Paired) -> float:
    """g = (t_without - t_static) / t from the paired ratios of the two "without" regions (module doc), at least 0."""
    return max(0.0, 1 / without.speedup - 1 / static.speedup)


@torch.no_grad()
def measure(model: torch.nn.Module, plan: Plan, input_ids: torch.Tensor, rounds: int = 3, decode_steps: int = 8):
    """Prefill and decode speed of `input_ids` (one row, no padding), unpatched vs patched, paired, in one run; the
    KV bytes of the unpatched and the plan's cache after the decode steps."""
    mask = torch.ones_like(input_ids)
    device = input_ids.device

    def prefill(context: Callable[[], AbstractContextManager[object]]) -> Callable[[], None]:
        def run() -> None:
            with context():
                model(input_ids=input_ids, use_cache=False, logits_to_keep=1)

        return run

    prefill_runs = {
        "patched": prefill(lambda: plan.patched(model)),
        "without": prefill(lambda: without_attention(model)),
    }
    prefill_t = paired(prefill(nullcontext), prefill_runs, rounds, device=device)

    caches: dict[str, Cache] = {}

    def decode(name: str, make_cache: Callable[[], Cache], context) -> Callable[[], float]:
        def run() -> float:
            caches[name] = make_cache()
            with context(caches[name]):
                return _decode_per_step(model, input_ids, caches[name], decode_steps)

        return run

    def plain() -> DynamicCache:
        return DynamicCache(config=model.config)

    decode_runs = {
        "patched": decode("patched", lambda: plan.new_cache(model, mask), lambda cache: plan.patched(model, cache)),
        "without": decode("without", plain, lambda cache: without_attention(model)),
        "static": decode(
            "static",
            lambda: growth_free_cache(model, input_ids.shape[1] + decode_steps),
            lambda cache: without_attention(model),
        ),
    }
    unpatched_decode = decode("unpatched", plain, lambda cache: nullcontext())
    decode_t = paired(unpatched_decode, decode_runs, rounds, warmup=False, device=device)
    return SpeedResult(
        tokens=input_ids.shape[1],
        prefill_unpatched_s=prefill_t["patched"].unpatched_s,
        prefill_patched_s=prefill_t["patched"].variant_s,
        prefill_speedup=prefill_t["patched"].speedup,
        prefill_share=attention_share(prefill_t["without"]),
        decode_steps=decode_steps,
        decode_unpatched_s=decode_t["patched"].unpatched_s,
        decode_patched_s=decode_t["patched"].variant_s,
        decode_speedup=decode_t["patched"].speedup,
        decode_share=attention_share(decode_t["without"]),
        decode_growth_share=growth_share(decode_t["without"], decode_t["static"]),
        kv_bytes_unpatched=kv_cache_bytes(caches["unpatched"]),
        kv_bytes_patched=kv_cache_bytes(caches["patched"]),
    )


def _decode_per_step(model: torch.nn.Module, input_ids: torch.Tensor, cache: Cache, steps: int) -> float:
    """Prefill `input_ids` into `cache`, then the mean seconds of one greedy decode step over `steps` steps."""
    token = model(input_ids=input_ids, cache=cache, logits_to_keep=1).logits.argmax(-1)
    start = clock(input_ids.device)
    for _ in range(steps):
        token = model(input_ids=token, cache=cache, logits_to_keep=1).logits.argmax(-1)
    return (clock(input_ids.device) - start) / steps
