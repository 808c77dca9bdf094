"""The cross-model scale report (`sink-eval scale`): several `sink-eval analyze` results side by side, and the
original research notes' claims, each with a verdict per model.

Inputs: the results.json (`sink_eval.results/2`) of two or more models, measured on one prompt set with the same
thresholds and length bins, each model once (`read_inputs`). Every prompt id then names the same text in every
input, so prompts are paired across models by id.

Definitions (a prompt is non-trivial when it has at least two tokens; a prompt's sink map at threshold tau is the
(layers, heads) booleans "sink score >= tau", read from its stored per-prompt scores (`analysis.stored_stats`);
per-prompt prevalence = the fraction of its heads that are sinks):
- prevalence by length bin, ± SE; first-layer agreement, base rate and lift; per-layer prevalence: each result's
  own summary, as stored (`sink_eval.analyses.analyze`), never recomputed.
- relative depth of layer l = l / n_layers (0 for the first layer).
- consistency of head (l, h) = the fraction of the non-trivial prompts on which it is a sink
  (`correlation.consistency`); a head is consistent when its consistency is >= CONSISTENT (0.9).
- SE: the standard deviation over BOOTSTRAP_RESAMPLES (200) seeded resamples of prompts with replacement
  (`measure.stats.bootstrap_se`); the length-matched domain statistics resample within each (domain, length bin) cell.
- the 2-SE rule (`two_se_verdict`), and each claim's verdict rule: the docstrings of `size_verdict`,
  `middle_verdict`, `consistent_verdict`, `short_long_verdict` and `predictability_verdict`, quoted in the report
  (`sink_eval.reports.scale`).
- length matching of domains: `length_matched`.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch

from sink_eval.analyses.analyze import (
    MIN_SCORED_TOKENS,
    AnalysisResult,
    ConsistentHead,
    PromptRecord,
    Settings,
    ThresholdSummary,
    bin_key,
    stored_stats,
)
from sink_eval.core.errors import SinkEvalError
from sink_eval.core.files import sha256_files
from sink_eval.core.results import Provenance, TopLevel, provenance, results_file
from sink_eval.measure.correlation import consistency, spearman
from sink_eval.measure.sinks import sink_heads, threshold_for
from sink_eval.measure.stats import BOOTSTRAP_RESAMPLES, bootstrap_se
from sink_eval.prompts.prompt_set import length_bin

SCHEMA = (
    "sink_eval.scale/2"  # /2: stricter verdict rules (leave-one-domain-out, peak layer, robust heads, both figures)
)
CLAIM_THRESHOLD = 0.8  # the original notes' tau: every claim is tested at it
CONSISTENT = 0.9  # a head sinks on at least this fraction of prompts
TOP_HEADS = 10  # predictability: mean consistency of this many most consistent heads
SHORT_BIN = "1-3"  # the notes' "short prompts"
LONG_MIN_TOKENS = 10  # the notes' "10+ tokens"
NOTES_SHORT = (0.66, 0.76)  # the notes' ~71 % for short prompts
NOTES_LONG = (0.30, 0.36)  # the notes' 30-36 % for 10+ tokens
REFERENCE_DOMAIN = "prose"
LENGTH_BIN_DOMAINS = ("short",)  # a prompt-set "domain" that is a length bin (1-3-word openings), not a domain
MIN_CELL_PROMPTS = 2  # a (domain, bin) cell enters the length matching with at least this many non-trivial prompts
FIGURE = "per_layer_prevalence.png"  # the one figure of the report (`sink_eval.reports.scale`)

SUPPORTED, CONTRADICTED, NOT_DISTINGUISHABLE, UNDEFINED = (
    "supported",
    "contradicted",
    "not distinguishable",
    "undefined",
)
NOT_SUPPORTED = "not supported"
REPRODUCED, SHORT_ONLY, LONG_ONLY, NOT_REPRODUCED = "reproduced", "short only", "10+ only", "not reproduced"
ROBUST_SHARE = 0.975  # (c): the share of bootstrap resamples that must keep a consistent head


@dataclass(frozen=True)
class ModelSize:
    family: str
    params: int


MODEL_SIZES = {
    "smollm2-135m": ModelSize("smollm2", 135_000_000),
    "gemma3-270m": ModelSize("gemma3", 270_000_000),
    "qwen2.5-coder-0.5b": ModelSize("qwen2.5-coder", 494_000_000),
    "qwen2.5-coder-1.5b": ModelSize("qwen2.5-coder", 1_540_000_000),
}


@dataclass
class Difference:
    """A difference of two statistics (first minus second) and its bootstrap SE; None where undefined."""

    value: float | None
    se: float | None


@dataclass
class BinPrevalence:
    tokens: str
    n_prompts: int
    n_trivial: int
    prevalence: float | None
    prevalence_se: float | None


@dataclass
class BinAgreement:
    tokens: str
    first_layer_agreement: float | None
    first_layer_agreement_se: float | None
    base_rate: float | None
    lift: float | None
    prompts_with_layer0_sink: int | None


@dataclass
class ThresholdStats:
    """One model at one threshold: the summary's prevalence by bin ("all" last), per-layer prevalence of all
    prompts against relative depth, its first-layer agreement by bin, and every consistent head."""

    threshold: float
    bins: list[BinPrevalence]
    relative_depth: list[float]
    per_layer_prevalence: list[float]
    agreement: list[BinAgreement]
    consistent_heads: list[ConsistentHead]

    def group(self, tokens: str) -> BinPrevalence:
        return next(g for g in self.bins if g.tokens == tokens)


@dataclass
class LeftOut:
    """A size difference recomputed without one domain's prompts."""

    domain: str
    n_prompts: int  # the prompts left in
    difference: Difference


