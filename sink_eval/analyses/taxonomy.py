"""Head taxonomy: which heads are sinks, streaming heads (sink + recent window), previous-token, induction or echo
heads, measured with one probe pass per input (`sink_eval.measure.probe`, whose docstring defines the scores). The
`TaxonomyResult` of `sink-eval taxonomy` (its results.json, schema `sink_eval.taxonomy/1`).

Inputs:
- length-dependent classes (sink, previous, streaming): the committed long passages (`prompts.long_passages()`:
  4 prose, 4 code) tokenised by the model's own tokenizer and cut to their first L tokens, for each L of `lengths`;
- induction and echo: random sequences of period T repeated R = 4 times (as RazorAttention scores them). The T
  ids are drawn uniformly, with replacement, from the tokenizer's ordinary ids (`ordinary_token_ids`) by
  `torch.randint` on a `torch.Generator` seeded with the seed (seeds 0, 1, .., n-1), and the R copies are preceded
  by the ids the tokenizer adds to an empty text (Gemma 3's <bos>; nothing for SmolLM2 and Qwen2.5).

Classes of head (l, h) on one input, every score as `sink_eval.measure.probe` defines it (positions counted from the
first token, key 0 never counted in an offset score):
- sink: sink score >= tau (0.8);
- previous: previous-token score >= tau;
- streaming(s, w): streaming score (mass on the first s tokens plus the last w keys, over queries i >= s + w)
  >= p (0.9). With s >= 1 the streaming score counts the sink mass, so a head whose sink score is >= p is
  streaming; a sink at tau < p need not be. Heads of a layer that already restricts attention to a sliding window
  (config `layer_types[l] == "sliding_attention"`, Gemma 3's local layers) are never streaming: they are
  "windowed", and only global layers are candidates;
- windowed: the head's layer is a sliding-window layer (read off the config, the same on every input);
- induction: induction score >= theta (0.5), where on a sequence of period T repeated R times, N tokens in all,
  induction score = mean over queries i >= T of the summed mass on the successors of every earlier occurrence of
  the query's token, sum over r = 1..R-1 with i >= rT of A[i, i - rT + 1]. From the probe's offset scores
  o_k (mean over the N - 1 - k queries i >= k + 1 of A[i, i - k]) it is exactly
  sum_r o_{rT-1} (N - rT) / (N - T). With a one-token prefix (<bos>) the average also holds query T, the last token
  of the first period, which has no earlier occurrence, and at most one key per r that is no successor (key 1
  after the prefix): it differs from the mean over true induction queries by less than 1/T (0.4 % at T = 256);
- echo: echo score >= theta, echo score = mean over queries i >= T + 1 of the summed mass on every earlier
  occurrence of the query's own token, sum_r A[i, i - rT] = sum_r o_{rT} (N - 1 - rT) / (N - 1 - T).
  theta = 0.5 asks for most of the head's attention on those positions; uniform attention over the i keys of a
  query would put about (number of earlier occurrences) / i, roughly 1/T, there (0.004 at T = 256). The score
  distribution is reported beside the count so that a reader can judge the threshold.

Aggregates (each class, each length):
- fraction of heads = mean over inputs of the fraction of (layer, head) pairs in the class;
- fraction of KV groups = the same over (layer, KV group) pairs, a KV group being in the class on an input when
  every one of its query heads is (query head h belongs to KV group h // group_size, as `repeat_interleave`
  shares keys); the denominators are all heads and all KV groups of the model;
- SE: standard deviation over a seeded bootstrap of the inputs (`measure.stats.bootstrap_se`, 200 resamples);
- consistency of (l, h) = fraction of inputs on which it is in the class;
- a head is a member of a class for the overlaps and the class map when its consistency > 1/2 (a majority of the
  inputs); overlaps[a][b] = number of heads that are members of both a and b (the diagonal: members of a);
- primary class (exclusive, for the map): the first class the head is a member of in the order windowed, sink,
  induction, echo, previous, streaming(s, w) by increasing s + w (then s), else "other".
"""

from __future__ import annotations

import hashlib
import json
import re
import sys
from collections.abc import Sequence
from dataclasses import dataclass

import torch
from tqdm import tqdm

