"""Probe a prompt set and summarise it: the `AnalysisResult` of `sink-eval analyze` (its results.json).

Summary statistics, per length bin and threshold, over the prompts with at least two tokens (a one-token prompt has
no query to average: it is counted as trivial, never as 100 % sinks):
- prevalence = mean over prompts of the fraction of (layer, head) pairs that are sink heads;
- per-layer prevalence = the same per layer;
- first-layer agreement, base rate, lift and recall (`sink_eval.measure.correlation`);
- standard errors by a seeded bootstrap over prompts (200 resamples).
"""

from __future__ import annotations

import dataclasses
import hashlib
import io
import math
import pickle
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from tqdm import tqdm

from sink_eval.core import resume
from sink_eval.core.errors import SinkEvalError
from sink_eval.core.files import write_bytes_atomically
from sink_eval.core.results import ModelInfo, Provenance, TopLevel, provenance, to_json
from sink_eval.measure.correlation import consistency, first_layer_agreement, layer_correlation, spearman
from sink_eval.measure.probe import ProbedPrompt, PromptStats, probe_prompts
from sink_eval.measure.sinks import HEAD_CLASSES, head_classes, sink_heads, threshold_for
from sink_eval.measure.stats import bootstrap_se
from sink_eval.models.load import LoadedModel
from sink_eval.prompts.prompt_set import (
    DEFAULT_MAX_TOKENS,
    LENGTH_BINS,
    Prompt,
    TokenizedPrompt,
    length_bin,
    prompt_set_sha256,
)

SCHEMA = "sink_eval.results/2"
MIN_SCORED_TOKENS = 2  # a one-token prompt has no query to average over: it is trivial
TOP_HEADS = 10


def bin_key(lo: int, hi: int) -> str:
    return f"{lo}-{hi}"


@dataclass
class TruncatedPrompt:
    id: str
    original_tokens: int  # its length before `--truncate` cut it to `max_tokens`


@dataclass
class Settings:
    thresholds: list[float]
    chance_corrected_threshold: bool
    exclude_first_query: bool
    length_bins: list[list[int]]
    prompt_set_sha256: str
    max_tokens: int
    truncated: list[TruncatedPrompt]


@dataclass
class PromptRecord:
    """One probed prompt: its (layers, heads) scores, null for a trivial one-token prompt."""

    id: str
    domain: str
    text_sha256: str
    n_tokens: int
    sink_score: list[list[float | None]]
    self_score: list[list[float | None]]
    prev_score: list[list[float | None]]


@dataclass
class GroupSummary:
    """The statistics of one length bin (`tokens` "4-9") or of all prompts pooled (`tokens` "all"); every statistic
    is None when the group has no non-trivial prompt."""

    tokens: str
    n_prompts: int
    n_trivial: int
    prevalence: float | None
    prevalence_se: float | None
    per_layer_prevalence: list[float]
    first_layer_agreement: float | None
    first_layer_agreement_se: float | None
    base_rate: float | None
    lift: float | None
    recall: float | None
    prompts_with_layer0_sink: int | None
    head_classes: dict[str, float]


@dataclass
class ConsistentHead:
    layer: int
    head: int
    consistency: float
    mean_sink_score: float


@dataclass
class ThresholdSummary:
    threshold: float
    bins: list[GroupSummary]
    all: GroupSummary
    spearman_length_vs_prevalence: float | None
    top_consistent_heads: list[ConsistentHead]

    def groups(self) -> list[GroupSummary]:
        """Each length bin, then the pooled "all"."""
        return [*self.bins, self.all]

    def group(self, tokens: str) -> GroupSummary:
        return next(g for g in self.groups() if g.tokens == tokens)


@dataclass
class AnalysisResult(TopLevel, schema=SCHEMA, command="analyze"):
    """The results.json of `sink-eval analyze`: per-prompt scores, their summary by length bin and threshold."""

    model: ModelInfo
    settings: Settings
    prompts: list[PromptRecord]
    summary: list[ThresholdSummary]
    layer_correlation: list[list[float]] | None  # between layers' sink scores, over prompts and heads
    provenance: Provenance

    def at(self, threshold: float) -> ThresholdSummary:
        return next(s for s in self.summary if s.threshold == threshold)

    @classmethod
    def from_json(cls, data: dict, source: str | Path) -> AnalysisResult:
        """Every field read and typed, then `check`ed: a file that does not add up is refused, never compared."""
        res = super().from_json(data, source)
        res.check(source)
        return res

    def check(self, source: str | Path) -> None:
        """Refuse a result that does not add up (hand-edited or damaged): `_first_problem`'s rules."""
        problem = _first_problem(self)
        if problem is not None:
            raise SinkEvalError(f"{source}: {problem}; the file was edited or damaged: re-run `sink-eval analyze`")


