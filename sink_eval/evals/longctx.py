"""`sink-eval longctx`: long-context fidelity of each plan against the unpatched model and against random controls.

Metrics, per run (the unpatched model, a policy's plan, or one seed of its random control) and length L:
- **passkey accuracy** of an (L, d) cell = fraction of its trials (`sink_eval.prompts.passkey`) answered correctly, ±
  the binomial SE √(p (1 − p) / n). A cell where the *unpatched* model's accuracy is below `INFORMATIVE_FLOOR` is
  *uninformative*: the unpatched model's accuracy there is reported, but no plan is run on its trials (a plan's
  answers there would measure nothing the comparison uses; where no cell at L is informative, a plan runs the first
  `TIMING_TRIALS` trials of the deepest cell for its speed-ups alone), and a run's accuracy at L pools only the
  trials of informative cells (None where no cell is informative);
- **perplexity** at L = exp(mean over the evaluation long passages of their mean token NLL over the first L tokens),
  each passage scored in one forward pass (`sink_eval.measure.perplexity`); **perplexity ratio** = ppl(run) /
  ppl(unpatched) = exp(mean ΔNLL); SEs by the delta method: ppl × SE over passages of their mean NLL, ratio × SE over
  passages of the per-passage ΔNLL;
- **fraction of heads** / **of KV groups** the plan changes / whose decode cache it shrinks; **KV bytes saved** =
  the unpatched cache's bytes minus the plan's, both measured from the cache objects after a passkey trial of L
  tokens and its `NEW_TOKENS` new tokens (a prefill and NEW_TOKENS − 1 decode steps);
- **passkey speed-up** = Σ unpatched / Σ run wall seconds of the passkey generate calls (prefill + decode) at L,
  over the same trials (those the plan ran: see above), each run's calls after one
  untimed warm-up call (`warm_up`): an end-to-end timing on a machine that may be shared, not a kernel benchmark;
  **prefill** and **decode speed-up** = the same ratio of the calls' prefill seconds (to the end of the prompt's
  forward pass) and decode seconds (the NEW_TOKENS − 1 decode forwards after it), read by `speed.StepClock`.

Controls (`sink_eval.policies.controls`): every policy's plan gets `seeds` random plans of the same size from the same
candidate layers; the verdict per length says whether the policy beats them by more than their spread.

Order: length-major (the unpatched model at L, then every other run at L, then the next length). Resumable
(`sink_eval.core.resume`): with a work directory, each (run, length) measurement is saved as it finishes and reused by a
rerun with the same model, plans and settings, except at a length the interrupted run left part-measured: that
length is measured again whole, so that each length's speed-ups compare timings of one process (a resumed run may
be on another machine).
"""

from __future__ import annotations

import math
import sys
from collections.abc import Sequence
from contextlib import AbstractContextManager, nullcontext
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from tqdm import tqdm
from transformers import DynamicCache, LogitsProcessorList

from sink_eval.core import resume
from sink_eval.core.errors import SinkEvalError
from sink_eval.core.results import ModelInfo, Provenance, TopLevel, provenance, to_json
from sink_eval.core.shape import model_shape
from sink_eval.evals.speed import StepClock
from sink_eval.evals.speed import clock as speed_clock
from sink_eval.measure.perplexity import token_nll
from sink_eval.models.load import LoadedModel
from sink_eval.patches.base import Plan, greedy, kv_cache_bytes
from sink_eval.patches.streaming.plan import StreamingPlan
from sink_eval.policies import calibration
from sink_eval.policies.base import Policy
from sink_eval.policies.controls import Verdict, plans_every_candidate, random_control, verdict
from sink_eval.prompts.passkey import NEW_TOKENS, evaluation_passages, is_correct, make_trial, min_length
from sink_eval.prompts.prompt_set import LONG_TOKENS, model_context, prompt_set_sha256

