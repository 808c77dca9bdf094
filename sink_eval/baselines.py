"""Committed baselines: measured values with bands and provenance; read, write (atomically), compare, diff.

A band is measured, never chosen to make a test pass: value ± max(2 x standard error, 0.01) (the bootstrap standard
error over prompts for the analysis, lm-eval's or the paired one for accuracy). The bootstrap
(`sink_eval.analyses.analyze`) is seeded, so the same measurement gives the same band. A band is re-derived from the
stored value, standard error and band rule whenever a baseline is read: one that differs from what the rule gives, or a
value outside its metric's range ([0, 1] for a fraction or an accuracy, [-1, 1] for a change of accuracy), was edited
by hand and is refused.

A band must be able to fail on a broken model: one that includes its key's degenerate value (chance accuracy, zero
sinks, passkey 0: `Kind.degenerate`) is refused when a baseline is written, with the number of documents, trials or
prompts it would need (`undiscriminating`). A baseline is written with a checksum of its content; one whose content
no longer matches it (an edited SE, ×10 or Infinity, is as refused as an edited band) was edited by hand.

Beside the bands, a regression layer answers "did anything change?" rather than "is this the same model within
sampling error?": a baseline also stores the raw per-prompt sink scores (analysis), the per-request log-likelihoods
(eval), and the per-passage NLLs and per-trial passkey answers (longctx) of its run, and a measurement whose numbers
differ from them by more than a numerical tolerance (`SINK_SCORE_TOLERANCE`, `LOGLIK_TOLERANCE`) has changed,
whatever its bands say (`moved_prompts`, `moved_requests`, `regression_message`).
"""

from __future__ import annotations

import hashlib
import json
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar

from sink_eval.core.errors import SinkEvalError
from sink_eval.core.files import write_text_atomically
from sink_eval.core.results import ModelId, Provenance, from_json, read_json_file, with_schema, without_schema

if TYPE_CHECKING:
    from sink_eval.analyses.analyze import AnalysisResult
    from sink_eval.evals.accuracy import EvalResult
    from sink_eval.evals.longctx import LongctxResult

SE_MULTIPLE = 2.0
MIN_HALF_WIDTH = 0.01
METRICS = ("prevalence", "first_layer_agreement")

SINK_SCORE_TOLERANCE = 1e-4
"""The largest |difference| of one head's sink score (its mean attention to the first token, see
`sink_eval.measure.probe`) that is not a change: scores are stored rounded to 6 digits, and the same fp32 attention
reduced in another order (another kernel, thread count or batch shape) differs by ~1e-6, so 1e-4 leaves a margin of 100
over that noise while a real change of the model or of the attention code moves scores by far more."""

LOGLIK_TOLERANCE = 1e-3
"""The largest |difference| in nats of one request's log-likelihood (lm-eval's sum of the continuation tokens'
log-probabilities) that is not a change: logliks are stored rounded to 6 decimals, and fp32 logits summed over a few
tokens in another order or batch padding differ by ~1e-5; a change that could flip a choice moves them by far more."""


@dataclass
class Measurement:
    value: float | None  # None: undefined (e.g. no prompt of that length bin has a layer-0 sink)
    se: float | None


@dataclass
class Band:
    value: float | None
    se: float | None
    lo: float | None
    hi: float | None


def band(value: float | None, se: float | None) -> Band:
    """value ± max(SE_MULTIPLE x se, MIN_HALF_WIDTH); all None for an undefined value."""
    if value is None:
        return Band(None, None, None, None)
    half = max(SE_MULTIPLE * (se or 0.0), MIN_HALF_WIDTH)
    return Band(value, se, value - half, value + half)


@dataclass(kw_only=True)
class RunProvenance:
    """What made a baseline: the measurement's date, the command, the versions, the code and the machine
    (`core.results.Provenance`; code and machine are None in a file written before they were recorded)."""

    date: str
    command: str
    versions: dict[str, str]
    code: str | None = None
    machine: str | None = None


