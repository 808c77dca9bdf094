"""Sampling error: a seeded bootstrap over prompts (or inputs), so that the same measurement gives the same SE."""

from __future__ import annotations

from collections.abc import Callable

import torch

BOOTSTRAP_RESAMPLES = 200


def bootstrap_se(values: torch.Tensor, statistic: Callable[[torch.Tensor], float | None]) -> float | None:
    """Standard deviation of `statistic` over `BOOTSTRAP_RESAMPLES` resamples with replacement of the rows of `values`
    (prompts; seeded, so repeatable); None with fewer than two rows or two defined values."""
    if len(values) < 2:
        return None
    gen = torch.Generator().manual_seed(0)
    resampled = []
    for _ in range(BOOTSTRAP_RESAMPLES):
        value = statistic(values[torch.randint(len(values), (len(values),), generator=gen)])
        if value is not None:
            resampled.append(value)
    return float(torch.tensor(resampled).std()) if len(resampled) > 1 else None
