"""Timing helpers: clock reads wait for the device, and paired timings report their spread."""

from __future__ import annotations

import pytest
import torch

from sink_eval.evals import speed


def test_clock_synchronises_a_cuda_device_before_reading_the_time(monkeypatch):
    calls = []
    monkeypatch.setattr(torch.cuda, "synchronize", lambda device=None: calls.append(device))
    device = torch.device("cuda", 0)
    speed.clock(device)
    assert calls == [device]


def test_clock_does_not_synchronise_on_the_cpu(monkeypatch):
    monkeypatch.setattr(torch.cuda, "synchronize", lambda device=None: pytest.fail("synchronised a CPU clock read"))
    assert speed.clock(torch.device("cpu")) > 0


def test_paired_timings_synchronise_around_every_timed_call(monkeypatch):
    events = []
    monkeypatch.setattr(speed, "synchronize", lambda device: events.append("sync"))
    speed.paired(lambda: events.append("unpatched"), {"v": lambda: events.append("v")}, rounds=1, warmup=False)
    assert events == ["sync", "unpatched", "sync", "sync", "v", "sync"]


def test_paired_speedup_is_the_median_ratio_with_its_quartiles_and_iqr():
    times = iter([4.0, 2.0, 4.0, 1.0, 4.0, 4.0, 4.0, 2.0, 4.0, 1.0])  # ratios 2, 4, 1, 2, 4
    result = speed.paired(lambda: next(times), {"v": lambda: next(times)}, rounds=5, warmup=False)["v"]
    assert result.ratios == [2.0, 4.0, 1.0, 2.0, 4.0]
    assert result.speedup == 2.0
    assert result.lower_quartile == 2.0 and result.iqr == 2.0


def test_the_growth_free_cache_preallocates_only_full_attention_layers_and_fills_in_place():
    from transformers.cache_utils import DynamicSlidingWindowLayer, StaticLayer

    from sink_eval.models.load import load_model

    model = load_model("tiny-gemma3").model
    cache = speed.growth_free_cache(model, 40)
    kinds = [type(layer) for layer in cache.layers]
    assert kinds == [
        DynamicSlidingWindowLayer if kind == "sliding_attention" else StaticLayer for kind in model.config.layer_types
    ]
    with torch.no_grad():
        model(input_ids=torch.ones(1, 32, dtype=torch.long), cache=cache)
        model(input_ids=torch.ones(1, 1, dtype=torch.long), cache=cache)
    full = kinds.index(StaticLayer)
    assert cache.layers[full].keys.shape[-2] == 40 and cache.get_seq_length(full) == 33


def test_the_ceiling_adds_the_growth_a_plan_stops_to_the_attention_it_removes():
    assert speed.ceiling(0.5, 0.4) == pytest.approx(1 / 0.8)
    assert speed.ceiling(0.5, 0.4, growth_fraction=0.25, growth_share=0.4) == pytest.approx(1 / 0.7)
    without, static = speed.Paired(1.25, 1.0, 0.8, [1.25]), speed.Paired(2.0, 1.0, 0.5, [2.0])
    assert speed.attention_share(without) == pytest.approx(0.2)
    assert speed.growth_share(without, static) == pytest.approx(0.3)
    assert speed.growth_share(static, without) == 0.0  # noise never makes a negative share


def test_the_step_clock_reads_the_time_after_each_forward_of_a_generate_call_and_before_the_next():
    from helpers import random_model
    from transformers import DynamicCache, LogitsProcessorList

    from sink_eval.patches.base import greedy

    model = random_model("llama", kv_heads=2, groups=2, head_dim=8, window=8)
    ends: list[float] = []
    model.register_forward_hook(lambda module, args, output: ends.append(speed.time.perf_counter()))
    ids = torch.randint(1, 64, (1, 12), generator=torch.Generator().manual_seed(0))
    clock = speed.StepClock(torch.device("cpu"))
    with torch.no_grad():
        greedy(model, ids, torch.ones_like(ids), DynamicCache(config=model.config), 5, LogitsProcessorList([clock]))
    assert len(ends) == len(clock.times) == 5
    assert clock.start < ends[0]
    for k, read in enumerate(clock.times):
        assert ends[k] <= read and (k == 4 or read <= ends[k + 1])
    assert clock.prefill_seconds() == clock.times[0] - clock.start
    assert clock.decode_seconds() == clock.times[4] - clock.times[0] > 0


@pytest.mark.parametrize(
    "speedup, ceiling, passes",
    [
        (0.97, 1.04, True),  # little to save: only no loss is asked
        (0.96, 1.04, False),
        (1.03, 1.20, False),  # more to save: 80 % of it, 1 - 1/s >= 0.8 (1 - 1/1.2), s >= 1.154
        (1.16, 1.20, True),
    ],
)
def test_a_deployed_plan_loses_no_time_below_a_small_ceiling_and_saves_80_percent_above(speedup, ceiling, passes):
    assert speed.deployable(speedup, ceiling) is passes