def _run(measured: Provenance, command: str) -> dict[str, Any]:
    """The `RunProvenance` fields of a measurement, under the command that (re)writes its baseline."""
    return {"date": measured.date, "command": command, "versions": measured.versions, "code": measured.code,
            "machine": measured.machine}  # fmt: skip


@dataclass(kw_only=True)
class AnalysisProvenance(RunProvenance):
    prompt_set_sha256: str
    n_prompts: int


@dataclass
class AnalysisBaseline:
    SCHEMA: ClassVar[str] = "sink_eval.baseline/2"
    model: ModelId
    provenance: AnalysisProvenance
    band_rule: str
    values: dict[str, Band]
    sink_scores: dict[str, list[list[float | None]]]  # prompt id -> (layers, heads), as in the results
    checksum: str | None = field(default=None, compare=False)  # `_checksum` of the rest, by `write_baseline`


@dataclass(kw_only=True)
class EvalProvenance(RunProvenance):
    settings: dict[str, Any]  # tasks, limit, splits, data_sha256, batch_size
    settings_sha256: str
    plans: dict[str, dict[str, Any]]  # label -> the static copy plan its accuracy was measured with
    wall_s: dict[str, float]


@dataclass
class EvalBaseline:
    SCHEMA: ClassVar[str] = "sink_eval.eval_baseline/3"
    model: ModelId
    provenance: EvalProvenance
    band_rule: str
    values: dict[str, Band]
    loglik: dict[str, dict[str, list[list[float]]]]  # run label -> task -> per document, per choice (`TaskScore`)
    checksum: str | None = field(default=None, compare=False)


@dataclass(kw_only=True)
class LongctxProvenance(RunProvenance):
    settings: dict[str, Any]  # lengths, depths, trials, seed, new tokens, passages and their SHA-256
    settings_sha256: str
    plans: dict[str, dict[str, Any]]  # run label -> the copy plan it was measured with
    wall_s: float


@dataclass
class PasskeyTrials:
    """A run's passkey cell at one length: its depth, whether it is informative, each trial's greedy answer and
    score (none where a plan runs no trial: an uninformative cell)."""

    depth: float
    informative: bool
    answers: list[str]
    correct: list[bool]


@dataclass
class LongctxBaseline:
    SCHEMA: ClassVar[str] = "sink_eval.longctx_baseline/2"  # /2: per-trial passkey answers, checksum
    model: ModelId
    provenance: LongctxProvenance
    band_rule: str
    values: dict[str, Band]
    passage_nll: dict[str, dict[str, list[float]]]  # run label -> length -> mean token NLL per evaluation passage
    passkey: dict[str, dict[str, list[PasskeyTrials]]]  # run label -> length -> its cells
    checksum: str | None = field(default=None, compare=False)


Baseline = AnalysisBaseline | EvalBaseline | LongctxBaseline


@dataclass(frozen=True)
class IdentityKey:
    """A field (dotted attribute path) that must be equal in a baseline and a measurement for them to compare, and
    why they do not compare when it differs: `explain(stored, measured)`."""

    field: str
    explain: Callable[[Any, Any], str]


@dataclass(frozen=True)
class Kind:
    """One kind of baseline file: its class, the suite that re-measures it, its band rule, what makes two of them
    comparable, and the range a value of each key lies in."""

    cls: type[AnalysisBaseline] | type[EvalBaseline] | type[LongctxBaseline]
    marker: str
    band_rule: str
    identity: tuple[IdentityKey, ...]
    value_range: Callable[[str], tuple[float, float]]
    degenerate: Callable[[str, Any], float | None]  # (key, baseline) -> what a broken model would measure there
    count: Callable[[str, Any], tuple[int, str]]  # (key, baseline) -> the prompts, documents or trials behind it

    @property
    def fix(self) -> str:
        return f"regenerate it from a measurement with `pytest -m {self.marker} --update-baselines`"

    @property
    def how(self) -> str:
        return (
            f"if the change is intended, re-measure with `pytest -m {self.marker} --update-baselines` and say why "
            "in the commit"
        )


