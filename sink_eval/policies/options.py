"""Policy options, split by kind: each policy reads one of these frozen dataclasses (`Policy.Options`), whose fields
are checked as it is made and whose `label` is how results name them.

- `SinkOptions` (first_layer, oracle): the sink threshold tau, fixed or length-dependent;
- `CalibratedOptions` (calibrated): + the consistency level p;
- `HybridOptions` (hybrid): + the limited policy and its limits L and k;
- `WindowOptions` (streaming_llm): the streaming window s, w;
- `StreamingOptions` (streaming): + the score threshold p or the fraction q of KV groups;
- `RandomOptions` (random): + the seed.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from sink_eval.core.errors import SinkEvalError
from sink_eval.core.window import check_windows
from sink_eval.measure.probe import PromptStats
from sink_eval.measure.sinks import sink_heads, threshold_for
from sink_eval.patches.base import is_index

HYBRID_BASES = ("first_layer", "calibrated", "oracle")
CALIBRATION_SPANS = 4  # a streaming policy calibrates on prompts of at least 4 (s + w) tokens
MAX_SEED = 2**63 - 1  # the random policy's seed: a signed 64-bit torch generator seed


def check_unit(value: float, what: str) -> None:
    """Rule for a threshold or a fraction: in (0, 1]."""
    if not 0 < value <= 1:
        raise SinkEvalError(f"{what} is in (0, 1], not {value}")


@dataclass(frozen=True)
class SinkOptions:
    """A sink-head threshold: tau, fixed or (`chance_corrected`) length-dependent (`sink_eval.measure.sinks`)."""

    threshold: float = 0.8
    chance_corrected: bool = False

    def __post_init__(self) -> None:
        check_unit(self.threshold, "a sink threshold")

    @property
    def label(self) -> str:
        """The threshold as results name it: "tau=0.8", or "tau=0.8(N)" when length-dependent."""
        return f"tau={self.threshold:g}" + ("(N)" if self.chance_corrected else "")

    def sinks(self, stats: PromptStats) -> torch.Tensor:
        """The sink heads (layers, heads) of a prompt's statistics."""
        return sink_heads(stats.sink, threshold_for(self.threshold, stats.n_tokens, self.chance_corrected))


@dataclass(frozen=True)
class WindowOptions:
    """A streaming window: s sink tokens (`sink`) and the last w keys (`window`)."""

    sink: int = 4
    window: int = 256

    def __post_init__(self) -> None:
        check_windows([(self.sink, self.window)])

    @property
    def label(self) -> str:
        return f"({self.window_label})"

    @property
    def window_label(self) -> str:
        return f"s={self.sink}, w={self.window}"


@dataclass(frozen=True)
class CalibratedOptions(SinkOptions):
    consistency: float = 0.9  # p

    def __post_init__(self) -> None:
        super().__post_init__()
        check_unit(self.consistency, "a consistency level p")

    @property
    def label(self) -> str:
        return f"p={self.consistency:g} {super().label}"


@dataclass(frozen=True)
class HybridOptions(CalibratedOptions):
    base: str = "calibrated"  # the policy whose plan it limits
    max_tokens: int | None = None  # L
    decode_steps: int | None = None  # k

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.base not in HYBRID_BASES:
            raise SinkEvalError(f"a hybrid policy limits first_layer, calibrated or oracle, not {self.base!r}")
        if self.max_tokens is None and self.decode_steps is None:
            raise SinkEvalError("a hybrid policy needs a limit: max_tokens (L) and/or decode_steps (k)")


@dataclass(frozen=True)
class StreamingOptions(WindowOptions):
    streaming_score: float = 0.9  # p
    fraction: float | None = None  # q: the top q of the KV groups

    def __post_init__(self) -> None:
        super().__post_init__()
        check_unit(self.streaming_score, "a streaming score threshold p")
        if self.fraction is not None:
            check_unit(self.fraction, "a fraction q of the KV groups")

    @property
    def calibration_tokens(self) -> int:
        """The shortest calibration prompt counted: 4 (s + w) tokens."""
        return CALIBRATION_SPANS * (self.sink + self.window)

    @property
    def rule(self) -> str:
        """How the heads are chosen: by the threshold p, or the top fraction q of the KV groups."""
        return f"p={self.streaming_score:g}" if self.fraction is None else f"q={self.fraction:g}"

    @property
    def label(self) -> str:
        return f"{self.rule} {super().label}"


@dataclass(frozen=True)
class RandomOptions(StreamingOptions):
    seed: int = 0

    def __post_init__(self) -> None:
        """Rule: the seed is a whole number that a torch generator takes as it is, 0 <= seed <= MAX_SEED."""
        super().__post_init__()
        if not is_index(self.seed) or not 0 <= self.seed <= MAX_SEED:
            raise SinkEvalError(
                f"the random policy's seed (--seed) is a whole number from 0 to 2**63 - 1 = {MAX_SEED}, not "
                f"{self.seed!r}"
            )

    @property
    def label(self) -> str:
        rule = f"as streaming {self.rule}" if self.fraction is None else self.rule
        return f"{rule} seed={self.seed} ({self.window_label})"