def _scored(items: list[ProbedPrompt]) -> list[ProbedPrompt]:
    return [p for p in items if p.stats.n_tokens >= MIN_SCORED_TOKENS]


def _sink_maps(items: list[ProbedPrompt], tau: float, chance_corrected: bool) -> torch.Tensor:
    return torch.stack(
        [sink_heads(p.stats.sink, threshold_for(tau, p.stats.n_tokens, chance_corrected)) for p in items]
    )


def _prevalence(sinks: torch.Tensor) -> float:
    return float(sinks.float().mean())


def _agreement(sinks: torch.Tensor) -> float | None:
    return first_layer_agreement(sinks).agreement


def _group_summary(
    tokens: str, items: list[ProbedPrompt], tau: float, chance_corrected: bool, standard_errors: bool = True
) -> GroupSummary:
    scored = _scored(items)
    n_prompts, n_trivial = len(items), len(items) - len(scored)
    if not scored:
        return GroupSummary(tokens, n_prompts, n_trivial, None, None, [], None, None, None, None, None, None, {})
    sinks = _sink_maps(scored, tau, chance_corrected)
    fla = first_layer_agreement(sinks)
    classes = torch.stack(
        [
            head_classes(
                p.stats.sink, p.stats.self_, p.stats.prev, threshold_for(tau, p.stats.n_tokens, chance_corrected)
            )
            for p in scored
        ]
    )
    return GroupSummary(
        tokens=tokens,
        n_prompts=n_prompts,
        n_trivial=n_trivial,
        prevalence=_prevalence(sinks),
        prevalence_se=bootstrap_se(sinks, _prevalence) if standard_errors else None,
        per_layer_prevalence=sinks.float().mean(dim=(0, 2)).tolist(),
        first_layer_agreement=fla.agreement,
        first_layer_agreement_se=(
            bootstrap_se(sinks, _agreement) if standard_errors and fla.agreement is not None else None
        ),
        base_rate=fla.base_rate,
        lift=fla.lift,
        recall=fla.recall,
        prompts_with_layer0_sink=fla.prompts_with_layer0_sink,
        head_classes={name: float((classes == i).float().mean()) for i, name in enumerate(HEAD_CLASSES)},
    )


def _top_heads(items: list[ProbedPrompt], tau: float, chance_corrected: bool) -> list[ConsistentHead]:
    scored = _scored(items)
    if not scored:
        return []
    cons = consistency(_sink_maps(scored, tau, chance_corrected))
    mean_score = torch.stack([p.stats.sink for p in scored]).mean(dim=0)
    order = sorted(
        ((layer, head) for layer in range(cons.shape[0]) for head in range(cons.shape[1])),
        key=lambda lh: (-float(cons[lh]), -float(mean_score[lh]), lh),
    )
    return [
        ConsistentHead(layer, head, float(cons[layer, head]), float(mean_score[layer, head]))
        for layer, head in order[:TOP_HEADS]
    ]


def summarize(
    probed: list[ProbedPrompt],
    thresholds: tuple[float, ...],
    chance_corrected: bool = False,
    standard_errors: bool = True,
) -> list[ThresholdSummary]:
    """The summary at each threshold: per length bin, pooled, the length correlation and the top heads (without
    `standard_errors`, every bootstrap SE is None: the rest costs a fraction of them)."""
    by_bin = {b: [p for p in probed if length_bin(p.stats.n_tokens) == b] for b in LENGTH_BINS}
    scored = _scored(probed)
    lengths = torch.tensor([float(p.stats.n_tokens) for p in scored])
    summary = []
    for tau in thresholds:
        per_prompt = [float(s.float().mean()) for s in _sink_maps(scored, tau, chance_corrected)] if scored else []
        summary.append(
            ThresholdSummary(
                threshold=tau,
                bins=[
                    _group_summary(bin_key(*b), items, tau, chance_corrected, standard_errors)
                    for b, items in by_bin.items()
                ],
                all=_group_summary("all", probed, tau, chance_corrected, standard_errors),
                spearman_length_vs_prevalence=spearman(lengths, torch.tensor(per_prompt)) if scored else None,
                top_consistent_heads=_top_heads(probed, tau, chance_corrected),
            )
        )
    return summary


def _layer_correlation(probed: list[ProbedPrompt]) -> list[list[float]] | None:
    scored = _scored(probed)
    if not scored:
        return None
    return torch.nan_to_num(layer_correlation(torch.stack([p.stats.sink for p in scored])), nan=0.0).tolist()


def _round(t: torch.Tensor) -> list:
    return [[None if v != v else round(v, 6) for v in row] for row in t.tolist()]


def _tensor(scores: list[list[float | None]]) -> torch.Tensor:
    return torch.tensor([[float("nan") if v is None else v for v in row] for row in scores])