def _heads(plan: dict | None) -> str:
    if not plan or not plan["heads"]:
        return "none"
    return ", ".join(f"L{layer}.H{h}" for layer, heads in plan["heads"].items() for h in heads)


def _other_weights(stored: str, measured: str) -> str:
    return f"was measured on weights {stored}, but the loaded model is {measured}: the numbers are not comparable"


def _other_prompts(stored: str, measured: str) -> str:
    return (
        f"was measured on another prompt set (sha256 {stored[:12]}, now {measured[:12]}: the committed set "
        "sink_eval/prompts/data/prompts.jsonl changed)"
    )


def _other_eval_settings(stored: str, measured: str) -> str:
    return "was measured with other tasks, data, --limit or policies"


def _other_plans(stored: dict, measured: dict) -> str:
    label = next(label for label in sorted(set(stored) | set(measured)) if stored.get(label) != measured.get(label))
    return (
        f"policy {label!r} copies other heads now ({_heads(measured.get(label))}) than when it was measured "
        f"({_heads(stored.get(label))}), so its accuracy change is not comparable: the calibration prompts' sink "
        "statistics differ from the baseline run's (the prompt set, the weights or the numerics changed)"
    )


def _analysis_range(key: str) -> tuple[float, float]:
    return (0.0, 1.0)


UNPATCHED = "unpatched"


def _eval_degenerate(key: str, baseline: EvalBaseline) -> float | None:
    """A task's chance accuracy (`evals.accuracy.TASKS`); for a policy's change against unpatched, chance minus the
    unpatched accuracy (the patch broke the model)."""
    from sink_eval.evals.accuracy import TASKS

    task, run = key.split("/", 1)
    chance = TASKS[task].chance if task in TASKS else None
    if chance is None or run == f"{UNPATCHED}/acc":
        return chance
    unpatched = baseline.values.get(f"{task}/{UNPATCHED}/acc")
    return None if unpatched is None or unpatched.value is None else chance - unpatched.value


def _eval_range(key: str) -> tuple[float, float]:
    return (-1.0, 1.0) if key.endswith("/change") else (0.0, 1.0)


ANALYSIS = Kind(
    cls=AnalysisBaseline,
    marker="analysis",
    band_rule=f"value ± max({SE_MULTIPLE:g} x bootstrap standard error over prompts, {MIN_HALF_WIDTH:g})",
    identity=(
        IdentityKey("model.fingerprint", _other_weights),
        IdentityKey("provenance.prompt_set_sha256", _other_prompts),
    ),
    value_range=_analysis_range,
    degenerate=lambda key, baseline: 0.0 if key.startswith("prevalence/") and key.endswith("/all") else None,
    count=lambda key, baseline: (baseline.provenance.n_prompts, "prompts"),
)
EVAL = Kind(
    cls=EvalBaseline,
    marker="eval",
    band_rule=(
        f"unpatched accuracy ± max({SE_MULTIPLE:g} x lm-eval stderr, {MIN_HALF_WIDTH:g}); a policy's change against "
        f"unpatched ± max({SE_MULTIPLE:g} x paired stderr, {MIN_HALF_WIDTH:g})"
    ),
    identity=(
        IdentityKey("model.fingerprint", _other_weights),
        IdentityKey("provenance.settings_sha256", _other_eval_settings),
        IdentityKey("provenance.plans", _other_plans),
    ),
    value_range=_eval_range,
    degenerate=_eval_degenerate,
    count=lambda key, baseline: (len(baseline.loglik[UNPATCHED][key.split("/", 1)[0]]), "documents"),
)


def _other_longctx_settings(stored: str, measured: str) -> str:
    return "was measured with other lengths, depths, trials, seed or passages"


def _other_longctx_plans(stored: dict, measured: dict) -> str:
    return f"was measured with other plans ({sorted(stored)} then, {sorted(measured)} now, or other heads)"