SCHEMA = "sink_eval.longctx/2"  # /2: a plan runs no trial in an uninformative cell
INFORMATIVE_FLOOR = 0.5
TIMING_TRIALS = 3  # a plan's trials at a length with no informative cell, timed for the speed-ups only
UNPATCHED = "unpatched"


@dataclass(frozen=True)
class NamedPlan:
    """A plan to evaluate: its label, the policy that chose it, and the plan (None: the unpatched model)."""

    label: str
    policy: str | None
    plan: Plan | None


@dataclass
class PasskeyCell:
    depth: float
    keys: list[str]
    answers: list[str]  # the decoded greedy continuations
    correct: list[bool]
    accuracy: float | None  # None: a plan's uninformative cell, where no trial is run
    se: float | None
    informative: bool  # the unpatched model's accuracy here is >= INFORMATIVE_FLOOR


@dataclass
class LengthRow:
    length: int
    passkey: list[PasskeyCell]
    accuracy: float | None  # pooled over the informative cells
    accuracy_se: float | None
    passage_nll: list[float]  # mean token NLL of each evaluation passage's first `length` tokens
    perplexity: float
    perplexity_se: float  # ppl x SE over passages of their mean NLL (delta method)
    perplexity_ratio: float | None  # None for the unpatched run
    perplexity_ratio_se: float | None
    kv_bytes: int
    kv_saved_bytes: int
    passkey_seconds: float  # Σ over the trials this run ran (a plan: `_plan_trials`)
    speedup: float | None  # None for the unpatched run
    prefill_speedup: float | None
    decode_speedup: float | None


@dataclass
class Run:
    label: str
    role: str  # "unpatched", "policy" or "control"
    policy: str | None
    control_of: str | None  # a control: the label of the policy run it controls
    seed: int | None  # a control's seed
    plan: dict[str, Any] | None
    fraction_heads: float
    kv_groups: int
    fraction_kv_groups: float
    lengths: list[LengthRow]


@dataclass
class Comparison:
    """A policy against its controls at one length: passkey accuracy (higher is better) and the negated perplexity
    ratio (lower ratio is better; stored negated so that the one rule of `controls.verdict` applies)."""

    label: str
    length: int
    passkey: Verdict | None  # None where no cell is informative
    neg_perplexity_ratio: Verdict


@dataclass
class ReproductionRow:
    label: str
    sink: int | None  # None: full attention
    window: int | None
    passage_nll: list[float]
    perplexity: float
    perplexity_se: float


@dataclass
class StreamingLLMReproduction:
    """StreamingLLM's comparison on our models: every head of every full-attention layer restricted to a window of
    `cache` keys (s = 0), to 4 sinks + a window of cache − 4, or full attention, by one-pass perplexity at `length`
    tokens of the evaluation long passages. Keys keep their original positions (RoPE is applied before the band),
    where StreamingLLM re-numbers positions inside its rolling cache: the window's relative distances are the same,
    the sinks' are not."""

    length: int
    cache: int
    paper: str
    rows: list[ReproductionRow]


@dataclass
class LongctxSettings:
    lengths: list[int]
    depths: list[float]
    trials: int
    seed: int
    control_seeds: list[int]
    new_tokens: int
    warm_up: bool  # one untimed generate call per run and length before the timed ones
    informative_floor: float
    timing_trials: int  # TIMING_TRIALS, at most `trials`
    passages: list[str]
    passages_sha256: str
    threads: int
    device: str


@dataclass
class LongctxResult(TopLevel, schema=SCHEMA, command="longctx"):
    """The results.json of `sink-eval longctx`: each run per length, and the policies' verdicts against controls."""

    model: ModelInfo
    settings: LongctxSettings
    runs: list[Run]
    comparisons: list[Comparison]
    streaming_llm: StreamingLLMReproduction | None
    provenance: Provenance

    def run(self, label: str) -> Run:
        return next(r for r in self.runs if r.label == label)


