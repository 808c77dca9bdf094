"""Sink + window attention kernels: the scores a streamed head needs and no others.

A streamed head at query position i attends to the key positions j with (positions absolute, `first` = the row's
first non-padding position, rel(j) = j − first):
    first ≤ j ≤ i  and  (rel(j) < s  or  j > i − w)                                  (`allowed`)
and a padding query (i < first) to itself only, so that its (unused) output stays finite. Every key set handed to
SDPA here lists each position at most once; a slot holding no key, or a duplicate, has position −1.

- `banded_attention` (a full pass over N positions, no cache): queries in blocks of `BLOCK`; each block attends to the
  s sink keys plus the contiguous band of keys its window can reach (BLOCK + w − 1 of them), gathered once, in one
  batched SDPA call for all blocks. Work O(N (s + BLOCK + w)), memory O(N (s + BLOCK + w) / BLOCK) per head: no
  N × N score matrix exists at any point. The layout (gather index and mask) depends only on N, the rows' first
  positions, s and w, so one layout serves every layer of a forward pass (`band_layout`).
- `keyed_attention` (a chunk of T > 1 tokens after cached context): queries against an explicit key set with its
  positions (the cache's sinks and window). A one-token decode step is `patch.StreamingState.decode_step`.

Measured here (CPU, 2 threads, 9 query heads over 3 KV heads, D = 64, s = 4, w = 256): this kernel against
torch's flex_attention with a sink+window block mask (compiled by inductor; eager flex builds the full score
matrix): see ARCHITECTURE.md, "Streaming prefill kernel".
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

BLOCK = 64  # queries per block: the fastest of 32..256 measured here at 2 048 and 8 192 tokens


def allowed(
    query_pos: torch.Tensor, key_pos: torch.Tensor, first: torch.Tensor, sink: int, window: int
) -> torch.Tensor:
    """Whether each query may attend to each key (broadcast shapes; positions absolute, −1: no key)."""
    rel = key_pos - first
    inside = (key_pos >= first) & (key_pos <= query_pos) & ((rel < sink) | (key_pos > query_pos - window))
    return inside | ((query_pos < first) & (key_pos == query_pos))


def additive(mask: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """A boolean mask as SDPA's additive one: 0 where allowed, −inf elsewhere."""
    return torch.zeros(mask.shape, dtype=dtype, device=mask.device).masked_fill(~mask, float("-inf"))


@dataclass(frozen=True)
class BandLayout:
    """Where each block's keys come from and which of them each query sees, for N positions.

    index (B, blocks * M): key positions gathered per block (M = s + band), `shared` when every row's is the same;
    mask (B * blocks, 1, BLOCK, M) additive."""

    n: int
    block: int
    blocks: int
    keys_per_block: int
    index: torch.Tensor
    shared: bool
    mask: torch.Tensor


def band_layout(
    n: int, first: torch.Tensor, sink: int, window: int, dtype: torch.dtype, block: int = BLOCK
) -> BandLayout:
    """The layout of `banded_attention` for N = `n` positions and the rows' first positions `first` (B,)."""
    device = first.device
    block = min(block, n)
    blocks = -(-n // block)
    band = min(block + window - 1, n)
    starts = (torch.arange(blocks, device=device) * block - (window - 1)).clamp(0, n - band)
    band_pos = (starts[:, None] + torch.arange(band, device=device)).expand(len(first), blocks, band)
    sink_pos = first[:, None, None] + torch.arange(sink, device=device)  # (B, 1, s)
    sink_pos = torch.where(sink_pos < n, sink_pos, -1).expand(len(first), blocks, sink)
    # a band key among the first s real tokens is already a sink key: keep one of the two
    rel = band_pos - first[:, None, None]
    band_key = torch.where((rel >= 0) & (rel < sink), -1, band_pos)
    key_pos = torch.cat([sink_pos, band_key], dim=-1)  # (B, blocks, M)
    query_pos = torch.arange(blocks * block, device=device).view(1, blocks, block, 1)
    ok = allowed(query_pos, key_pos[:, :, None, :], first.view(-1, 1, 1, 1), sink, window)
    beyond = query_pos >= n  # the last block's padding queries: any key, their output is dropped
    ok = ok | (beyond & (torch.arange(key_pos.shape[-1], device=device) == 0))
    gather = torch.cat([sink_pos.clamp(min=0), band_pos], dim=-1)
    mask = additive(ok, dtype).view(len(first) * blocks, 1, block, key_pos.shape[-1])
    index = gather.reshape(len(first), -1)
    shared = bool((first == first[0]).all())
    return BandLayout(n, block, blocks, key_pos.shape[-1], index, shared, mask)


def banded_attention(
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    layout: BandLayout,
    scaling: float | None,
) -> torch.Tensor:
    """query (B, h, N, D), key/value (B, k, N, D) with h a multiple of k (query head j uses KV head j // (h / k))
    -> output (B, N, h, D): each query's attention over its sink and window keys only."""
    batch, heads, n, dim = query.shape
    kv_heads = key.shape[1]
    blocks, block, m = layout.blocks, layout.block, layout.keys_per_block
    padded = blocks * block
    if padded != n:
        query = F.pad(query, (0, 0, 0, padded - n))
    q = query.view(batch, heads, blocks, block, dim).transpose(1, 2).reshape(batch * blocks, heads, block, dim)

    def gathered(x: torch.Tensor) -> torch.Tensor:  # (B, k, N, D) -> (B * blocks, k, M, D)
        rows = x.transpose(1, 2)  # (B, N, k, D)
        if layout.shared:
            picked = rows.index_select(1, layout.index[0])
        else:
            picked = torch.stack([rows[b].index_select(0, layout.index[b]) for b in range(batch)])
        return picked.view(batch * blocks, m, kv_heads, dim).transpose(1, 2)

    out = F.scaled_dot_product_attention(
        q, gathered(key), gathered(value), attn_mask=layout.mask, scale=scaling, enable_gqa=heads != kv_heads
    )
    return out.view(batch, blocks, heads, block, dim).transpose(2, 3).reshape(batch, padded, heads, dim)[:, :n]


def keyed_attention(
    query: torch.Tensor,
    query_pos: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    key_pos: torch.Tensor,
    first: torch.Tensor,
    sink: int,
    window: int,
    scaling: float | None,
) -> torch.Tensor:
    """query (B, h, T, D) at positions `query_pos` (T,), key/value (B, h, M, D) at positions `key_pos` (B, h, M)
    -> output (B, T, h, D) over the allowed keys."""
    ok = allowed(query_pos.view(1, 1, -1, 1), key_pos[:, :, None, :], first.view(-1, 1, 1, 1), sink, window)
    out = F.scaled_dot_product_attention(query, key, value, attn_mask=additive(ok, query.dtype), scale=scaling)
    return out.transpose(1, 2)