from sink_eval.analyses.analyze import text_sha256
from sink_eval.core.errors import SinkEvalError
from sink_eval.core.results import ModelInfo, Provenance, TopLevel, provenance
from sink_eval.core.shape import model_shape
from sink_eval.measure.probe import PromptStats, Window, check_windows, probe
from sink_eval.measure.stats import BOOTSTRAP_RESAMPLES, bootstrap_se
from sink_eval.models.load import LoadedModel
from sink_eval.prompts.prompt_set import Prompt, long_passages, model_context, prompt_set_sha256

SCHEMA = "sink_eval.taxonomy/1"
DEFAULT_LENGTHS = (1024, 2048, 4096)
DEFAULT_WINDOWS: tuple[Window, ...] = ((1, 16), (1, 64), (1, 256), (4, 16), (4, 64), (4, 256))
SINK_THRESHOLD = 0.8  # tau, for sink and previous-token heads
STREAMING_THRESHOLD = 0.9  # p
INDUCTION_THRESHOLD = 0.5  # theta, for induction and echo heads
PERIOD = 256  # T
REPEATS = 4  # R
REPEAT_SEEDS = 4  # seeds 0..3
MAJORITY = 0.5  # a head is a member of a class when its consistency exceeds this
SLIDING = "sliding_attention"
WINDOWED, SINK, PREVIOUS, INDUCTION, ECHO, OTHER = "windowed", "sink", "previous", "induction", "echo", "other"


def streaming_name(window: Window) -> str:
    s, w = window
    return f"streaming({s},{w})"


@dataclass(frozen=True)
class Thresholds:
    sink: float = SINK_THRESHOLD  # tau, also for previous-token heads
    streaming: float = STREAMING_THRESHOLD  # p
    induction: float = INDUCTION_THRESHOLD  # theta, also for echo heads


def parse_windows(text: str) -> list[Window]:
    """`--windows 1:16,4:256` -> [(1, 16), (4, 256)]: each s >= 0 sink tokens and w >= 1 keys, none twice."""
    windows: list[Window] = []
    for item in text.split(","):
        match = re.fullmatch(r"\s*(-?\d+)\s*:\s*(-?\d+)\s*", item)
        if match is None:
            raise SinkEvalError(f"--windows {text!r}: write each window as s:w (sink tokens:window keys), e.g. 4:256")
        window = (int(match[1]), int(match[2]))
        if window in windows:
            raise SinkEvalError(f"--windows {text!r} gives {window[0]}:{window[1]} twice; give each window once")
        windows.append(window)
    try:
        check_windows(windows)
    except SinkEvalError as err:
        raise SinkEvalError(f"--windows {text!r}: {err}") from None
    return windows


def check_lengths(lengths: Sequence[int], windows: Sequence[Window]) -> None:
    """Every length must leave a query i >= s + w for every window: L > s + w, else the score is undefined."""
    for n in lengths:
        for s, w in windows:
            if n <= s + w:
                raise SinkEvalError(
                    f"length {n} is not longer than s + w = {s} + {w} = {s + w} of window {s}:{w}: a {n}-token input "
                    f"has no query i >= s + w, so its streaming score would be undefined; give lengths above {s + w} "
                    "or a smaller window"
                )


def ordinary_token_ids(tokenizer) -> torch.Tensor:
    """(V,) the tokenizer's ordinary ids, in increasing order: its base vocabulary without its special ids, its added
    tokens (special or not: Gemma 3's <unused..>, Qwen2.5's <|fim_..|>) and the `[PAD<id>]` placeholders a GGUF
    conversion puts at ids that have no token (Qwen2.5's last 271 ids): ids a model never saw in ordinary text."""
    vocab = tokenizer.backend_tokenizer.get_vocab(with_added_tokens=False)
    excluded = set(tokenizer.all_special_ids) | set(tokenizer.added_tokens_decoder)
    ids = [i for token, i in vocab.items() if i not in excluded and token != f"[PAD{i}]"]
    return torch.tensor(sorted(ids))