def _longctx_count(key: str, baseline: LongctxBaseline) -> tuple[int, str]:
    """The trials of the informative cells behind a passkey key ("passkey/<run>/L=<length>")."""
    label, length = key.split("/", 1)[1].rsplit("/L=", 1)
    return sum(len(cell.correct) for cell in baseline.passkey[label][length] if cell.informative), "trials"


def _longctx_range(key: str) -> tuple[float, float]:
    """passkey accuracy in [0, 1]; a perplexity is at least 1; a perplexity ratio is positive."""
    metric = key.split("/")[0]
    return {"passkey": (0.0, 1.0), "perplexity": (1.0, math.inf)}.get(metric, (0.0, math.inf))


LONGCTX = Kind(
    cls=LongctxBaseline,
    marker="longctx",
    band_rule=(
        f"passkey accuracy ± max({SE_MULTIPLE:g} x binomial stderr, {MIN_HALF_WIDTH:g}); perplexity and perplexity "
        f"ratio ± max({SE_MULTIPLE:g} x delta-method stderr over passages, {MIN_HALF_WIDTH:g})"
    ),
    identity=(
        IdentityKey("model.fingerprint", _other_weights),
        IdentityKey("provenance.settings_sha256", _other_longctx_settings),
        IdentityKey("provenance.plans", _other_longctx_plans),
    ),
    value_range=_longctx_range,
    degenerate=lambda key, baseline: 0.0 if key.startswith("passkey/") else None,
    count=_longctx_count,
)
KINDS = (ANALYSIS, EVAL, LONGCTX)


def _kind(baseline: Baseline) -> Kind:
    return next(k for k in KINDS if isinstance(baseline, k.cls))


def value_key(metric: str, threshold: float, tokens: str) -> str:
    return f"{metric}/tau={threshold:g}/{tokens}"


def measured_values(res: AnalysisResult) -> dict[str, Measurement]:
    """Every banded quantity of an analysis result, by `value_key`."""
    return {
        value_key(metric, summary.threshold, group.tokens): Measurement(
            getattr(group, metric), getattr(group, f"{metric}_se")
        )
        for summary in res.summary
        for group in summary.groups()
        for metric in METRICS
    }


def make_baseline(res: AnalysisResult, command: str) -> AnalysisBaseline:
    """The baseline of an analysis result, dated when the result was measured."""
    return AnalysisBaseline(
        model=ModelId(res.model.name, res.model.fingerprint),
        provenance=AnalysisProvenance(
            **_run(res.provenance, command),
            prompt_set_sha256=res.settings.prompt_set_sha256,
            n_prompts=len(res.prompts),
        ),
        band_rule=ANALYSIS.band_rule,
        values={k: band(m.value, m.se) for k, m in measured_values(res).items()},
        sink_scores={p.id: p.sink_score for p in res.prompts},
    )


def eval_values(res: EvalResult) -> dict[str, Measurement]:
    """Every banded quantity of an eval result: unpatched accuracy per task, each policy's change per task."""
    out = {}
    for run in res.runs:
        for task, t in run.tasks.items():
            if run.policy is None:
                out[f"{task}/unpatched/acc"] = Measurement(t.acc, t.acc_stderr)
            else:
                out[f"{task}/{run.label}/change"] = Measurement(t.change, t.change_se)
    return out


def eval_settings_sha256(res: EvalResult) -> str:
    """What an eval baseline is comparable on: tasks, limit, data file hashes and policies."""
    identity: list[Any] = [res.settings.tasks, res.settings.limit, res.settings.data_sha256]
    identity.append([[run.label, run.options] for run in res.runs])
    return hashlib.sha256(json.dumps(identity, sort_keys=True).encode()).hexdigest()


def static_plans(res: EvalResult) -> dict[str, dict]:
    """The copy plan of each static policy (calibrated, hybrid over calibrated): the heads its accuracy was measured
    with. Per-prompt policies (oracle, first_layer) have none: their plans are made per request."""
    return {run.label: run.plan for run in res.runs if run.plan is not None}