def check_lengths(loaded: LoadedModel, lengths: Sequence[int]) -> None:
    """Rule: every L fits the model's context, leaves a haystack token beside the needle and question, and is at most
    the shortest evaluation passage (perplexity scores one passage's first L tokens)."""
    context = model_context(loaded.model)
    shortest = min(len(loaded.tokenizer(p.text)["input_ids"]) for p in evaluation_passages())
    lowest = min_length(loaded.tokenizer)
    for length in lengths:
        if context is not None and length > context:
            raise SinkEvalError(f"--lengths {length} exceeds {loaded.spec.name}'s context of {context} tokens")
        if length < lowest:
            raise SinkEvalError(f"--lengths {length} leaves no haystack; the shortest passkey prompt is {lowest}")
        if length > shortest:
            raise SinkEvalError(
                f"--lengths {length} exceeds the shortest evaluation long passage ({shortest} tokens with this "
                "tokenizer), whose first L tokens the perplexity scores"
            )


STREAMING_LLM_CACHE = 1024
STREAMING_LLM_SINKS = 4
PAPER = "Llama-2-13B on PG19 (Xiao et al. 2023, cache 1024): window only 5158.07, 4 sinks + 1020 window 5.40"


@torch.no_grad()
def streaming_llm_reproduction(
    loaded: LoadedModel, length: int, cache: int = STREAMING_LLM_CACHE, progress: bool = True
) -> StreamingLLMReproduction:
    """The three perplexities of `StreamingLLMReproduction` at `length` tokens; `length` > `cache`."""
    if length <= cache:
        raise SinkEvalError(f"the StreamingLLM reproduction needs more than its cache of {cache} tokens, not {length}")
    model, tokenizer = loaded.model, loaded.tokenizer
    heads = range(model_shape(model).heads)
    every = {layer: heads for layer in StreamingPlan.candidate_layers(model)}
    variants: list[tuple[str, int | None, int | None]] = [
        (f"window only (s=0, w={cache})", 0, cache),
        (
            f"{STREAMING_LLM_SINKS} sinks + window (s={STREAMING_LLM_SINKS}, w={cache - STREAMING_LLM_SINKS})",
            STREAMING_LLM_SINKS,
            cache - STREAMING_LLM_SINKS,
        ),
        ("full attention", None, None),
    ]
    device = next(model.parameters()).device
    passages = [torch.tensor([tokenizer(p.text)["input_ids"][:length]], device=device) for p in evaluation_passages()]
    rows = []
    bar = tqdm(total=len(variants) * len(passages), desc="StreamingLLM", disable=not progress, file=sys.stderr)
    for label, sink, window in variants:
        plan = None if sink is None or window is None else StreamingPlan.of(every, sink, window)
        nll = []
        for ids in passages:
            with _under(model, plan):
                nll.append(float(token_nll(model, ids).mean()))
            bar.update()
        t = torch.tensor(nll)
        ppl = math.exp(float(t.mean()))
        rows.append(ReproductionRow(label, sink, window, nll, ppl, ppl * float(t.std()) / math.sqrt(len(t))))
    bar.close()
    return StreamingLLMReproduction(length, cache, PAPER, rows)


def check_static(policies: Sequence[Policy]) -> None:
    """Rule: long-context runs use static plans (one plan for every trial), whose controls are well defined; a
    per-prompt policy would need a probe pass of every trial and give each its own plan."""
    for policy in policies:
        if policy.per_prompt:
            raise SinkEvalError(f"longctx evaluates static plans, not the per-prompt policy {policy.label!r}")


def policy_plans(
    loaded: LoadedModel, policies: Sequence[Policy], long_tokens: int = LONG_TOKENS, progress: bool = True
) -> list[NamedPlan]:
    """Each policy's plan, calibrated on the calibration half of the default prompt set (prompts longer than the
    model's context cut to it) and, for a long-input policy, also on the long calibration passages cut to
    `long_tokens` (`policies.calibration.static_plans`, as `patch-eval` calibrates them); never on the evaluation
    long passages."""
    check_static(policies)
    plans = calibration.static_plans(loaded, policies, long_tokens, progress)
    return [NamedPlan(p.label, p.name, plan) for p, plan in zip(policies, plans, strict=True)]