def repeated_random_ids(
    tokenizer, seed: int, period: int = PERIOD, repeats: int = REPEATS, ordinary: torch.Tensor | None = None
) -> list[int]:
    """The tokenizer's empty-text ids (its <bos>, if it adds one), then `period` ordinary ids drawn uniformly with
    replacement by a `torch.Generator` seeded with `seed`, repeated `repeats` times."""
    pool = ordinary_token_ids(tokenizer) if ordinary is None else ordinary
    draw = torch.randint(len(pool), (period,), generator=torch.Generator().manual_seed(seed))
    return list(tokenizer("")["input_ids"]) + pool[draw].tolist() * repeats


@dataclass
class PassageInput:
    prompt: Prompt
    n_tokens: int  # the whole passage's length with this tokenizer
    input_ids: list[int]  # its first `length` tokens


def passage_inputs(
    loaded: LoadedModel, lengths: Sequence[int], passages: Sequence[Prompt] | None = None
) -> dict[int, list[PassageInput]]:
    """Each length -> each passage cut to its first `length` tokens; a length beyond a passage or the model's
    context is an error naming both."""
    passages = long_passages() if passages is None else passages
    context = model_context(loaded.model)
    longest = max(lengths)
    if context is not None and longest > context:
        raise SinkEvalError(f"--lengths {longest} exceeds {loaded.spec.name}'s context of {context} tokens")
    tokenized = [(p, loaded.tokenizer(p.text)["input_ids"]) for p in passages]
    shortest = min(tokenized, key=lambda pair: len(pair[1]))
    if len(shortest[1]) < longest:
        raise SinkEvalError(
            f"--lengths {longest} exceeds the long passage {shortest[0].id!r}, {len(shortest[1])} tokens with "
            f"{loaded.spec.name}'s tokenizer; give lengths up to {len(shortest[1])}"
        )
    return {n: [PassageInput(p, len(ids), ids[:n]) for p, ids in tokenized] for n in lengths}


def windowed_layers(config) -> list[int]:
    """The layers whose attention is already a sliding window (config `layer_types`); none without `layer_types`."""
    types = getattr(config.get_text_config(decoder=True), "layer_types", None) or []
    return [layer for layer, kind in enumerate(types) if kind == SLIDING]


def induction_score(stats: PromptStats, period: int, repeats: int) -> torch.Tensor:
    """(layers, heads) induction score of a repeated random sequence (module docstring), from its offset scores."""
    return _occurrence_sum(stats, period, repeats, lag=1)


def echo_score(stats: PromptStats, period: int, repeats: int) -> torch.Tensor:
    """(layers, heads) echo score of a repeated random sequence (module docstring), from its offset scores."""
    return _occurrence_sum(stats, period, repeats, lag=0)


def repeat_offsets(period: int, repeats: int) -> list[int]:
    """The offsets the probe must record for `induction_score` and `echo_score`: rT - 1 and rT, r = 1..R-1."""
    return [r * period - lag for r in range(1, repeats) for lag in (1, 0)]


def _occurrence_sum(stats: PromptStats, period: int, repeats: int, lag: int) -> torch.Tensor:
    """sum_r o_{rT-lag} n_{rT-lag} / n_{T-lag}, n_k = N - 1 - k the number of queries offset k averages over."""
    n = stats.n_tokens

    def count(k: int) -> int:
        return n - 1 - k

    return sum(
        (stats.offset[r * period - lag] * count(r * period - lag) for r in range(1, repeats)),
        torch.zeros_like(stats.sink),
    ) / count(period - lag)


