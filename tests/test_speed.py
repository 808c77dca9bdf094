"""Timing helpers: clock reads wait for the device, and paired timings report their spread."""

from __future__ import annotations

import pytest
import torch

from sink_eval import speed


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