def make_eval_baseline(res: EvalResult, command: str) -> EvalBaseline:
    s = res.settings
    return EvalBaseline(
        model=ModelId(res.model.name, res.model.fingerprint),
        provenance=EvalProvenance(
            **_run(res.provenance, command),
            settings={
                "tasks": s.tasks,
                "limit": s.limit,
                "splits": s.splits,
                "data_sha256": s.data_sha256,
                "batch_size": s.batch_size,
            },
            settings_sha256=eval_settings_sha256(res),
            plans=static_plans(res),
            wall_s={run.label: run.wall_s for run in res.runs},
        ),
        band_rule=EVAL.band_rule,
        values={k: band(m.value, m.se) for k, m in eval_values(res).items()},
        loglik={run.label: {task: t.loglik for task, t in run.tasks.items()} for run in res.runs},
    )


def longctx_values(res: LongctxResult) -> dict[str, Measurement]:
    """Every banded quantity of a longctx result, per run and length: passkey accuracy (where informative), the
    unpatched perplexity, each plan's perplexity ratio."""
    out = {}
    for run in res.runs:
        for row in run.lengths:
            where = f"{run.label}/L={row.length}"
            out[f"passkey/{where}"] = Measurement(row.accuracy, row.accuracy_se)
            if row.perplexity_ratio is None:
                out[f"perplexity/{where}"] = Measurement(row.perplexity, row.perplexity_se)
            else:
                out[f"perplexity_ratio/{where}"] = Measurement(row.perplexity_ratio, row.perplexity_ratio_se)
    return out


def longctx_settings(res: LongctxResult) -> dict[str, Any]:
    s = res.settings
    return {
        "lengths": s.lengths,
        "depths": s.depths,
        "trials": s.trials,
        "seed": s.seed,
        "control_seeds": s.control_seeds,
        "new_tokens": s.new_tokens,
        "passages": s.passages,
        "passages_sha256": s.passages_sha256,
    }


def make_longctx_baseline(res: LongctxResult, command: str, wall_s: float) -> LongctxBaseline:
    settings = longctx_settings(res)
    return LongctxBaseline(
        model=ModelId(res.model.name, res.model.fingerprint),
        provenance=LongctxProvenance(
            **_run(res.provenance, command),
            settings=settings,
            settings_sha256=hashlib.sha256(json.dumps(settings, sort_keys=True).encode()).hexdigest(),
            plans={run.label: run.plan for run in res.runs if run.plan is not None},
            wall_s=round(wall_s, 1),
        ),
        band_rule=LONGCTX.band_rule,
        values={k: band(m.value, m.se) for k, m in longctx_values(res).items()},
        passage_nll={run.label: {str(row.length): row.passage_nll for row in run.lengths} for run in res.runs},
        passkey={
            run.label: {
                str(row.length): [PasskeyTrials(c.depth, c.informative, c.answers, c.correct) for c in row.passkey]
                for row in run.lengths
            }
            for run in res.runs
        },
    )


def undiscriminating(baseline: Baseline) -> list[str]:
    """The bands that include their key's degenerate value (`Kind.degenerate`: chance accuracy, zero sinks, passkey
    0), i.e. checks a broken model could pass, each with the count it would need: the SE shrinks as 1 / √n, so a
    band of SE s over n excludes a value d away from its own once n' > n (2 s / d)²; none does where the value lies
    within the band's floor (MIN_HALF_WIDTH) of the degenerate one."""
    kind = _kind(baseline)
    problems = []
    for key, stored in baseline.values.items():
        degenerate = kind.degenerate(key, baseline)
        if degenerate is None or stored.value is None or stored.lo is None or stored.hi is None:
            continue
        if not stored.lo <= degenerate <= stored.hi:
            continue
        n, unit = kind.count(key, baseline)
        gap = abs(stored.value - degenerate)
        where = (
            f"{key}: band [{stored.lo:.3f}, {stored.hi:.3f}] includes {degenerate:.3f}, what a broken model measures"
        )
        if gap <= MIN_HALF_WIDTH or not stored.se:
            problems.append(f"{where}, and its value lies at it: no number of {unit} makes it a check; leave it out")
        else:
            needed = math.floor(n * (SE_MULTIPLE * stored.se / gap) ** 2) + 1
            problems.append(f"{where}; it needs {needed} {unit} or more (it has {n})")
    return problems


