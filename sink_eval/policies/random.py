"""`random`: the control that says whether a streaming choice matters: as many KV groups as `streaming` streams whole
(with p, or round(q G) with q), drawn with `seed` uniformly from the same candidate layers, every head of each."""

from __future__ import annotations

import dataclasses

import torch

from sink_eval.measure.probe import PromptStats
from sink_eval.patches.streaming.plan import StreamingPlan
from sink_eval.policies.base import Calibration, Target
from sink_eval.policies.options import RandomOptions, StreamingOptions
from sink_eval.policies.streaming import Streaming


class Random(Streaming):
    """As many whole KV groups as `streaming` streams, drawn with the seed (`random`)."""

    name = "random"
    Options = RandomOptions
    options: RandomOptions

    def plan(self, target: Target, prompt: PromptStats | None = None, calibration: Calibration = ()) -> StreamingPlan:
        fields = {f.name: getattr(self.options, f.name) for f in dataclasses.fields(StreamingOptions)}
        n = Streaming(StreamingOptions(**fields)).plan(target, calibration=calibration).n_whole_groups(target.shape)
        candidates = [(layer, k) for layer in target.layers for k in range(target.shape.kv_heads)]
        order = torch.randperm(len(candidates), generator=torch.Generator().manual_seed(self.options.seed)).tolist()
        return self.whole_groups(sorted(candidates[i] for i in order[:n]), target)
