"""`random`: the control that says whether a streaming choice matters: as many KV groups as `streaming` streams whole
(with p, or round(q G) with q), drawn with `seed` uniformly from the same candidate layers, every head of each."""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from dataclasses import dataclass

import torch

from sink_eval.core.errors import SinkEvalError
from sink_eval.measure.probe import PromptStats
from sink_eval.patches.base import is_index
from sink_eval.patches.streaming.plan import StreamingPlan
from sink_eval.policies.base import Target
from sink_eval.policies.streaming import Streaming, StreamingOptions


@dataclass(frozen=True)
class RandomOptions(StreamingOptions):
    seed: int = 0

    def __post_init__(self) -> None:
        super().__post_init__()
        if not is_index(self.seed):
            raise SinkEvalError(f"the random policy's seed is an int, not {self.seed!r}")


class Random(Streaming):
    name = "random"
    Options = RandomOptions
    options: RandomOptions

    @property
    def label(self) -> str:
        o = self.options
        rule = f"as streaming p={o.streaming_score:g}" if o.fraction is None else f"q={o.fraction:g}"
        return f"random {rule} seed={o.seed} ({o.label})"

    def plan(
        self, target: Target, prompt: PromptStats | None = None, calibration: Sequence[PromptStats] = ()
    ) -> StreamingPlan:
        fields = {f.name: getattr(self.options, f.name) for f in dataclasses.fields(StreamingOptions)}
        n = Streaming(StreamingOptions(**fields)).plan(target, calibration=calibration).n_whole_groups(target.shape)
        candidates = [(layer, k) for layer in target.layers for k in range(target.shape.kv_heads)]
        order = torch.randperm(len(candidates), generator=torch.Generator().manual_seed(self.options.seed)).tolist()
        return self.whole_groups(sorted(candidates[i] for i in order[:n]), target)