def stored_stats(record: PromptRecord) -> PromptStats:
    """A prompt's statistics as its results record stores them (rounded to 6 digits; NaN for a trivial prompt)."""
    return PromptStats(
        record.n_tokens, _tensor(record.sink_score), _tensor(record.self_score), _tensor(record.prev_score)
    )


def stored_probed(records: list[PromptRecord]) -> list[ProbedPrompt]:
    """The prompts of results records with their stored statistics (`stored_stats`), as `summarize` takes them."""
    return [ProbedPrompt(TokenizedPrompt(Prompt(r.id, r.domain, ""), []), stored_stats(r)) for r in records]


def text_sha256(text: str) -> str:
    return hashlib.sha256(text.encode()).hexdigest()


def results(
    loaded: LoadedModel,
    probed: list[ProbedPrompt],
    thresholds: tuple[float, ...],
    chance_corrected: bool = False,
    command: str = "",
    max_tokens: int = DEFAULT_MAX_TOKENS,
) -> AnalysisResult:
    """The analysis result: model, settings (truncated prompts included), per-prompt scores, their summary (of the
    scores as stored, so that a reader can recompute it: `AnalysisResult.check`), provenance."""
    prompts = [p.prompt.prompt for p in probed]
    records = [
        PromptRecord(
            id=p.prompt.prompt.id,
            domain=p.prompt.prompt.domain,
            text_sha256=text_sha256(p.prompt.prompt.text),
            n_tokens=p.stats.n_tokens,
            sink_score=_round(p.stats.sink),
            self_score=_round(p.stats.self_),
            prev_score=_round(p.stats.prev),
        )
        for p in probed
    ]
    return AnalysisResult(
        model=loaded.info(),
        settings=Settings(
            thresholds=list(thresholds),
            chance_corrected_threshold=chance_corrected,
            exclude_first_query=True,
            length_bins=[list(b) for b in LENGTH_BINS],
            prompt_set_sha256=prompt_set_sha256(prompts),
            max_tokens=max_tokens,
            truncated=[
                TruncatedPrompt(p.prompt.prompt.id, p.prompt.truncated_from)
                for p in probed
                if p.prompt.truncated_from is not None
            ],
        ),
        prompts=records,
        summary=summarize(stored_probed(records), thresholds, chance_corrected),
        layer_correlation=_layer_correlation(probed),
        provenance=provenance(command),
    )


def restricted(res: AnalysisResult, keep: set[tuple[str, str]]) -> AnalysisResult:
    """`res` over only the prompts whose (id, text_sha256) is in `keep`, summarised again from their stored
    (rounded) scores."""
    records = [p for p in res.prompts if (p.id, p.text_sha256) in keep]
    probed = stored_probed(records)
    thresholds = tuple(res.settings.thresholds)
    return dataclasses.replace(
        res,
        prompts=records,
        summary=summarize(probed, thresholds, res.settings.chance_corrected_threshold),
        layer_correlation=_layer_correlation(probed),
    )


def _first_problem(res: AnalysisResult) -> str | None:
    """What makes a result not add up, or None. Rules: the model has layers and heads; there is a prompt, each id
    once; every score field of a prompt is model.layers x model.heads, all null on a one-token prompt and else
    numbers in [0, 1] (never NaN); the length bins are this sink_eval's; the summary has one entry per
    settings.thresholds (distinct, in (0, 1]), in order; and it is what `summarize` gives from the stored scores, up
    to float rounding (its bootstrap SEs, which cost far more to recompute, need only be null or a number >= 0)."""
    model = res.model
    if model.layers < 1 or model.heads < 1:
        return f"model.layers x model.heads is {model.layers} x {model.heads}"
    if not res.prompts:
        return "prompts is empty: a result holds every prompt it measured"
    ids = [p.id for p in res.prompts]
    if len(set(ids)) != len(ids):
        return f"prompts holds the id {next(i for i in ids if ids.count(i) > 1)!r} twice"
    for index, record in enumerate(res.prompts):
        problem = _record_problem(record, f"prompts[{index}]", model.layers, model.heads)
        if problem is not None:
            return problem
    bins = [list(b) for b in LENGTH_BINS]
    if res.settings.length_bins != bins:
        return f"settings.length_bins is {res.settings.length_bins}, not this sink_eval's {bins}"
    stored, given = [s.threshold for s in res.summary], res.settings.thresholds
    if len(stored) != len(given):
        return f"summary has {len(stored)} thresholds, settings.thresholds {len(given)}"
    if stored != given:
        i = next(i for i in range(len(given)) if stored[i] != given[i])
        return f"summary[{i}].threshold is {stored[i]}, settings.thresholds[{i}] is {given[i]}"
    if not all(0 < t <= 1 for t in stored) or len(set(stored)) != len(stored):
        return f"settings.thresholds is {stored}, not distinct thresholds in (0, 1]"
    recomputed = summarize(stored_probed(res.prompts), tuple(stored), res.settings.chance_corrected_threshold, False)
    return _difference(to_json(res.summary), to_json(recomputed), "summary")