def _check_bands(baseline: Baseline, path: Path, kind: Kind) -> None:
    """Refuse a band that is not what the stored rule gives for the stored value and standard error."""
    if baseline.band_rule != kind.band_rule:
        raise SinkEvalError(
            f"baseline {path}: band_rule is {baseline.band_rule!r}, this sink_eval derives bands by "
            f"{kind.band_rule!r}; {kind.fix}"
        )
    for key, stored in baseline.values.items():
        lowest, highest = kind.value_range(key)
        if stored.value is not None and not lowest <= stored.value <= highest:
            raise SinkEvalError(
                f"baseline {path}: values[{key!r}].value {stored.value} lies outside [{lowest:g}, {highest:g}]: "
                f"edited by hand; {kind.fix}"
            )
        if stored.se is not None and not stored.se >= 0:
            raise SinkEvalError(
                f"baseline {path}: values[{key!r}].se {stored.se} is negative: edited by hand; {kind.fix}"
            )
        derived = band(stored.value, stored.se)
        same = [
            a == b if a is None or b is None else math.isclose(a, b, rel_tol=1e-12, abs_tol=1e-12)
            for a, b in ((derived.lo, stored.lo), (derived.hi, stored.hi))
        ]
        if not all(same):
            raise SinkEvalError(
                f"baseline {path}: values[{key!r}] has the band [{stored.lo}, {stored.hi}], but its rule gives "
                f"[{derived.lo}, {derived.hi}] for value {stored.value} and se {stored.se}: edited by hand; {kind.fix}"
            )


def read_baseline(path: Path, kind: Kind = ANALYSIS) -> Baseline:
    """A baseline file, every field checked, every band re-derived and the checksum of its content matched; every
    problem says how to make a good one."""
    data = read_json_file(Path(path), kind.cls.SCHEMA, kind.fix)
    try:
        baseline: Baseline = from_json(kind.cls, without_schema(data, kind.cls.SCHEMA, path), path)
    except SinkEvalError as err:
        raise SinkEvalError(f"{err}; {kind.fix}") from err
    _check_bands(baseline, Path(path), kind)
    if baseline.checksum is None:
        raise SinkEvalError(f"baseline {path} has no checksum (it predates them); {kind.fix}")
    if baseline.checksum != _checksum(data):
        raise SinkEvalError(
            f"baseline {path}: its content does not match its checksum: a value, SE or band was edited by hand; "
            f"{kind.fix}"
        )
    return baseline


def _checksum(data: dict[str, Any]) -> str:
    """SHA-256 of a baseline's JSON object without its checksum (keys sorted, numbers as JSON writes them)."""
    content = {key: value for key, value in data.items() if key != "checksum"}
    return hashlib.sha256(json.dumps(content, sort_keys=True).encode()).hexdigest()


def read_eval_baseline(path: Path) -> EvalBaseline:
    baseline = read_baseline(path, EVAL)
    assert isinstance(baseline, EvalBaseline), "EVAL reads EvalBaseline files"
    return baseline


def _field(obj: Any, dotted: str) -> Any:
    for name in dotted.split("."):
        obj = getattr(obj, name)
    return obj


def check_weights(stored: Baseline, fingerprint: str, path: Path) -> None:
    """Refuse a stored baseline measured on other weights than those of `fingerprint` (the loaded model's): what
    `check_comparable` says first, said before anything is measured."""
    if stored.model.fingerprint != fingerprint:
        raise SinkEvalError(
            f"baseline {path} {_other_weights(stored.model.fingerprint, fingerprint)}; {_kind(stored).how}"
        )


