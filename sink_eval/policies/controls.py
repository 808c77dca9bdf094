"""Random control plans of the same size as a policy's plan, and the rule that says whether a policy chose well.

A control of a plan, for one seed, plans as many query heads and as many *whole* KV groups (groups all of whose
query heads are planned: the ones whose decode cache shrinks) as the plan does, drawn uniformly from the same
candidate layers:
1. draw the plan's number of whole groups among all (layer, group) pairs of the candidate layers;
2. draw the remaining heads among the heads of the other groups, at most group_size − 1 per group, so that no further
   group becomes whole (a seeded shuffle of those heads, each taken while its group has room).
So a control matches both counts exactly, and differs from the policy only in *which* heads it plans.
"""

from __future__ import annotations

import random
from collections.abc import Sequence
from dataclasses import dataclass

import torch

from sink_eval.core.errors import SinkEvalError
from sink_eval.core.shape import Shape, model_shape
from sink_eval.patches.base import Plan


def random_heads(
    heads: dict[int, frozenset[int]], shape: Shape, candidate_layers: Sequence[int], seed: int
) -> dict[int, frozenset[int]]:
    """The heads of the seed's control of a plan planning `heads` (module doc)."""
    g = shape.group_size
    n_heads = sum(len(h) for h in heads.values())
    n_whole = shape.n_whole_groups(heads)
    outside = [layer for layer in heads if layer not in candidate_layers]
    if outside:
        raise SinkEvalError(
            f"the plan names layer {outside[0]}, which is not a candidate layer {list(candidate_layers)}"
        )
    groups = [(layer, k) for layer in candidate_layers for k in range(shape.kv_heads)]
    rng = random.Random(f"control/{seed}")
    chosen = set(rng.sample(groups, n_whole))
    drawn: dict[int, set[int]] = {}
    for layer, k in chosen:
        drawn.setdefault(layer, set()).update(range(k * g, (k + 1) * g))
    rest = [(layer, h) for layer, k in groups if (layer, k) not in chosen for h in range(k * g, (k + 1) * g)]
    rng.shuffle(rest)
    room = {group: g - 1 for group in groups}
    needed = n_heads - n_whole * g
    for layer, h in rest:
        if needed == 0:
            break
        if room[(layer, h // g)] > 0:
            room[(layer, h // g)] -= 1
            drawn.setdefault(layer, set()).add(h)
            needed -= 1
    if needed:
        raise SinkEvalError(f"no control of {n_heads} heads with exactly {n_whole} whole KV groups fits these layers")
    return {layer: frozenset(hs) for layer, hs in sorted(drawn.items())}


def random_control(plan: Plan, model: torch.nn.Module, seed: int) -> Plan:
    """The seed's control of `plan` on `model`: a plan of the same kind and settings planning `random_heads`."""
    return plan.with_heads(random_heads(dict(plan.heads), model_shape(model), plan.candidate_layers(model), seed))


def plans_every_candidate(plan: Plan, model: torch.nn.Module) -> bool:
    """Whether `plan` plans every head of its candidate layers (streaming_llm): its random control is itself."""
    heads = model_shape(model).heads
    return all(len(plan.heads.get(layer, ())) == heads for layer in plan.candidate_layers(model))


CHOOSES_WELL = "chooses well"
CHOOSES_WORSE = "chooses worse"
NOT_DISTINGUISHABLE = "not distinguishable"


@dataclass
class Verdict:
    """A policy's value against its controls' (one per seed), where higher is better."""

    policy: float
    policy_se: float
    control_mean: float
    control_spread: float  # max − min over the control seeds
    margin: float  # max(control_spread, 2 × policy_se)
    verdict: str


def verdict(policy: float, policy_se: float, controls: Sequence[float]) -> Verdict:
    """Rule for "chooses well": with d = policy − mean(controls) (higher is better; pass −value for a metric where
    lower is better) and margin = max(spread of the controls over seeds (max − min), 2 × the policy's own SE), the
    policy *chooses well* iff d > margin, *chooses worse* iff d < −margin, else it is *not distinguishable* from
    random heads of the same size. Needs at least one control."""
    if not controls:
        raise SinkEvalError("a verdict needs at least one control seed")
    mean = sum(controls) / len(controls)
    spread = max(controls) - min(controls)
    margin = max(spread, 2 * policy_se)
    d = policy - mean
    word = CHOOSES_WELL if d > margin else CHOOSES_WORSE if d < -margin else NOT_DISTINGUISHABLE
    return Verdict(policy, policy_se, mean, spread, margin, word)