def control_plans(loaded: LoadedModel, policy: NamedPlan, seeds: Sequence[int]) -> list[NamedPlan]:
    """The random controls of a policy's plan (`sink_eval.policies.controls`), one per seed, with its settings."""
    plan = policy.plan
    assert plan is not None, "the unpatched model has no control"
    return [
        NamedPlan(f"random({policy.label}) seed={seed}", policy.policy, random_control(plan, loaded.model, seed))
        for seed in seeds
    ]


def _under(model: torch.nn.Module, plan: Plan | None) -> AbstractContextManager[None]:
    """Run `model` under `plan` inside the block (None: unchanged)."""
    return nullcontext() if plan is None else plan.patched(model)


@torch.no_grad()
def _generate(
    model: torch.nn.Module,
    plan: Plan | None,
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor,
    new_tokens: int,
    clock: StepClock | None = None,
) -> tuple[torch.Tensor, int]:
    """Greedy generation of exactly `new_tokens` tokens after input_ids (B, N) with the plan's own KV cache: (the new
    ids (B, new_tokens), the KV bytes its cache holds at the end). None: the model's own `DynamicCache`. `clock`
    times its steps."""
    processors = None if clock is None else LogitsProcessorList([clock])
    if plan is not None:
        ids, cache = plan.generate(model, input_ids, attention_mask, new_tokens, processors)
        return ids[:, input_ids.shape[1] :], kv_cache_bytes(cache)
    cache = DynamicCache(config=model.config)
    ids = greedy(model, input_ids, attention_mask, cache, new_tokens, processors)
    return ids[:, input_ids.shape[1] :], kv_cache_bytes(cache)


def _se(p: float, n: int) -> float:
    return math.sqrt(p * (1 - p) / n)


@dataclass
class _Trials:
    """The passkey trials of one (L, d) cell of one run (none: a plan's uninformative cell)."""

    depth: float
    keys: list[str]
    answers: list[str]
    correct: list[bool]
    seconds: list[float]  # wall seconds of each trial's generate call
    prefill_seconds: list[float]  # of each call, to the end of the prompt's forward pass
    decode_seconds: list[float]  # of each call, its NEW_TOKENS - 1 decode forwards


@dataclass
class _Measured:
    """One run at one length, before the unpatched reference is known."""

    label: str  # the run's
    cells: list[_Trials]
    nll: list[float]
    kv_bytes: int  # held by the cache after a trial's generate call of L + NEW_TOKENS tokens (the same for every trial)


def _measure(
    loaded: LoadedModel, entry: NamedPlan, length: int, settings: LongctxSettings, counts: list[int], bar
) -> _Measured:
    """The run's first counts[i] trials of each cell i, then its perplexity."""
    model, tokenizer, plan = loaded.model, loaded.tokenizer, entry.plan
    device = next(model.parameters()).device
    cells, kv_bytes = [], 0
    if settings.warm_up:
        first = make_trial(tokenizer, settings.seed, 0, length, settings.depths[0])
        ids = torch.tensor([first.input_ids], device=device)
        _generate(model, plan, ids, torch.ones_like(ids), settings.new_tokens)  # untimed
    for depth, count in zip(settings.depths, counts, strict=True):
        cell = _Trials(depth, [], [], [], [], [], [])
        for trial in range(count):
            t = make_trial(tokenizer, settings.seed, trial, length, depth)
            ids = torch.tensor([t.input_ids], device=device)
            clock = StepClock(device)
            new, kv_bytes = _generate(model, plan, ids, torch.ones_like(ids), settings.new_tokens, clock)
            cell.seconds.append(speed_clock(device) - clock.start)
            cell.prefill_seconds.append(clock.prefill_seconds())
            cell.decode_seconds.append(clock.decode_seconds())
            answer = tokenizer.decode(new[0], skip_special_tokens=True)
            cell.keys.append(t.key)
            cell.answers.append(answer)
            cell.correct.append(is_correct(t.key, answer))
            bar.update()
        cells.append(cell)
    nll = []
    for passage in evaluation_passages():
        ids = torch.tensor([tokenizer(passage.text)["input_ids"][:length]], device=device)
        with _under(model, plan):
            nll.append(float(token_nll(model, ids).mean()))
        bar.update()
    return _Measured(entry.label, cells, nll, kv_bytes)


