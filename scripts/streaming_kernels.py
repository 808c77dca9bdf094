"""Which sink + window prefill kernel is faster here: `sink_eval.patches.streaming.banded` against flex_attention with a
block mask.

    python scripts/streaming_kernels.py [--threads 2] [--tokens 2048 8192]

One attention layer of SmolLM2's shape (9 query heads over 3 KV heads, head dim 64), s = 4, w = 256, random
queries, keys and values; the best of `REPEATS` timed calls after one warm-up call, beside full causal SDPA. Flex
attention is compiled by inductor (its eager fallback scores the full N x N matrix); its block mask is built once
per length and its compile time is printed apart. Every kernel's output is checked against SDPA under the explicit
sink + window mask (at 2048 tokens; 8192 would need that N x N mask).
"""

from __future__ import annotations

import argparse
import time
from collections.abc import Callable
from functools import partial

import torch
import torch.nn.functional as F

from sink_eval.patches.streaming.banded import BandLayout, allowed, band_layout, banded_attention

SINK, WINDOW = 4, 256
HEADS, KV_HEADS, DIM = 9, 3, 64
REPEATS = 3
BLOCKS = (32, 64, 128, 256)


def best_of(fn: Callable[[], object]) -> float:
    fn()
    times = []
    for _ in range(REPEATS):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return min(times)


def compare(n: int, flex: Callable) -> None:
    """Print the timings of every kernel at N = n tokens."""
    from torch.nn.attention.flex_attention import create_block_mask

    gen = torch.Generator().manual_seed(0)
    q = torch.randn(1, HEADS, n, DIM, generator=gen)
    k, v = (torch.randn(1, KV_HEADS, n, DIM, generator=gen) for _ in range(2))
    first = torch.zeros(1, dtype=torch.long)
    full = best_of(lambda: F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True))
    print(f"N={n}: full causal SDPA {full:.4f} s")
    exact = None
    if n <= 2048:
        pos = torch.arange(n)
        mask = allowed(pos.view(-1, 1), pos.view(1, -1), first, SINK, WINDOW)
        exact = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, enable_gqa=True).transpose(1, 2)

    def error(out: torch.Tensor) -> str:
        return "" if exact is None else f", max error {float((out - exact).abs().max()):.1e}"

    def banded(layout: BandLayout) -> torch.Tensor:
        return banded_attention(q, k, v, layout, None)

    for block in BLOCKS:
        start = time.perf_counter()
        layout = band_layout(n, first, SINK, WINDOW, q.dtype, block)
        made = time.perf_counter() - start
        t = best_of(partial(banded, layout))
        check = error(banded(layout))
        print(f"  banded SDPA, block {block:>3}: {t:.4f} s ({full / t:.2f}x; layout {made:.3f} s once){check}")

    def in_window(b, h, i, j):
        return (j <= i) & ((j < SINK) | (j > i - WINDOW))

    start = time.perf_counter()
    block_mask = create_block_mask(in_window, B=None, H=None, Q_LEN=n, KV_LEN=n, device="cpu")
    made = time.perf_counter() - start
    start = time.perf_counter()
    out = flex(q, k, v, block_mask=block_mask, enable_gqa=True).transpose(1, 2)
    compiled = time.perf_counter() - start
    t = best_of(lambda: flex(q, k, v, block_mask=block_mask, enable_gqa=True))
    print(
        f"  flex_attention (compiled): {t:.4f} s ({full / t:.2f}x; block mask {made:.3f} s, first call "
        f"{compiled:.1f} s){error(out)}"
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--tokens", type=int, nargs="+", default=[2048, 8192])
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    from torch.nn.attention.flex_attention import flex_attention

    flex = torch.compile(flex_attention, dynamic=False)
    print(f"torch {torch.__version__}, {args.threads} threads, {HEADS}/{KV_HEADS} heads, D={DIM}, s={SINK}, w={WINDOW}")
    for n in args.tokens:
        compare(n, flex)


if __name__ == "__main__":
    main()