@dataclass
class SizePair:
    """Two models of one family, on the prompts non-trivial in both: pooled prevalence of each and the smaller's
    minus the larger's, on all of them and with each domain left out in turn."""

    family: str
    smaller: str
    larger: str
    n_prompts: int
    smaller_prevalence: float | None
    larger_prevalence: float | None
    difference: Difference
    left_out: list[LeftOut]
    verdict: str


@dataclass
class SizeAcross:
    """The models in MODEL_SIZES by parameter count, their pooled prevalence, and Spearman's rho of the two."""

    models: list[str]
    params: list[int]
    prevalence: list[float | None]
    spearman: float | None
    not_sized: list[str]


@dataclass
class SizeClaim:
    threshold: float
    within_family: list[SizePair]
    across_families: SizeAcross


@dataclass
class MiddleClaim:
    """Mean prevalence of the first, middle and last third of layers (`layer_thirds`) over all non-trivial prompts,
    the middle's differences from the other two, and the layer of highest prevalence."""

    threshold: float
    first: float | None
    middle: float | None
    last: float | None
    middle_minus_first: Difference
    middle_minus_last: Difference
    verdict: str
    max_layer: int | None
    max_relative_depth: float | None
    max_prevalence: float | None
    max_third: int | None  # the third (`layer_thirds`) of the layer of highest prevalence


@dataclass
class ConsistentClaim:
    """The heads of consistency >= CONSISTENT, their number's bootstrap SE over prompts, and the share of the
    bootstrap resamples in which at least one head is consistent."""

    threshold: float
    n_consistent: int
    n_consistent_se: float | None
    robust_share: float | None
    n_heads: int
    verdict: str


@dataclass
class ShortLongClaim:
    """Prevalence of the SHORT_BIN length bin (the summary's) and of the prompts of LONG_MIN_TOKENS or more tokens
    pooled (mean of per-prompt prevalence), and short minus long with SE sqrt(SE_short^2 + SE_long^2) (disjoint
    prompts)."""

    threshold: float
    short_tokens: str
    short_n: int
    short: float | None
    short_se: float | None
    long_min_tokens: int
    long_n: int
    long: float | None
    long_se: float | None
    difference: Difference
    verdict: str


@dataclass
class DomainCell:
    """One (domain, length bin) cell: its prompts (non-trivial, and trivial beside) and their prevalence."""

    domain: str
    tokens: str
    n_prompts: int
    n_trivial: int
    prevalence: float | None


@dataclass
class DomainValue:
    """A domain's length-matched statistics (`length_matched`) over the shared bins."""

    domain: str
    n_prompts: int
    prevalence: float | None
    prevalence_se: float | None
    n_consistent: int | None
    n_consistent_se: float | None
    top_consistency: float | None
    top_consistency_se: float | None


@dataclass
class DomainContrast:
    """A domain minus the reference domain, length-matched: differences of prevalence, top consistency and the
    number of consistent heads; `verdict` by top consistency, `n_consistent_verdict` by the count (both
    `predictability_verdict`)."""

    domain: str
    reference: str
    prevalence: Difference
    top_consistency: Difference
    n_consistent: Difference
    verdict: str
    n_consistent_verdict: str


@dataclass
class DomainThreshold:
    threshold: float
    cells: list[DomainCell]
    shared_bins: list[str]
    bin_weights: list[float]
    domains: list[DomainValue]
    contrasts: list[DomainContrast]


@dataclass
class ModelScale:
    name: str
    fingerprint: str
    layers: int
    heads: int
    family: str | None
    params: int | None
    source: str
    results_sha256: str
    thresholds: list[ThresholdStats]
    middle: MiddleClaim
    consistent: ConsistentClaim
    short_long: ShortLongClaim
    domains: list[DomainThreshold]

    def at(self, threshold: float) -> ThresholdStats:
        return next(t for t in self.thresholds if t.threshold == threshold)