def _work_key(
    loaded: LoadedModel, named: list[tuple[NamedPlan, str, str | None, int | None]], settings: LongctxSettings
) -> dict[str, Any]:
    """What a saved (run, length) depends on (`sink_eval.core.resume`): the model, the settings, the runs in order."""
    runs = [[entry.label, None if entry.plan is None else entry.plan.to_json()] for entry, *_ in named]
    return {"model": loaded.fingerprint, "settings": to_json(settings), "runs": runs}


def _measure_or_load(
    work: Path | None,
    index: int,
    entry: NamedPlan,
    length: int,
    counts: list[int],
    loaded: LoadedModel,
    settings: LongctxSettings,
    bar,
) -> _Measured:
    """`_measure` of run `index` (`entry`) at `length`, saved in `work`; or what an interrupted run saved there, which
    must be of the same run and have run as many trials in each cell."""
    name = _unit_name(index, length)
    measured, reused = resume.once(
        work, name, _Measured, lambda: _measure(loaded, entry, length, settings, counts, bar)
    )
    if reused:
        ran = [len(cell.correct) for cell in measured.cells]
        if measured.label != entry.label or ran != counts:
            raise SinkEvalError(
                f"{work}/{name} is of run {measured.label!r} with {ran} trials per cell, not of {entry.label!r} "
                f"with {counts}; delete {work} to start over"
            )
        bar.update(sum(counts) + len(settings.passages))
    return measured


def _unit_name(index: int, length: int) -> str:
    return f"run-{index:03d}-L{length}.json"


def _remeasure_partial_lengths(work: Path, measured_runs: Sequence[int], lengths: Sequence[int]) -> list[int]:
    """Delete the saved runs of every length that an interrupted run left part-measured, and return those lengths; a
    speed-up sets a run's timings against the unpatched run's at the same length, so all of a length's runs must be
    timed by one process (two processes, on two machines, time differently). `measured_runs`: the indices of the runs
    that save a measurement at each length."""
    partial = []
    for n in lengths:
        saved = [path for i in measured_runs if (path := work / _unit_name(i, n)).exists()]
        if 0 < len(saved) < len(measured_runs):
            partial.append(n)
            for path in saved:
                path.unlink()
    return partial


def _plan_trials(informative: list[bool], settings: LongctxSettings) -> list[int]:
    """Per cell, the trials a plan runs at one length: an informative cell's all, an uninformative one's none; where
    no cell is informative, `timing_trials` of the deepest cell, for the speed-ups alone."""
    if any(informative):
        return [settings.trials if useful else 0 for useful in informative]
    return [0] * (len(informative) - 1) + [settings.timing_trials]


def _informative(reference: _Measured, floor: float) -> list[bool]:
    """Per cell: whether the unpatched model's accuracy there is at least `floor`."""
    return [sum(cell.correct) / len(cell.correct) >= floor for cell in reference.cells]


