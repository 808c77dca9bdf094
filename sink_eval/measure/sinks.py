"""Sink heads and head classes from per-head attention statistics (see `sink_eval.measure.probe` for the scores).

- sink head: sink score >= tau. tau = 0.8 reproduces the original research notes; tau = 0.3 is the threshold of
  Gu et al. (ICLR 2025).
- chance-corrected threshold (an option): a uniform causal head already puts mean_i 1/(i+1) of its mass on the
  first token (u(N), 0.5 for a two-token prompt), so tau(N) = u(N) + tau * (1 - u(N)) asks for a fraction tau of the
  attention *beyond* chance. It tends to tau as N grows.
- head class: "sink" if sink >= tau, else "self" if self >= tau, else "previous" if previous-token >= tau, else
  "mixed".
"""

from __future__ import annotations

import torch

DEFAULT_THRESHOLDS = (0.8, 0.3)
HEAD_CLASSES = ("sink", "self", "previous", "mixed")


def uniform_first_token_mass(n_tokens: int) -> float:
    """u(N) = mean over queries i = 1..N-1 of 1/(i+1): the first-token mass of uniform causal attention."""
    if n_tokens < 2:
        return float("nan")
    return sum(1.0 / (i + 1) for i in range(1, n_tokens)) / (n_tokens - 1)


def threshold_for(tau: float, n_tokens: int, chance_corrected: bool = False) -> float:
    if not chance_corrected:
        return tau
    u = uniform_first_token_mass(n_tokens)
    return u + tau * (1.0 - u)


def sink_heads(sink_scores: torch.Tensor, threshold: float) -> torch.Tensor:
    """Boolean (layers, heads): sink score >= threshold (NaN scores, of one-token prompts, are never sinks)."""
    return sink_scores >= threshold


def head_classes(sink: torch.Tensor, self_: torch.Tensor, prev: torch.Tensor, threshold: float) -> torch.Tensor:
    """Index into HEAD_CLASSES per (layer, head), by the precedence sink > self > previous > mixed."""
    classes = torch.full(sink.shape, HEAD_CLASSES.index("mixed"), dtype=torch.long)
    for name, score in reversed((("sink", sink), ("self", self_), ("previous", prev))):
        classes[score >= threshold] = HEAD_CLASSES.index(name)
    return classes