def check_comparable(measured: Baseline, stored: Baseline, path: Path, identity: tuple[IdentityKey, ...]) -> None:
    """Refuse to compare a measurement (as a baseline: `make_baseline`, `make_eval_baseline`) with a stored baseline
    that differs in any of the `identity` fields (e.g. other weights, another prompt set)."""
    for key in identity:
        before, now = _field(stored, key.field), _field(measured, key.field)
        if before != now:
            raise SinkEvalError(f"baseline {path} {key.explain(before, now)}; {_kind(stored).how}")


def outside_band(measured: Measurement, expected: Band) -> str | None:
    """Why a measured value lies outside the expected band, or None when it is inside."""
    value, lo, hi = measured.value, expected.lo, expected.hi
    if expected.value is None or value is None:
        if (expected.value is None) != (value is None):
            return f"expected {expected.value}, measured {value} (one of them is undefined)"
        return None
    assert lo is not None and hi is not None, "a band with a value has bounds (`band`)"
    if not lo <= value <= hi:
        return f"measured {value:.4f}, outside the band [{lo:.4f}, {hi:.4f}] around {expected.value:.4f}"
    return None


@dataclass(frozen=True)
class Moved:
    """A prompt or request whose numbers differ from the baseline run's by more than the tolerance: `where` (the
    prompt and the head of its largest |difference|, or the request), that |difference| (`delta`; inf where a number
    is undefined or absent on one side only), and the stored and measured numbers there."""

    where: str
    delta: float
    stored: float | None
    measured: float | None

    def describe(self) -> str:
        if self.stored is None and self.measured is None:
            return self.where

        def fmt(v: float | None) -> str:
            return "undefined" if v is None else f"{v:.6f}"

        return f"{self.where}: {fmt(self.stored)} -> {fmt(self.measured)} (|Δ| {self.delta:.2g})"


Table = list[list[float | None]]
Rows = Sequence[Sequence[float | None]]  # a Table, or per-document log-likelihoods


def _shape(rows: Rows | None) -> list[int] | None:
    return None if rows is None else [len(row) for row in rows]


def _shape_text(rows: Rows | None) -> str:
    return "absent" if rows is None else f"{len(rows)} rows, {sum(map(len, rows))} numbers"


def _delta(stored: float | None, measured: float | None) -> float:
    if stored is None or measured is None:
        return 0.0 if stored is measured else math.inf
    return abs(stored - measured)


def _other_shape(name: str, stored: Rows | None, measured: Rows | None) -> Moved | None:
    if _shape(stored) == _shape(measured):
        return None
    return Moved(f"{name}: {_shape_text(stored)} in the baseline, {_shape_text(measured)} now", math.inf, None, None)


def moved_prompts(
    measured: dict[str, Table], stored: dict[str, Table], tolerance: float = SINK_SCORE_TOLERANCE
) -> list[Moved]:
    """The prompts (id -> (layers, heads) sink scores) whose max |measured - stored| over heads exceeds `tolerance`,
    largest first, each at its head of largest difference."""
    moved = []
    for prompt in [*stored, *(p for p in measured if p not in stored)]:
        before, now = stored.get(prompt), measured.get(prompt)
        if (other := _other_shape(f"prompt {prompt}", before, now)) is not None:
            moved.append(other)
            continue
        assert before is not None and now is not None, "equal shapes, and at least one of them exists"
        cells = [(layer, head) for layer, row in enumerate(before) for head in range(len(row))]
        delta, layer, head = max(((_delta(before[i][j], now[i][j]), i, j) for i, j in cells), default=(0.0, 0, 0))
        if delta > tolerance:
            moved.append(Moved(f"prompt {prompt} at L{layer}.H{head}", delta, before[layer][head], now[layer][head]))
    return sorted(moved, key=lambda m: -m.delta)