def _row(length: int, measured: _Measured, reference: _Measured | None, informative: list[bool]) -> LengthRow:
    """The row of a run at one length; `reference` is the unpatched run's measurement (None: this is it)."""
    base = reference or measured
    cells = []
    for cell, useful in zip(measured.cells, informative, strict=True):
        n = len(cell.correct)
        accuracy = sum(cell.correct) / n if n else None
        se = None if accuracy is None else _se(accuracy, n)
        cells.append(PasskeyCell(cell.depth, cell.keys, cell.answers, cell.correct, accuracy, se, useful))
    pooled = [c for cell in cells if cell.informative for c in cell.correct]
    pooled_accuracy = sum(pooled) / len(pooled) if pooled else None
    nll = torch.tensor(measured.nll)
    ppl = math.exp(float(nll.mean()))
    ppl_se = ppl * float(nll.std()) / math.sqrt(len(nll)) if len(nll) > 1 else 0.0
    ratio: float | None = None
    ratio_se: float | None = None
    if reference is not None:
        delta = torch.tensor(measured.nll) - torch.tensor(reference.nll)
        ratio = math.exp(float(delta.mean()))
        ratio_se = ratio * float(delta.std()) / math.sqrt(len(delta)) if len(delta) > 1 else 0.0
    return LengthRow(
        length=length,
        passkey=cells,
        accuracy=pooled_accuracy,
        accuracy_se=None if pooled_accuracy is None else _se(pooled_accuracy, len(pooled)),
        passage_nll=measured.nll,
        perplexity=ppl,
        perplexity_se=ppl_se,
        perplexity_ratio=ratio,
        perplexity_ratio_se=ratio_se,
        kv_bytes=measured.kv_bytes,
        kv_saved_bytes=base.kv_bytes - measured.kv_bytes,
        passkey_seconds=sum(sum(cell.seconds) for cell in measured.cells),  # of the trials this run ran
        speedup=_speedup(measured, reference, "seconds"),
        prefill_speedup=_speedup(measured, reference, "prefill_seconds"),
        decode_speedup=_speedup(measured, reference, "decode_seconds"),
    )


def _speedup(measured: _Measured, reference: _Measured | None, seconds: str) -> float | None:
    """Σ reference / Σ run `seconds` (a `_Trials` field) over the trials the run ran (the first n of a cell); None for
    the reference itself and where the run ran none."""
    if reference is None:
        return None
    ran = [(ref, run) for ref, run in zip(reference.cells, measured.cells, strict=True) if run.seconds]
    if not ran:
        return None
    unpatched = sum(sum(getattr(ref, seconds)[: len(run.seconds)]) for ref, run in ran)
    return unpatched / sum(sum(getattr(run, seconds)) for _, run in ran)


def comparisons(runs: list[Run]) -> list[Comparison]:
    """Each policy run against its control runs, per length (`controls.verdict`)."""
    out = []
    for policy in (r for r in runs if r.role == "policy"):
        controls = [r for r in runs if r.control_of == policy.label]
        if not controls:
            continue
        for i, row in enumerate(policy.lengths):
            rows = [c.lengths[i] for c in controls]
            passkey = None
            if row.accuracy is not None and row.accuracy_se is not None:
                passkey = verdict(row.accuracy, row.accuracy_se, [r.accuracy or 0.0 for r in rows])
            assert row.perplexity_ratio is not None and row.perplexity_ratio_se is not None, "a policy run has a ratio"
            ppl = verdict(-row.perplexity_ratio, row.perplexity_ratio_se, [-(r.perplexity_ratio or 0.0) for r in rows])
            out.append(Comparison(policy.label, row.length, passkey, ppl))
    return out


