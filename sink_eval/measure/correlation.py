"""How predictable sink heads are: across layers, prompts and lengths.

Inputs are boolean sink maps of shape (prompts, layers, heads), or float sink scores of that shape
(`layer_correlation`), and per-prompt values (`spearman`). Results: `first_layer_agreement` a `FirstLayerAgreement`
(floats, None where undefined, and a prompt count); `consistency` a (layers, heads) float tensor; `layer_correlation`
a (layers, layers) float tensor, NaN where a layer's scores are constant; `spearman` a float, None where undefined.

- first-layer agreement (the original hypothesis): over prompts and heads h that are sinks in layer 0, the fraction
  of later layers l >= 1 where (l, h) is a sink, pooled over prompts. Base rate: the fraction of all (l >= 1, h) that
  are sinks. Lift = agreement / base rate. Undefined when layer 0 has no sink head on any prompt.
  Seen as a predictor of "(l, h) is a sink" by "(0, h) is a sink": precision = the agreement; recall = the fraction
  of later-layer sinks whose head index is a layer-0 sink.
- consistency of (l, h) = fraction of prompts on which it is a sink.
- layer x layer correlation: Pearson correlation over (prompt, head) pairs of the sink scores of layers l and m.
- length dependence: Spearman rank correlation between a prompt's length and its sink prevalence.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass
class FirstLayerAgreement:
    agreement: float | None
    base_rate: float | None
    lift: float | None
    recall: float | None
    prompts_with_layer0_sink: int


def _ratio(num: float, den: float) -> float | None:
    return num / den if den else None


def first_layer_agreement(sinks: torch.Tensor) -> FirstLayerAgreement:
    later = sinks[:, 1:, :].float()  # (P, L-1, H)
    layer0 = sinks[:, 0, :].float().unsqueeze(1)  # (P, 1, H)
    agreement = _ratio(float((later * layer0).sum()), float(layer0.sum()) * later.shape[1])
    base_rate = _ratio(float(later.sum()), later.numel())
    recall = _ratio(float((later * layer0).sum()), float(later.sum()))
    lift = agreement / base_rate if agreement is not None and base_rate else None
    return FirstLayerAgreement(agreement, base_rate, lift, recall, int(sinks[:, 0, :].any(dim=-1).sum()))


def consistency(sinks: torch.Tensor) -> torch.Tensor:
    """(layers, heads): fraction of prompts where each head is a sink."""
    return sinks.float().mean(dim=0)


def layer_correlation(scores: torch.Tensor) -> torch.Tensor:
    """(layers, layers) Pearson correlation of sink scores over (prompt, head) pairs; NaN where a layer is constant."""
    per_layer = scores.permute(1, 0, 2).reshape(scores.shape[1], -1).double()
    centred = per_layer - per_layer.mean(dim=1, keepdim=True)
    norms = centred.norm(dim=1)
    return (centred @ centred.T / torch.outer(norms, norms)).float()


def _ranks(values: torch.Tensor) -> torch.Tensor:
    """Ranks 1..n with ties given their average rank."""
    order = torch.argsort(values, stable=True)
    ranks = torch.empty(len(values), dtype=torch.float64)
    sorted_values = values[order]
    i = 0
    while i < len(values):
        j = i
        while j + 1 < len(values) and sorted_values[j + 1] == sorted_values[i]:
            j += 1
        ranks[order[i : j + 1]] = (i + j) / 2 + 1
        i = j + 1
    return ranks


def spearman(x: torch.Tensor, y: torch.Tensor) -> float | None:
    """Spearman's rank correlation (Pearson of average ranks); None with fewer than 3 points or a constant input."""
    if len(x) < 3:
        return None
    rx, ry = _ranks(x.double()), _ranks(y.double())
    rx, ry = rx - rx.mean(), ry - ry.mean()
    den = float(rx.norm() * ry.norm())
    return float((rx * ry).sum()) / den if den else None