def _record_problem(record: PromptRecord, where: str, layers: int, heads: int) -> str | None:
    if record.n_tokens < 1:
        return f"{where}.n_tokens is {record.n_tokens}"
    for name in ("sink_score", "self_score", "prev_score"):
        rows = getattr(record, name)
        if len(rows) != layers or any(len(row) != heads for row in rows):
            shape = f"{len(rows)} x {'/'.join(sorted({str(len(row)) for row in rows})) or 0}"
            return f"{where}.{name} is {shape}, not model.layers x model.heads = {layers} x {heads}"
        for layer, row in enumerate(rows):
            for head, value in enumerate(row):
                trivial = record.n_tokens < MIN_SCORED_TOKENS
                if (value is None) != trivial or (value is not None and not 0 <= value <= 1):
                    what = "null" if trivial else "a score in [0, 1]"
                    return f"{where}.{name}[{layer}][{head}] is {value}, not {what} ({record.n_tokens} tokens)"
    return None


def _difference(stored: Any, recomputed: Any, where: str) -> str | None:
    """Where the stored summary (JSON values) differs from its recomputation beyond float rounding, or None; a field
    named *_se is only checked to be null or a number >= 0."""
    if where.endswith("_se"):
        ok = stored is None or (isinstance(stored, float) and math.isfinite(stored) and stored >= 0)
        return None if ok else f"{where} is {stored}, not a standard error"
    if isinstance(recomputed, dict) and isinstance(stored, dict):
        if stored.keys() != recomputed.keys():
            return f"{where} has the keys {sorted(stored)}, not {sorted(recomputed)}"
        keys = recomputed.keys()
        return next((d for k in keys if (d := _difference(stored[k], recomputed[k], f"{where}.{k}"))), None)
    if isinstance(recomputed, list) and isinstance(stored, list):
        if len(stored) != len(recomputed):
            return f"{where} has {len(stored)} entries, the per-prompt scores give {len(recomputed)}"
        pairs = enumerate(zip(stored, recomputed, strict=True))
        return next((d for i, (a, b) in pairs if (d := _difference(a, b, f"{where}[{i}]"))), None)
    if _same(stored, recomputed):
        return None
    return f"{where} is {stored}, the per-prompt scores give {recomputed}"


def _same(a: Any, b: Any) -> bool:
    if isinstance(a, float) and isinstance(b, float):
        return (math.isnan(a) and math.isnan(b)) or math.isclose(a, b, rel_tol=1e-9, abs_tol=1e-12)
    return type(a) is type(b) and a == b


def _prompt_file(work: Path, index: int) -> Path:
    return work / f"prompt-{index:05d}.pt"


def _save(work: Path, index: int, probed: ProbedPrompt) -> None:
    stats = {f.name: getattr(probed.stats, f.name) for f in dataclasses.fields(PromptStats)}
    buffer = io.BytesIO()
    torch.save({"id": probed.prompt.prompt.id, "stats": stats}, buffer)
    write_bytes_atomically(_prompt_file(work, index), buffer.getvalue())


def _load(work: Path, index: int, tp: TokenizedPrompt) -> ProbedPrompt | None:
    """The saved probe of prompt `index`, or None if it was not probed yet or its file is damaged (it does not
    load, or holds another prompt: probed again, `resume.measure_again`)."""
    path = _prompt_file(work, index)
    if not path.exists():
        return None
    try:
        saved = torch.load(path, weights_only=True)
        if saved["id"] == tp.prompt.id:
            return ProbedPrompt(tp, PromptStats(**saved["stats"]))
    except (RuntimeError, EOFError, OSError, ValueError, KeyError, TypeError, pickle.UnpicklingError):
        pass
    resume.measure_again(path)
    return None


def probe_resumable(loaded: LoadedModel, prompts: list[TokenizedPrompt], work: Path) -> list[ProbedPrompt]:
    """`probe_prompts`, saving each prompt's statistics in the work directory `work` (`sink_eval.core.resume`) and
    reusing those saved by an earlier run."""
    out = {i: p for i, tp in enumerate(prompts) if (p := _load(work, i, tp)) is not None}
    todo = [i for i in range(len(prompts)) if i not in out]
    done = len(prompts) - len(todo)
    desc = f"probing {loaded.spec.name}"
    for i in tqdm(todo, desc=desc, unit="prompt", initial=done, total=len(prompts), file=sys.stderr):
        out[i] = probe_prompts(loaded, [prompts[i]], progress=False)[0]
        _save(work, i, out[i])
    return [out[i] for i in range(len(prompts))]