@torch.no_grad()
def run(
    loaded: LoadedModel,
    plans: Sequence[NamedPlan],
    lengths: Sequence[int],
    depths: Sequence[float],
    trials: int,
    control_seeds: Sequence[int],
    seed: int = 0,
    progress: bool = True,
    command: str = "",
    warm_up: bool = True,
    streaming_llm: bool = False,
    out: Path | None = None,
    resume_run: bool = False,
) -> LongctxResult:
    """The unpatched model, each plan and each plan's controls at every length (see the module doc). `warm_up`: one
    untimed generate call before each run's timed ones at each length (False where the speed-up is not read).
    `streaming_llm`: add the StreamingLLM reproduction at the longest length. `out`: save each (run, length) in
    `resume.work_dir(out, "longctx")` as it finishes (the caller removes it once the results are written);
    `resume_run`: continue from the measurements an interrupted run with the same key saved there."""
    check_lengths(loaded, lengths)
    model = loaded.model
    shape = model_shape(model)
    passages = evaluation_passages()
    settings = LongctxSettings(
        lengths=list(lengths),
        depths=list(depths),
        trials=trials,
        seed=seed,
        control_seeds=list(control_seeds),
        new_tokens=NEW_TOKENS,
        warm_up=warm_up,
        informative_floor=INFORMATIVE_FLOOR,
        timing_trials=min(TIMING_TRIALS, trials),
        passages=[p.id for p in passages],
        passages_sha256=prompt_set_sha256(passages),
        threads=torch.get_num_threads(),
        device=str(next(model.parameters()).device),
    )
    named: list[tuple[NamedPlan, str, str | None, int | None]] = [
        (NamedPlan(UNPATCHED, None, None), UNPATCHED, None, None)
    ]
    for plan in plans:
        named.append((plan, "policy", None, None))
        if plan.plan is None or plans_every_candidate(plan.plan, loaded.model):
            continue
        for control_seed, control in zip(control_seeds, control_plans(loaded, plan, control_seeds), strict=True):
            named.append((control, "control", plan.label, control_seed))
    work = None if out is None else resume.open_work_dir(out, _work_key(loaded, named, settings), resume_run, "longctx")
    if work is not None:
        saving = [i for i, (entry, *_) in enumerate(named) if i == 0 or entry.plan is not None]
        for n in _remeasure_partial_lengths(work, saving, lengths):
            print(
                f"{work}: length {n} was left part-measured; measuring it again whole, in one process", file=sys.stderr
            )
    every_cell = [trials] * len(depths)
    steps = len(lengths) * (len(depths) * trials + len(passages))
    measured: list[dict[int, _Measured]] = [{} for _ in named]  # per run: length -> its measurement
    informative: dict[int, list[bool]] = {}
    with tqdm(total=steps, desc="longctx", unit="pass", disable=not progress, file=sys.stderr) as bar:
        for n in lengths:  # length-major: all runs of a length, then the next one
            reference = measured[0][n] = _measure_or_load(work, 0, named[0][0], n, every_cell, loaded, settings, bar)
            informative[n] = _informative(reference, INFORMATIVE_FLOOR)
            counts = _plan_trials(informative[n], settings)
            bar.total += sum(entry.plan is not None for entry, *_ in named) * (sum(counts) + len(passages))
            bar.refresh()
            for index, (entry, *_) in enumerate(named[1:], start=1):
                measured[index][n] = (
                    reference
                    if entry.plan is None
                    else _measure_or_load(work, index, entry, n, counts, loaded, settings, bar)
                )
    runs = []
    for (entry, role, control_of, s), by_length in zip(named, measured, strict=True):
        groups = 0 if entry.plan is None else entry.plan.kv_groups_removed(shape)
        runs.append(
            Run(
                label=entry.label,
                role=role,
                policy=entry.policy,
                control_of=control_of,
                seed=s,
                plan=None if entry.plan is None else entry.plan.to_json(),
                fraction_heads=0.0 if entry.plan is None else entry.plan.fraction(shape.layers, shape.heads),
                kv_groups=groups,
                fraction_kv_groups=groups / (shape.layers * shape.kv_heads),
                lengths=[
                    _row(n, by_length[n], None if entry.plan is None else measured[0][n], informative[n])
                    for n in lengths
                ],
            )
        )
    reproduction = None
    if streaming_llm:
        reproduction, _ = resume.once(
            work,
            "streaming-llm.json",
            StreamingLLMReproduction,
            lambda: streaming_llm_reproduction(loaded, max(lengths), progress=progress),
        )
    return LongctxResult(
        model=loaded.info(),
        settings=settings,
        runs=runs,
        comparisons=comparisons(runs),
        streaming_llm=reproduction,
        provenance=provenance(command),
    )