def moved_requests(
    measured: dict[str, list[list[float]]], stored: dict[str, list[list[float]]], tolerance: float = LOGLIK_TOLERANCE
) -> list[Moved]:
    """The requests (task -> per document, per choice log-likelihood) whose |measured - stored| exceeds `tolerance`,
    largest first."""
    moved = []
    for task in [*stored, *(t for t in measured if t not in stored)]:
        before, now = stored.get(task), measured.get(task)
        if (other := _other_shape(task, before, now)) is not None:
            moved.append(other)
            continue
        assert before is not None and now is not None, "equal shapes, and at least one of them exists"
        for doc, (row_before, row_now) in enumerate(zip(before, now, strict=True)):
            for choice, (b, n) in enumerate(zip(row_before, row_now, strict=True)):
                if abs(b - n) > tolerance:
                    moved.append(Moved(f"{task} doc {doc} choice {choice}", abs(b - n), b, n))
    return sorted(moved, key=lambda m: -m.delta)


def _versions(then: dict[str, str], now: dict[str, str]) -> str:
    changed = [
        f"{name} {then.get(name, 'absent')} -> {now.get(name, 'absent')}"
        for name in sorted(set(then) | set(now))
        if then.get(name) != now.get(name)
    ]
    if changed:
        return f"versions changed since the baseline run: {', '.join(changed)}"
    same = ", ".join(f"{name} {v}" for name, v in sorted(now.items()))
    return f"the same versions as the baseline run ({same}): the code, the hardware or the thread count changed"


def regression_message(
    kind: Kind,
    what: str,
    moved: list[Moved],
    tolerance: float,
    then: dict[str, str],
    now: dict[str, str],
    first: int = 5,
) -> str:
    """What moved since the baseline run (the `first` largest), the versions then and now, and what to do."""
    lines = [f"{what}: {len(moved)} moved by more than {tolerance:g} since the baseline run; the largest:"]
    lines += [f"  {m.describe()}" for m in moved[:first]]
    if len(moved) > first:
        lines.append(f"  ... and {len(moved) - first} more")
    lines += [_versions(then, now), kind.how]
    return "\n".join(lines)


def _json_text(value: Any, indent: str = "") -> str:
    """JSON indented one space a level, except that a list of numbers (a row of scores) stays on one line."""
    inner = indent + " "
    if isinstance(value, dict) and value:
        items = [f"{inner}{json.dumps(k)}: {_json_text(v, inner)}" for k, v in value.items()]
        return "{\n" + ",\n".join(items) + "\n" + indent + "}"
    if isinstance(value, list) and any(isinstance(v, list | dict) for v in value):
        return "[\n" + ",\n".join(inner + _json_text(v, inner) for v in value) + "\n" + indent + "]"
    return json.dumps(value)


def check_discriminates(baseline: Baseline, path: Path) -> None:
    """Refuse to make `baseline` the one at `path` where a band could not fail on a broken model (`undiscriminating`),
    naming the count each would need."""
    problems = undiscriminating(baseline)
    if problems:
        raise SinkEvalError(f"refused to write baseline {path}: " + "; ".join(problems))


def write_baseline(path: Path, baseline: Baseline) -> None:
    """Write a baseline, atomically, with the checksum of its content."""
    data = with_schema(baseline.SCHEMA, baseline)
    data["checksum"] = _checksum(data)
    write_text_atomically(Path(path), _json_text(data) + "\n")


def diff(old: Baseline | None, new: Baseline) -> str:
    """What changed between two baselines, one line a value."""
    if old is None:
        return f"new baseline with {len(new.values)} values"

    def fmt(v: float | None) -> str:
        return "undefined" if v is None else f"{v:.4f}"

    lines = []
    for key, entry in new.values.items():
        before = old.values[key].value if key in old.values else None
        if before != entry.value:
            lines.append(f"{key}: {fmt(before)} -> {fmt(entry.value)}")
    return "\n".join(lines) or "no value changed"