@dataclass
class ScaleSettings:
    prompt_set_sha256: str
    n_prompts: int
    thresholds: list[float]
    chance_corrected_threshold: bool
    length_bins: list[list[int]]
    claim_threshold: float
    consistent_at: float
    top_heads: int
    reference_domain: str
    length_bin_domains: list[str]
    min_cell_prompts: int
    bootstrap_resamples: int


@dataclass
class ScaleResult(TopLevel, schema=SCHEMA, command="scale"):
    """The results.json of `sink-eval scale`: several models' analyses side by side, the notes' claims with verdicts."""

    settings: ScaleSettings
    models: list[ModelScale]
    size: SizeClaim
    provenance: Provenance


@dataclass
class ScaleInput:
    dir: Path
    result: AnalysisResult
    results_sha256: str


# ---- inputs


def read_inputs(dirs: Sequence[Path]) -> list[ScaleInput]:
    """Each directory's results.json, read and checked: at least two, each model once, one prompt set, the same
    thresholds and length bins, and CLAIM_THRESHOLD among them."""
    if len(dirs) < 2:
        raise SinkEvalError(
            f"scale compares models: give at least two `sink-eval analyze` output directories, not {len(dirs)}"
        )
    inputs = []
    for d in dirs:
        inputs.append(ScaleInput(Path(d), AnalysisResult.read(d), sha256_files([results_file(d)])))
    for other in inputs[1:]:
        _check_comparable(inputs[0], other)
    _check_distinct_models(inputs)
    if CLAIM_THRESHOLD not in inputs[0].result.settings.thresholds:
        raise SinkEvalError(
            f"the claims are tested at tau = {CLAIM_THRESHOLD}, which {inputs[0].dir} was not measured at "
            f"(thresholds {inputs[0].result.settings.thresholds}); re-run `sink-eval analyze` with the default "
            "thresholds"
        )
    return inputs


def _check_comparable(first: ScaleInput, other: ScaleInput) -> None:
    a, b = first.result.settings, other.result.settings
    if a.prompt_set_sha256 != b.prompt_set_sha256:
        raise SinkEvalError(
            f"{first.dir} and {other.dir} were measured on different prompt sets (sha256 "
            f"{a.prompt_set_sha256[:12]} vs {b.prompt_set_sha256[:12]}); re-run `sink-eval analyze` of every model "
            "on the same --prompts"
        )
    if (a.thresholds, a.chance_corrected_threshold) != (b.thresholds, b.chance_corrected_threshold):
        raise SinkEvalError(
            f"{first.dir} and {other.dir} have different thresholds ({_thresholds(a)} vs {_thresholds(b)}); re-run "
            "`sink-eval analyze` of every model with the same --threshold and --chance-corrected options"
        )
    if a.length_bins != b.length_bins:
        raise SinkEvalError(
            f"{first.dir} and {other.dir} have different length bins; re-run `sink-eval analyze` of both with this "
            "version of sink_eval"
        )


def _thresholds(settings: Settings) -> str:
    return f"{settings.thresholds}{' chance-corrected' if settings.chance_corrected_threshold else ''}"


def _check_distinct_models(inputs: list[ScaleInput]) -> None:
    seen: dict[str, Path] = {}
    for given in inputs:
        name = given.result.model.name
        if name in seen:
            raise SinkEvalError(
                f"{seen[name]} and {given.dir} are both of model {name!r}; give each model's directory once"
            )
        seen[name] = given.dir


# ---- per-prompt sink maps and the 2-SE rule


@dataclass
class SinkMaps:
    """The non-trivial prompts of one result and their (prompts, layers, heads) boolean sink maps at one
    threshold, from the stored per-prompt scores."""

    records: list[PromptRecord]
    sinks: torch.Tensor

    def per_prompt(self) -> torch.Tensor:
        """(prompts,) per-prompt prevalence."""
        return self.sinks.float().mean(dim=(1, 2))


def sink_maps(res: AnalysisResult, tau: float) -> SinkMaps:
    records = [r for r in res.prompts if r.n_tokens >= MIN_SCORED_TOKENS]
    corrected = res.settings.chance_corrected_threshold
    maps = [sink_heads(stored_stats(r).sink, threshold_for(tau, r.n_tokens, corrected)) for r in records]
    empty = torch.zeros((0, res.model.layers, res.model.heads), dtype=torch.bool)
    return SinkMaps(records, torch.stack(maps) if maps else empty)