def kv_groups(members: torch.Tensor, group_size: int) -> torch.Tensor:
    """(..., layers, heads) bool -> (..., layers, kv_heads) bool: a KV group is in a class when all its query heads
    h (h // group_size == group) are."""
    *lead, heads = members.shape
    return members.reshape(*lead, heads // group_size, group_size).all(-1)


def length_classes(
    stats: PromptStats, windows: Sequence[Window], thresholds: Thresholds, windowed: torch.Tensor
) -> dict[str, torch.Tensor]:
    """The (layers, heads) bool membership of one passage in each length-dependent class; `windowed` (layers,) bool
    marks sliding-window layers (never streaming). A NaN score is in no class."""
    local = windowed.view(-1, 1).expand_as(stats.sink)
    classes = {WINDOWED: local.clone(), SINK: stats.sink >= thresholds.sink, PREVIOUS: stats.prev >= thresholds.sink}
    for window in windows:
        classes[streaming_name(window)] = (stats.streaming[window] >= thresholds.streaming) & ~local
    return classes


def length_scores(stats: PromptStats, windows: Sequence[Window]) -> dict[str, torch.Tensor | None]:
    """The (layers, heads) score behind each length-dependent class (None: windowed has no score)."""
    scores: dict[str, torch.Tensor | None] = {WINDOWED: None, SINK: stats.sink, PREVIOUS: stats.prev}
    for window in windows:
        scores[streaming_name(window)] = stats.streaming[window]
    return scores


def primary_precedence(windows: Sequence[Window]) -> list[str]:
    """The order in which a head's primary (exclusive) class is chosen; "other" when it is in none."""
    spans = sorted(windows, key=lambda sw: (sw[0] + sw[1], sw[0]))
    return [WINDOWED, SINK, INDUCTION, ECHO, PREVIOUS, *(streaming_name(sw) for sw in spans)]


@dataclass
class ClassStats:
    """One class over a set of inputs (module docstring); maps are (layers, heads)."""

    name: str
    heads: float
    heads_se: float | None
    kv_groups: float
    kv_groups_se: float | None
    per_input_heads: list[float]
    per_input_kv_groups: list[float]
    consistency: list[list[float]]
    mean_score: list[list[float | None]] | None  # mean over inputs of the class's score; None for windowed

    def members(self) -> torch.Tensor:
        """(layers, heads) bool: consistency > 1/2."""
        return torch.tensor(self.consistency) > MAJORITY


@dataclass
class Overlaps:
    classes: list[str]
    heads: list[list[int]]  # [a][b] = heads that are members of both a and b; the diagonal: members of a


@dataclass
class LengthSummary:
    tokens: int
    inputs: list[str]  # passage ids
    classes: list[ClassStats]  # windowed, sink, previous, then each streaming window in the given order
    overlaps: Overlaps  # these classes, induction and echo
    primary: list[list[str]]  # (layers, heads) primary class

    def get(self, name: str) -> ClassStats:
        return next(c for c in self.classes if c.name == name)


@dataclass
class RepeatSummary:
    period: int
    repeats: int
    seeds: list[int]
    prefix: list[int]  # the ids before the repeats
    n_tokens: int
    vocabulary: int  # ordinary ids drawn from
    ids_sha256: list[str]  # per seed, of the ids as JSON
    induction: ClassStats
    echo: ClassStats


@dataclass
class Layout:
    group_size: int
    sliding_window: int | None
    windowed_layers: list[int]
    global_layers: list[int]


@dataclass
class Passage:
    id: str
    domain: str
    text_sha256: str
    n_tokens: int  # the whole passage, this model's tokenizer


@dataclass
class TaxonomySettings:
    lengths: list[int]
    windows: list[list[int]]  # [s, w]
    sink_threshold: float
    previous_threshold: float
    streaming_threshold: float
    induction_threshold: float
    echo_threshold: float
    membership: str  # the rule behind overlaps and the map
    primary_precedence: list[str]
    bootstrap_resamples: int
    prompt_set_sha256: str  # of the long passages
    passages: list[Passage]


@dataclass
class TaxonomyResult(TopLevel, schema=SCHEMA, command="taxonomy"):
    """The results.json of `sink-eval taxonomy`: head classes by input length and on repeated random sequences."""

    model: ModelInfo
    layout: Layout
    settings: TaxonomySettings
    lengths: list[LengthSummary]
    repeats: RepeatSummary
    provenance: Provenance

    def at(self, tokens: int) -> LengthSummary:
        return next(s for s in self.lengths if s.tokens == tokens)


def _round(t: torch.Tensor) -> list:
    return [[None if v != v else round(v, 4) for v in row] for row in t.tolist()]


def class_stats(name: str, members: torch.Tensor, scores: torch.Tensor | None, group_size: int) -> ClassStats:
    """`members` (inputs, layers, heads) bool and `scores` (inputs, layers, heads) of one class -> its ClassStats."""
    per_head = members.float().mean(dim=(1, 2))  # (inputs,)
    per_group = kv_groups(members, group_size).float().mean(dim=(1, 2))

    def mean(values: torch.Tensor) -> float:
        return float(values.mean())

    return ClassStats(
        name=name,
        heads=mean(per_head),
        heads_se=bootstrap_se(per_head, mean),
        kv_groups=mean(per_group),
        kv_groups_se=bootstrap_se(per_group, mean),
        per_input_heads=[round(v, 6) for v in per_head.tolist()],
        per_input_kv_groups=[round(v, 6) for v in per_group.tolist()],
        consistency=_round(members.float().mean(dim=0)),
        mean_score=None if scores is None else _round(scores.nanmean(dim=0)),
    )


def overlaps(members: dict[str, torch.Tensor]) -> Overlaps:
    """Counts of heads in both of each pair of classes, from (layers, heads) bool memberships."""
    names = list(members)
    return Overlaps(names, [[int((members[a] & members[b]).sum()) for b in names] for a in names])


def primary_classes(members: dict[str, torch.Tensor], precedence: Sequence[str]) -> list[list[str]]:
    """(layers, heads) the first class of `precedence` each head is a member of, else "other"."""
    shape = next(iter(members.values())).shape
    primary = [[OTHER] * shape[1] for _ in range(shape[0])]
    for name in reversed(precedence):
        for layer, head in members[name].nonzero().tolist():
            primary[layer][head] = name
    return primary


def _stacked(maps: list[torch.Tensor | None]) -> torch.Tensor | None:
    """(inputs, layers, heads) of the inputs' maps; None when the class has no score."""
    present = [m for m in maps if m is not None]
    return torch.stack(present) if len(present) == len(maps) else None


def summarize_length(
    tokens: int,
    inputs: Sequence[str],
    stats: Sequence[PromptStats],
    windows: Sequence[Window],
    thresholds: Thresholds,
    windowed: torch.Tensor,
    group_size: int,
    repeat_members: dict[str, torch.Tensor],
) -> LengthSummary:
    """One length's classes over its passages, their overlaps with each other and with `repeat_members`
    (induction, echo: (layers, heads) bool), and the primary class map."""
    per_input = [length_classes(s, windows, thresholds, windowed) for s in stats]
    per_input_scores = [length_scores(s, windows) for s in stats]
    classes = [
        class_stats(
            name,
            torch.stack([c[name] for c in per_input]),
            _stacked([s[name] for s in per_input_scores]),
            group_size,
        )
        for name in per_input[0]
    ]
    members = {c.name: c.members() for c in classes} | repeat_members
    return LengthSummary(
        tokens=tokens,
        inputs=list(inputs),
        classes=classes,
        overlaps=overlaps(members),
        primary=primary_classes(members, primary_precedence(windows)),
    )


def summarize_repeats(
    stats: Sequence[PromptStats], period: int, repeats: int, thresholds: Thresholds, group_size: int
) -> tuple[ClassStats, ClassStats]:
    """Induction and echo over the repeated random sequences."""
    out = []
    for name, score in ((INDUCTION, induction_score), (ECHO, echo_score)):
        scores = torch.stack([score(s, period, repeats) for s in stats])  # (seeds, layers, heads)
        out.append(class_stats(name, scores >= thresholds.induction, scores, group_size))
    return out[0], out[1]


@dataclass
class ProbedInputs:
    """Probe statistics of every input: per length the passages in order, and the random sequences by seed."""

    passages: dict[int, list[PassageInput]]
    passage_stats: dict[int, list[PromptStats]]
    repeat_ids: list[list[int]]
    repeat_stats: list[PromptStats]


def probe_inputs(
    loaded: LoadedModel,
    passages: dict[int, list[PassageInput]],
    windows: Sequence[Window],
    seeds: int = REPEAT_SEEDS,
    period: int = PERIOD,
    progress: bool = True,
) -> ProbedInputs:
    """One probe pass per input (windows on the passages, offsets on the random sequences), with a progress bar."""
    device = next(loaded.model.parameters()).device
    ordinary = ordinary_token_ids(loaded.tokenizer)
    repeat_ids = [repeated_random_ids(loaded.tokenizer, seed, period, REPEATS, ordinary) for seed in range(seeds)]
    jobs: list[tuple[int | None, list[int]]] = [(n, p.input_ids) for n, items in passages.items() for p in items]
    jobs += [(None, ids) for ids in repeat_ids]
    passage_stats: dict[int, list[PromptStats]] = {n: [] for n in passages}
    repeat_stats = []
    bar = tqdm(jobs, desc=f"taxonomy {loaded.spec.name}", unit="input", disable=not progress, file=sys.stderr)
    for n, ids in bar:
        batch = torch.tensor([ids], device=device)
        if n is None:
            repeat_stats.append(probe(loaded.model, batch, offsets=repeat_offsets(period, REPEATS)).stats[0])
        else:
            passage_stats[n].append(probe(loaded.model, batch, windows=windows).stats[0])
    return ProbedInputs(passages, passage_stats, repeat_ids, repeat_stats)


def check_repeats_fit(loaded: LoadedModel, period: int) -> None:
    """The repeated sequences (prefix + R T tokens) must fit the model's context, and T >= 2 (offset T - 1 >= 1)."""
    if period < 2:
        raise SinkEvalError(f"--period {period}: the period of the random sequences must be at least 2 tokens")
    n_tokens = len(loaded.tokenizer("")["input_ids"]) + REPEATS * period
    context = model_context(loaded.model)
    if context is not None and n_tokens > context:
        raise SinkEvalError(
            f"--period {period}: {REPEATS} repeats make {n_tokens} tokens, beyond {loaded.spec.name}'s context of "
            f"{context}; give a period up to {context // REPEATS - 1}"
        )


def layout(loaded: LoadedModel) -> Layout:
    shape = model_shape(loaded.model)
    windowed = windowed_layers(loaded.model.config)
    sliding = getattr(loaded.model.config.get_text_config(decoder=True), "sliding_window", None)
    return Layout(
        group_size=shape.group_size,
        sliding_window=sliding if windowed else None,
        windowed_layers=windowed,
        global_layers=[layer for layer in range(shape.layers) if layer not in windowed],
    )


def results(
    loaded: LoadedModel,
    probed: ProbedInputs,
    windows: Sequence[Window],
    thresholds: Thresholds = Thresholds(),
    period: int = PERIOD,
    command: str = "",
) -> TaxonomyResult:
    """The taxonomy of `probed`: model, layout, settings, per-length summaries, induction and echo, provenance."""
    lay = layout(loaded)
    n_layers = model_shape(loaded.model).layers
    windowed = torch.tensor([layer in lay.windowed_layers for layer in range(n_layers)])
    induction, echo = summarize_repeats(probed.repeat_stats, period, REPEATS, thresholds, lay.group_size)
    repeat_members = {INDUCTION: induction.members(), ECHO: echo.members()}
    summaries = [
        summarize_length(
            n,
            [p.prompt.id for p in probed.passages[n]],
            probed.passage_stats[n],
            windows,
            thresholds,
            windowed,
            lay.group_size,
            repeat_members,
        )
        for n in probed.passages
    ]
    first = next(iter(probed.passages.values()))
    prompts = [p.prompt for p in first]
    return TaxonomyResult(
        model=loaded.info(),
        layout=lay,
        settings=TaxonomySettings(
            lengths=list(probed.passages),
            windows=[list(sw) for sw in windows],
            sink_threshold=thresholds.sink,
            previous_threshold=thresholds.sink,
            streaming_threshold=thresholds.streaming,
            induction_threshold=thresholds.induction,
            echo_threshold=thresholds.induction,
            membership=f"consistency > {MAJORITY:g} (a majority of the inputs)",
            primary_precedence=[*primary_precedence(windows), OTHER],
            bootstrap_resamples=BOOTSTRAP_RESAMPLES,
            prompt_set_sha256=prompt_set_sha256(prompts),
            passages=[Passage(p.prompt.id, p.prompt.domain, text_sha256(p.prompt.text), p.n_tokens) for p in first],
        ),
        lengths=summaries,
        repeats=RepeatSummary(
            period=period,
            repeats=REPEATS,
            seeds=list(range(len(probed.repeat_ids))),
            prefix=list(loaded.tokenizer("")["input_ids"]),
            n_tokens=len(probed.repeat_ids[0]),
            vocabulary=len(ordinary_token_ids(loaded.tokenizer)),
            ids_sha256=[hashlib.sha256(json.dumps(ids).encode()).hexdigest() for ids in probed.repeat_ids],
            induction=induction,
            echo=echo,
        ),
        provenance=provenance(command),
    )
