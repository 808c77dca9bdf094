"""The streaming window (s, w): the first s tokens plus the last w keys, shared by the probe's streaming score
(`sink_eval.measure.probe`) and the streaming patch (`sink_eval.patches.streaming`)."""

from __future__ import annotations

from collections.abc import Iterable

from sink_eval.core.errors import SinkEvalError

Window = tuple[int, int]  # (s, w)


def check_windows(windows: Iterable[Window]) -> None:
    """Rule: each (s, w) has s >= 0 sink tokens and a window of w >= 1 keys, both ints."""
    for window in windows:
        s, w = window
        if not all(isinstance(v, int) and not isinstance(v, bool) for v in window) or s < 0 or w < 1:
            raise SinkEvalError(f"a streaming window (s, w) needs s >= 0 sink tokens and w >= 1 keys, not {window}")