def two_se_verdict(diff: Difference) -> str:
    """The 2-SE rule: "supported" if the difference exceeds 2 SE, "contradicted" if it is below -2 SE, "not
    distinguishable" otherwise; "undefined" without a difference or an SE."""
    if diff.value is None or diff.se is None:
        return UNDEFINED
    if diff.value > 2 * diff.se:
        return SUPPORTED
    if diff.value < -2 * diff.se:
        return CONTRADICTED
    return NOT_DISTINGUISHABLE


def _bootstrapped(values: torch.Tensor, statistic: Callable[[torch.Tensor], float | None]) -> Difference:
    return Difference(statistic(values), bootstrap_se(values, statistic))


# ---- (a) larger models have fewer sink heads


def size_verdict(pair: Difference, left_out: list[Difference]) -> str:
    """(a) "larger models have fewer sink heads", within one family: d = pooled prevalence of the smaller model minus
    that of the larger, over the prompts non-trivial in both, paired by prompt id; SE by bootstrap over those
    prompts (a resampled prompt brings both models' values). Supported if d > 2 SE and, with the prompts of any one
    domain left out (where there are two domains or more), d still exceeds 2 SE of its own (no single domain carries
    the gap); contradicted if likewise
    d < -2 SE throughout; else not distinguishable. A verdict is about the pair of models it compares: with one pair
    in a family it says nothing about size in general. Across families only Spearman's rho of parameter count vs
    pooled prevalence is given: it confounds size with family (architecture, tokenizer, training data), so it gets no
    verdict."""
    verdicts = {two_se_verdict(pair), *(two_se_verdict(d) for d in left_out)}
    if UNDEFINED in verdicts:
        return UNDEFINED
    return verdicts.pop() if len(verdicts) == 1 and verdicts != {NOT_DISTINGUISHABLE} else NOT_DISTINGUISHABLE


def size_pair(family: str, small: tuple[str, SinkMaps], large: tuple[str, SinkMaps]) -> SizePair:
    large_index = {r.id: i for i, r in enumerate(large[1].records)}
    pairs = [(i, large_index[r.id]) for i, r in enumerate(small[1].records) if r.id in large_index]
    if not pairs:
        undefined = Difference(None, None)
        return SizePair(family, small[0], large[0], 0, None, None, undefined, [], UNDEFINED)
    both = torch.stack(
        [small[1].per_prompt()[[i for i, _ in pairs]], large[1].per_prompt()[[j for _, j in pairs]]], dim=1
    )

    def gap(rows: torch.Tensor) -> Difference:
        return _bootstrapped(rows, lambda x: float(x[:, 0].mean() - x[:, 1].mean()))

    domains = [small[1].records[i].domain for i, _ in pairs]
    left_out = []
    for domain in sorted(set(domains)) if len(set(domains)) > 1 else []:
        kept = [k for k, d in enumerate(domains) if d != domain]
        left_out.append(LeftOut(domain, len(kept), gap(both[kept])))
    diff = gap(both)
    means = both.mean(dim=0).tolist()
    verdict = size_verdict(diff, [lo.difference for lo in left_out])
    return SizePair(family, small[0], large[0], len(pairs), means[0], means[1], diff, left_out, verdict)


def size_claim(inputs: list[ScaleInput], tau: float) -> SizeClaim:
    sized = sorted((i for i in inputs if i.result.model.name in MODEL_SIZES), key=_params)
    families: dict[str, list[ScaleInput]] = {}
    for given in sized:
        families.setdefault(MODEL_SIZES[given.result.model.name].family, []).append(given)
    within = [
        size_pair(family, _named_maps(small, tau), _named_maps(large, tau))
        for family, members in families.items()
        for small, large in zip(members, members[1:], strict=False)
    ]
    prevalence = [i.result.at(tau).all.prevalence for i in sized]
    defined = [(float(_params(i)), p) for i, p in zip(sized, prevalence, strict=True) if p is not None]
    rho = spearman(torch.tensor([s for s, _ in defined]), torch.tensor([p for _, p in defined])) if defined else None
    across = SizeAcross(
        models=[i.result.model.name for i in sized],
        params=[_params(i) for i in sized],
        prevalence=prevalence,
        spearman=rho,
        not_sized=[i.result.model.name for i in inputs if i.result.model.name not in MODEL_SIZES],
    )
    return SizeClaim(tau, within, across)


def _params(given: ScaleInput) -> int:
    return MODEL_SIZES[given.result.model.name].params


def _named_maps(given: ScaleInput, tau: float) -> tuple[str, SinkMaps]:
    return given.result.model.name, sink_maps(given.result, tau)


# ---- (b) middle layers hold the most sinks


def layer_thirds(layers: int) -> list[int]:
    """The third each layer belongs to by relative depth: floor(3 l / n_layers) (0 first, 1 middle, 2 last)."""
    return [3 * layer // layers for layer in range(layers)]


def _third_mean(sinks: torch.Tensor, third: int) -> float:
    """Prevalence over the prompts and the heads of the layers in `third`."""
    layers = [layer for layer, t in enumerate(layer_thirds(sinks.shape[1])) if t == third]
    return float(sinks[:, layers, :].float().mean())


def middle_verdict(middle_minus_first: Difference, middle_minus_last: Difference, max_third: int | None) -> str:
    """(b) "middle layers hold the most sinks": the layers are cut in thirds by relative depth (`layer_thirds`); the
    middle third's prevalence (over non-trivial prompts and the heads of its layers) minus the first third's, and
    minus the last third's, each with a bootstrap SE over prompts; and the third of the single layer of highest
    prevalence. Supported if both differences exceed 2 SE and that layer lies in the middle third; contradicted if
    either difference is below -2 SE (a third holds more sinks than the middle) and that layer lies outside the middle
    third; else not distinguishable (the thirds and the peak layer disagree, or the differences are within 2 SE);
    undefined with fewer than 3 layers or 2 prompts."""
    verdicts = {two_se_verdict(middle_minus_first), two_se_verdict(middle_minus_last)}
    if UNDEFINED in verdicts or max_third is None:
        return UNDEFINED
    if CONTRADICTED in verdicts and max_third != 1:
        return CONTRADICTED
    return SUPPORTED if verdicts == {SUPPORTED} and max_third == 1 else NOT_DISTINGUISHABLE


def middle_claim(res: AnalysisResult, maps: SinkMaps, tau: float) -> MiddleClaim:
    per_layer = res.at(tau).all.per_layer_prevalence
    top = max(range(len(per_layer)), key=lambda layer: per_layer[layer]) if per_layer else None
    if len(maps.records) == 0 or res.model.layers < 3:
        undefined = Difference(None, None)
        return MiddleClaim(tau, None, None, None, undefined, undefined, UNDEFINED, top, None, None, None)

    def minus(third: int) -> Difference:
        return _bootstrapped(maps.sinks, lambda s: _third_mean(s, 1) - _third_mean(s, third))

    first, last = minus(0), minus(2)
    max_third = None if top is None else layer_thirds(res.model.layers)[top]
    return MiddleClaim(
        threshold=tau,
        first=_third_mean(maps.sinks, 0),
        middle=_third_mean(maps.sinks, 1),
        last=_third_mean(maps.sinks, 2),
        middle_minus_first=first,
        middle_minus_last=last,
        verdict=middle_verdict(first, last, max_third),
        max_layer=top,
        max_relative_depth=None if top is None else top / res.model.layers,
        max_prevalence=None if top is None else per_layer[top],
        max_third=max_third,
    )


# ---- (c) some heads are consistently sinks


def consistent_heads(maps: SinkMaps) -> list[ConsistentHead]:
    """The heads of consistency >= CONSISTENT, most consistent first (ties: higher mean sink score, then order).
    Compared in float32, as the calibrated policy does, so that 9 prompts of 10 count as 0.9."""
    if len(maps.records) == 0:
        return []
    cons = consistency(maps.sinks)
    mean_score = torch.stack([stored_stats(r).sink for r in maps.records]).mean(dim=0)
    chosen = sorted(
        ((int(layer), int(head)) for layer, head in (cons >= CONSISTENT).nonzero()),
        key=lambda lh: (-float(cons[lh]), -float(mean_score[lh]), lh),
    )
    return [
        ConsistentHead(layer, head, float(cons[layer, head]), float(mean_score[layer, head])) for layer, head in chosen
    ]


def consistent_verdict(n_consistent: int, robust_share: float | None) -> str:
    """(c) "some heads are consistently sinks": supported if at least one head is a sink on >= 90 % of the
    non-trivial prompts at tau = 0.8 (consistency >= 0.9) and at least one head still is in >= 97.5 % of the
    bootstrap resamples of those prompts (200, seeded: a consistent head that one prompt more or less would unmake
    does not count); else not supported."""
    return (
        SUPPORTED if n_consistent >= 1 and robust_share is not None and robust_share >= ROBUST_SHARE else NOT_SUPPORTED
    )


def consistent_claim(maps: SinkMaps, n_heads: int, tau: float) -> ConsistentClaim:
    n = len(consistent_heads(maps))
    if len(maps.records) < 2:
        return ConsistentClaim(tau, n, None, None, n_heads, consistent_verdict(n, None))

    def count(sinks: torch.Tensor) -> float:
        return float((consistency(sinks) >= CONSISTENT).sum())

    se = bootstrap_se(maps.sinks, count)
    gen = torch.Generator().manual_seed(0)
    kept = [
        count(maps.sinks[torch.randint(len(maps.sinks), (len(maps.sinks),), generator=gen)]) >= 1
        for _ in range(BOOTSTRAP_RESAMPLES)
    ]
    share = sum(kept) / len(kept)
    return ConsistentClaim(tau, n, se, share, n_heads, consistent_verdict(n, share))


# ---- (d) short prompts ~71 %, 10+ tokens ~30-36 %


def _overlaps(value: float, se: float, band: tuple[float, float]) -> bool:
    return value - 2 * se <= band[1] and value + 2 * se >= band[0]


def short_long_verdict(claim: ShortLongClaim) -> str:
    """(d) "short prompts ~71 %, 10+ tokens ~30-36 %" at tau = 0.8: short = the summary's prevalence of the 1-3-token
    bin (non-trivial prompts: 2-3 tokens, since a one-token prompt has no score); long = the mean per-prompt
    prevalence of all prompts of 10 or more tokens, pooled. Each figure is judged on its own: short ± 2 SE overlaps
    [0.66, 0.76]; long ± 2 SE overlaps [0.30, 0.36]. Reproduced if both do; "short only" or "10+ only" if one does;
    else not reproduced; undefined without both values and SEs. Short minus long (SE sqrt(SE_short^2 +
    SE_long^2)) is reported beside it: a direction, which reproduces neither figure."""
    if claim.short is None or claim.short_se is None or claim.long is None or claim.long_se is None:
        return UNDEFINED
    short = _overlaps(claim.short, claim.short_se, NOTES_SHORT)
    long = _overlaps(claim.long, claim.long_se, NOTES_LONG)
    return {(True, True): REPRODUCED, (True, False): SHORT_ONLY, (False, True): LONG_ONLY}.get(
        (short, long), NOT_REPRODUCED
    )


def _difference_of_independent(a: float | None, a_se: float | None, b: float | None, b_se: float | None) -> Difference:
    """a - b with SE sqrt(SE_a^2 + SE_b^2), for statistics of disjoint prompt sets."""
    if a is None or a_se is None or b is None or b_se is None:
        return Difference(None, None)
    return Difference(a - b, math.hypot(a_se, b_se))


def short_long_claim(res: AnalysisResult, maps: SinkMaps, tau: float) -> ShortLongClaim:
    short = res.at(tau).group(SHORT_BIN)
    long = maps.per_prompt()[[r.n_tokens >= LONG_MIN_TOKENS for r in maps.records]]
    long_value = float(long.mean()) if len(long) else None
    long_se = bootstrap_se(long, lambda x: float(x.mean()))
    claim = ShortLongClaim(
        threshold=tau,
        short_tokens=SHORT_BIN,
        short_n=short.n_prompts - short.n_trivial,
        short=short.prevalence,
        short_se=short.prevalence_se,
        long_min_tokens=LONG_MIN_TOKENS,
        long_n=len(long),
        long=long_value,
        long_se=long_se,
        difference=_difference_of_independent(short.prevalence, short.prevalence_se, long_value, long_se),
        verdict=UNDEFINED,
    )
    claim.verdict = short_long_verdict(claim)
    return claim


# ---- domains, length-matched

Cells = dict[tuple[str, str], torch.Tensor]  # (domain, bin) -> (prompts, layers, heads) sink maps


def compared_domains(res: AnalysisResult) -> list[str]:
    """The result's domains but LENGTH_BIN_DOMAINS, the reference domain first."""
    domains = sorted({r.domain for r in res.prompts} - set(LENGTH_BIN_DOMAINS))
    return sorted(domains, key=lambda d: d != REFERENCE_DOMAIN)


def _bin_of(res: AnalysisResult, n_tokens: int) -> str | None:
    found = length_bin(n_tokens, tuple((lo, hi) for lo, hi in res.settings.length_bins))
    return bin_key(*found) if found else None


def domain_cells(res: AnalysisResult, maps: SinkMaps) -> list[DomainCell]:
    """Every (domain, bin) cell that holds a prompt, LENGTH_BIN_DOMAINS included, with its n and prevalence."""
    per_prompt = maps.per_prompt()
    cells = []
    for domain in sorted({r.domain for r in res.prompts}):
        for lo, hi in res.settings.length_bins:
            tokens = bin_key(lo, hi)
            records = [r for r in res.prompts if r.domain == domain and _bin_of(res, r.n_tokens) == tokens]
            scored = [
                i for i, r in enumerate(maps.records) if r.domain == domain and _bin_of(res, r.n_tokens) == tokens
            ]
            if records:
                prevalence = float(per_prompt[scored].mean()) if scored else None
                cells.append(DomainCell(domain, tokens, len(scored), len(records) - len(scored), prevalence))
    return cells


def shared_bins(cells: list[DomainCell], domains: list[str], order: list[str]) -> tuple[list[str], list[float]]:
    """The length bins (in `order`) in which every compared domain has >= MIN_CELL_PROMPTS non-trivial prompts, and
    their weights: each bin's share of the compared domains' prompts in those bins."""
    if not domains:
        return [], []
    counts = {(c.domain, c.tokens): c.n_prompts for c in cells}
    bins = [b for b in order if all(counts.get((d, b), 0) >= MIN_CELL_PROMPTS for d in domains)]
    totals = [sum(counts[d, b] for d in domains) for b in bins]
    return bins, [t / sum(totals) for t in totals]


def top_consistency(cons: torch.Tensor) -> float:
    """Top consistency, a predictability measure: the mean consistency of the TOP_HEADS (10) most consistent
    heads."""
    return float(cons.flatten().topk(min(TOP_HEADS, cons.numel())).values.mean())


def length_matched(cells: Cells, domain: str, bins: list[str], weights: list[float]) -> tuple[float, torch.Tensor]:
    """A domain's prevalence and (layers, heads) consistency, length-matched: the weighted mean over the shared
    bins of its within-bin values (a within-bin prevalence: the mean of its prompts' per-prompt prevalence; a
    within-bin consistency: the fraction of its prompts there on which the head is a sink), with the weights of
    `shared_bins`, the same for every domain, so that every domain is read at one length distribution."""
    prevalence = sum(w * float(cells[domain, b].float().mean()) for b, w in zip(bins, weights, strict=True))
    cons = sum(w * consistency(cells[domain, b]) for b, w in zip(bins, weights, strict=True))
    return float(prevalence), torch.as_tensor(cons)


DOMAIN_STATISTICS = ("prevalence", "top", "consistent")


def _domain_statistics(cells: Cells, domains: list[str], bins: list[str], weights: list[float]) -> dict[str, float]:
    """Length-matched prevalence, top consistency and number of consistent heads of each domain, and each one's
    difference from the first domain's."""
    out: dict[str, float] = {}
    for domain in domains:
        prevalence, cons = length_matched(cells, domain, bins, weights)
        out[f"prevalence/{domain}"], out[f"top/{domain}"] = prevalence, top_consistency(cons)
        out[f"consistent/{domain}"] = float((cons >= CONSISTENT).sum())
    for domain in domains[1:]:
        for stat in DOMAIN_STATISTICS:
            out[f"{stat}-diff/{domain}"] = out[f"{stat}/{domain}"] - out[f"{stat}/{domains[0]}"]
    return out


def stratified_se(cells: Cells, statistics: Callable[[Cells], dict[str, float]]) -> dict[str, float]:
    """SE of each statistic: the standard deviation over BOOTSTRAP_RESAMPLES seeded resamples, each cell's prompts
    resampled with replacement within the cell (so every cell keeps its n)."""
    gen = torch.Generator().manual_seed(0)
    draws = []
    for _ in range(BOOTSTRAP_RESAMPLES):
        resampled = {k: v[torch.randint(len(v), (len(v),), generator=gen)] for k, v in cells.items()}
        draws.append(statistics(resampled))
    return {key: float(torch.tensor([d[key] for d in draws]).std()) for key in draws[0]}


def predictability_verdict(diff: Difference) -> str:
    """Domains: "do specialised prompts (code, qa, arithmetic) make sink heads more predictable than prose?", per
    model, domain and threshold, by two measures of a domain's predictability: the mean length-matched consistency
    of its 10 most consistent heads, and the number of heads whose length-matched consistency is >= 0.9
    (`length_matched`: the within-bin consistencies averaged over the length bins in which every compared domain has
    at least 2 non-trivial prompts, each bin weighted by its share of those prompts). d = the domain's measure minus
    prose's, SE by a bootstrap over prompts within each (domain, bin) cell. Supported (more predictable) if d > 2 SE,
    contradicted (less predictable) if d < -2 SE, else not distinguishable; undefined without shared bins or without
    prose. Both measures read the upper tail of the consistencies over heads: with few prompts a cell's
    consistencies are coarse and that tail is biased upwards, alike for domains of equal n (n per cell is in the
    report). When ten heads are sinks on every prompt of every shared cell of both domains, the top-10 mean is at
    its 100 % ceiling and cannot tell them apart: the count still can. The count falls with prevalence (a domain with
    fewer sinks has fewer heads that can be consistent): read it beside the prevalence difference."""
    return two_se_verdict(diff)


def domain_threshold(res: AnalysisResult, maps: SinkMaps, tau: float) -> DomainThreshold:
    cells = domain_cells(res, maps)
    domains = compared_domains(res)
    bins, weights = shared_bins(cells, domains, [bin_key(lo, hi) for lo, hi in res.settings.length_bins])
    if not bins or not domains:
        return DomainThreshold(tau, cells, bins, weights, [], [])
    tensors: Cells = {
        (d, b): maps.sinks[[i for i, r in enumerate(maps.records) if r.domain == d and _bin_of(res, r.n_tokens) == b]]
        for d in domains
        for b in bins
    }
    statistics = lambda c: _domain_statistics(c, domains, bins, weights)  # noqa: E731
    values, se = statistics(tensors), stratified_se(tensors, statistics)
    return DomainThreshold(
        threshold=tau,
        cells=cells,
        shared_bins=bins,
        bin_weights=weights,
        domains=[_domain_value(d, tensors, values, se) for d in domains],
        contrasts=[_contrast(d, domains[0], values, se) for d in domains[1:] if domains[0] == REFERENCE_DOMAIN],
    )


def _domain_value(domain: str, cells: Cells, values: dict[str, float], se: dict[str, float]) -> DomainValue:
    return DomainValue(
        domain=domain,
        n_prompts=sum(len(maps) for (d, _), maps in cells.items() if d == domain),
        prevalence=values[f"prevalence/{domain}"],
        prevalence_se=se[f"prevalence/{domain}"],
        n_consistent=int(values[f"consistent/{domain}"]),
        n_consistent_se=se[f"consistent/{domain}"],
        top_consistency=values[f"top/{domain}"],
        top_consistency_se=se[f"top/{domain}"],
    )


def _contrast(domain: str, reference: str, values: dict[str, float], se: dict[str, float]) -> DomainContrast:
    prevalence, top, count = (
        Difference(values[f"{stat}-diff/{domain}"], se[f"{stat}-diff/{domain}"]) for stat in DOMAIN_STATISTICS
    )
    return DomainContrast(
        domain, reference, prevalence, top, count, predictability_verdict(top), predictability_verdict(count)
    )


# ---- one model, all models


def threshold_stats(res: AnalysisResult, summary: ThresholdSummary, maps: SinkMaps) -> ThresholdStats:
    return ThresholdStats(
        threshold=summary.threshold,
        bins=[
            BinPrevalence(g.tokens, g.n_prompts, g.n_trivial, g.prevalence, g.prevalence_se) for g in summary.groups()
        ],
        relative_depth=[layer / res.model.layers for layer in range(res.model.layers)],
        per_layer_prevalence=summary.all.per_layer_prevalence,
        agreement=[
            BinAgreement(
                g.tokens,
                g.first_layer_agreement,
                g.first_layer_agreement_se,
                g.base_rate,
                g.lift,
                g.prompts_with_layer0_sink,
            )
            for g in summary.groups()
        ],
        consistent_heads=consistent_heads(maps),
    )


def model_scale(given: ScaleInput) -> ModelScale:
    res = given.result
    maps = {tau: sink_maps(res, tau) for tau in res.settings.thresholds}
    size = MODEL_SIZES.get(res.model.name)
    claim_maps = maps[CLAIM_THRESHOLD]
    return ModelScale(
        name=res.model.name,
        fingerprint=res.model.fingerprint,
        layers=res.model.layers,
        heads=res.model.heads,
        family=size.family if size else None,
        params=size.params if size else None,
        source=str(given.dir),
        results_sha256=given.results_sha256,
        thresholds=[threshold_stats(res, s, maps[s.threshold]) for s in res.summary],
        middle=middle_claim(res, claim_maps, CLAIM_THRESHOLD),
        consistent=consistent_claim(claim_maps, res.model.layers * res.model.heads, CLAIM_THRESHOLD),
        short_long=short_long_claim(res, claim_maps, CLAIM_THRESHOLD),
        domains=[domain_threshold(res, maps[tau], tau) for tau in res.settings.thresholds],
    )


def scale(inputs: list[ScaleInput], command: str = "") -> ScaleResult:
    """The scale result of inputs that `read_inputs` checked."""
    settings = inputs[0].result.settings
    return ScaleResult(
        settings=ScaleSettings(
            prompt_set_sha256=settings.prompt_set_sha256,
            n_prompts=len(inputs[0].result.prompts),
            thresholds=settings.thresholds,
            chance_corrected_threshold=settings.chance_corrected_threshold,
            length_bins=settings.length_bins,
            claim_threshold=CLAIM_THRESHOLD,
            consistent_at=CONSISTENT,
            top_heads=TOP_HEADS,
            reference_domain=REFERENCE_DOMAIN,
            length_bin_domains=list(LENGTH_BIN_DOMAINS),
            min_cell_prompts=MIN_CELL_PROMPTS,
            bootstrap_resamples=BOOTSTRAP_RESAMPLES,
        ),
        models=[model_scale(i) for i in inputs],
        size=size_claim(inputs, CLAIM_THRESHOLD),
        provenance=provenance(command),
    )
