"""The report of `sink-eval taxonomy`: tables, the layer x head class map (PNG) and report.md of a TaxonomyResult."""

from __future__ import annotations

import json
from pathlib import Path

import torch
from tabulate import tabulate

from sink_eval.analyses.taxonomy import (
    ECHO,
    INDUCTION,
    OTHER,
    PREVIOUS,
    SINK,
    WINDOWED,
    ClassStats,
    LengthSummary,
    TaxonomyResult,
    kv_groups,
    streaming_name,
)
from sink_eval.reports.common import pyplot, save_figure, write_report_dir

HEADLINE_WINDOW = (4, 256)  # the window the issue compares with pure sinks
SCORE_BINS = (0.0, 0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9, 1.0)
TOP_HEADS = 10
MAP_FILE = "class_map.png"
FIXED_COLOURS = {
    WINDOWED: "#7f7f7f",
    SINK: "#d62728",
    INDUCTION: "#ff7f0e",
    ECHO: "#bcbd22",
    PREVIOUS: "#9467bd",
    OTHER: "#eeeeee",
}


def _pct(value: float, se: float | None = None) -> str:
    return f"{100 * value:.1f}%" + (f" ± {100 * se:.1f}" if se else "")


def rule(res: TaxonomyResult, name: str) -> str:
    """The membership rule of a class on one input, as the report states it."""
    st = res.settings
    if name == WINDOWED:
        window = res.layout.sliding_window
        return f"layer is a sliding-window layer (window {window})" if window else "layer is a sliding-window layer"
    if name == SINK:
        return f"sink score >= {st.sink_threshold:g}"
    if name == PREVIOUS:
        return f"previous-token score >= {st.previous_threshold:g}"
    if name == INDUCTION:
        return f"induction score >= {st.induction_threshold:g}"
    if name == ECHO:
        return f"echo score >= {st.echo_threshold:g}"
    windowed = " (global layers only)" if res.layout.windowed_layers else ""
    return f"streaming score >= {st.streaming_threshold:g}{windowed}"


def headline_table(res: TaxonomyResult) -> str:
    """Per length: pure sinks (heads, KV groups) beside streaming at HEADLINE_WINDOW (or the widest window given)."""
    window = HEADLINE_WINDOW if list(HEADLINE_WINDOW) in res.settings.windows else tuple(res.settings.windows[-1])
    name = streaming_name((window[0], window[1]))
    lay = res.layout
    scale = res.model.layers / len(lay.global_layers) if lay.windowed_layers and lay.global_layers else None
    rows = []
    for summary in res.lengths:
        sink, stream = summary.get(SINK), summary.get(name)
        row = [
            summary.tokens,
            _pct(sink.heads, sink.heads_se),
            _pct(sink.kv_groups, sink.kv_groups_se),
            _pct(stream.heads, stream.heads_se),
            _pct(stream.kv_groups, stream.kv_groups_se),
        ]
        if scale is not None:  # streaming is never counted in a sliding-window layer: rescale to the global ones
            row += [
                _pct(scale * stream.heads, scale * stream.heads_se if stream.heads_se else None),
                _pct(scale * stream.kv_groups, scale * stream.kv_groups_se if stream.kv_groups_se else None),
            ]
        rows.append(row)
    headers = [
        "tokens",
        f"sink heads (tau {res.settings.sink_threshold:g})",
        "sink KV groups",
        f"{name} heads (p {res.settings.streaming_threshold:g})",
        f"{name} KV groups",
    ]
    if scale is not None:
        headers += [f"{name}, of global-layer heads", "of global-layer KV groups"]
    return tabulate(rows, headers=headers, tablefmt="github")


def fractions_table(res: TaxonomyResult) -> str:
    """Each length-dependent class: its rule and, per length, the fraction of heads and of KV groups ± SE."""
    rows = []
    for cls in res.lengths[0].classes:
        cells = [cls.name, rule(res, cls.name)]
        for summary in res.lengths:
            c = summary.get(cls.name)
            cells += [_pct(c.heads, c.heads_se), _pct(c.kv_groups, c.kv_groups_se)]
        rows.append(cells)
    headers = ["class", "rule (per input)"]
    for summary in res.lengths:
        headers += [f"{summary.tokens}: heads", f"{summary.tokens}: KV groups"]
    return tabulate(rows, headers=headers, tablefmt="github")


def _consistency_row(label: str, tokens: int | str, c: ClassStats, group_size: int) -> list:
    consistency = torch.tensor(c.consistency)  # (layers, heads)
    every = consistency == 1
    return [
        label,
        tokens,
        int(c.members().sum()),
        int(every.sum()),
        int((consistency == 0).sum()),
        int(kv_groups(c.members(), group_size).sum()),
        int(kv_groups(every, group_size).sum()),
    ]


def consistency_table(res: TaxonomyResult) -> str:
    """Per class and length: heads in the class on a majority of inputs, on every input, on none; KV groups all of
    whose query heads are members, and all of whose query heads are in the class on every input."""
    size = res.layout.group_size
    rows = [_consistency_row(c.name, s.tokens, c, size) for s in res.lengths for c in s.classes if c.name != WINDOWED]
    rows += [_consistency_row(c.name, "random", c, size) for c in (res.repeats.induction, res.repeats.echo)]
    headers = [
        "class",
        "tokens",
        "member heads (> 1/2 of inputs)",
        "heads on every input",
        "heads on no input",
        "KV groups of member heads",
        "KV groups on every input",
    ]
    return tabulate(rows, headers=headers, tablefmt="github")


def repeats_table(res: TaxonomyResult) -> str:
    rows = [
        [
            c.name,
            rule(res, c.name),
            _pct(c.heads, c.heads_se),
            _pct(c.kv_groups, c.kv_groups_se),
            int(c.members().sum()),
        ]
        for c in (res.repeats.induction, res.repeats.echo)
    ]
    return tabulate(
        rows,
        headers=["class", "rule (per sequence)", "heads", "KV groups", "members (> 1/2 of seeds)"],
        tablefmt="github",
    )


def _mean_scores(c: ClassStats) -> torch.Tensor:
    assert c.mean_score is not None, "induction and echo always carry their scores"
    return torch.tensor([[float("nan") if v is None else v for v in row] for row in c.mean_score])


def score_distribution_table(res: TaxonomyResult) -> str:
    """Heads by their mean induction and echo score over the seeds, in bins of 0.1."""
    scores = [_mean_scores(c).flatten() for c in (res.repeats.induction, res.repeats.echo)]
    rows = []
    for lo, hi in zip(SCORE_BINS, SCORE_BINS[1:], strict=False):
        last = hi == SCORE_BINS[-1]
        rows.append(
            [f"[{lo:.1f}, {hi:.1f}{']' if last else ')'}"]
            + [int(((s >= lo) & ((s <= hi) if last else (s < hi))).sum()) for s in scores]
        )
    return tabulate(rows, headers=["mean score", "induction heads", "echo heads"], tablefmt="github")


def top_induction_table(res: TaxonomyResult) -> str:
    induction, echo = (_mean_scores(c) for c in (res.repeats.induction, res.repeats.echo))
    consistency = torch.tensor(res.repeats.induction.consistency)
    order = torch.argsort(induction.flatten(), descending=True, stable=True)[:TOP_HEADS]
    heads = induction.shape[1]
    rows = [
        [
            f"L{i // heads}.H{i % heads}",
            f"{float(induction.flatten()[i]):.3f}",
            _pct(float(consistency.flatten()[i])),
            f"{float(echo.flatten()[i]):.3f}",
        ]
        for i in order.tolist()
    ]
    return tabulate(rows, headers=["head", "induction score", "seeds >= theta", "echo score"], tablefmt="github")


def overlaps_table(summary: LengthSummary) -> str:
    names = summary.overlaps.classes
    rows = [[a, *summary.overlaps.heads[i]] for i, a in enumerate(names)]
    return tabulate(rows, headers=["", *names], tablefmt="github")


def primary_counts(summary: LengthSummary, precedence: list[str]) -> dict[str, int]:
    flat = [c for row in summary.primary for c in row]
    return {name: flat.count(name) for name in precedence}


def _class_map(res: TaxonomyResult, out: Path) -> str:
    """The layer x head map of primary classes at the longest length."""
    plt = pyplot()
    from matplotlib.colors import ListedColormap
    from matplotlib.patches import Patch

    summary = res.lengths[-1]
    precedence = res.settings.primary_precedence
    counts = primary_counts(summary, precedence)
    streaming = [n for n in precedence if n not in FIXED_COLOURS]
    blues = plt.get_cmap("Blues")
    shades = {n: blues(0.9 - 0.55 * i / max(1, len(streaming) - 1)) for i, n in enumerate(streaming)}
    palette = FIXED_COLOURS | shades  # streaming: darker for a smaller s + w
    index = [[precedence.index(c) for c in row] for row in summary.primary]  # (layers, heads)
    fig, ax = plt.subplots(figsize=(3.5 + 0.45 * res.model.heads, 1.2 + 0.24 * res.model.layers))
    ax.imshow(
        index, aspect="auto", cmap=ListedColormap([palette[n] for n in precedence]), vmin=0, vmax=len(precedence) - 1
    )
    ax.set_xticks(range(res.model.heads))
    ax.set(
        xlabel="head",
        ylabel="layer",
        title=f"{res.model.name}: primary head class at {summary.tokens} tokens",
    )
    legend = [Patch(color=palette[n], label=f"{n} ({counts[n]})") for n in precedence if counts[n]]
    ax.legend(handles=legend, loc="upper left", bbox_to_anchor=(1.02, 1), fontsize=7)
    name = save_figure(fig, out, MAP_FILE)
    plt.close("all")
    return name


def taxonomy_report(res: TaxonomyResult, figure: str) -> str:
    model, st, lay, rep = res.model, res.settings, res.layout, res.repeats
    longest = res.lengths[-1]
    passages = ", ".join(f"`{p.id}` ({p.domain}, {p.n_tokens} tokens)" for p in st.passages)
    if lay.windowed_layers:
        layers = (
            f"Global layers: {lay.global_layers}; sliding-window layers (window {lay.sliding_window}, "
            f"`layer_types` = sliding_attention): {lay.windowed_layers}. Rule: a head of a sliding-window layer is "
            "*windowed* (its attention is already restricted) and is never counted as streaming; only the "
            f"{len(lay.global_layers) * model.heads} heads ({len(lay.global_layers) * model.kv_heads} KV groups) of "
            "the global layers are streaming candidates. Fractions are of all heads / KV groups."
        )
    else:
        layers = "Every layer is global (no sliding-window layer)."
    counts = primary_counts(longest, st.primary_precedence)
    parts = [
        f"# Head taxonomy of {model.name}",
        f"![primary class per layer and head]({figure})",
        f"Model `{model.name}` ({model.layers} layers x {model.heads} heads, {model.kv_heads} KV heads: "
        f"{lay.group_size} query heads per KV group, {model.dtype}), fingerprint `{model.fingerprint}`; versions "
        f"{json.dumps(res.provenance.versions)}; {res.provenance.date}; command `{res.provenance.command or '-'}`.",
        layers,
        f"Inputs. Length-dependent classes: the {len(st.passages)} long passages (set `{st.prompt_set_sha256[:16]}`: "
        f"{passages}) cut to their first {', '.join(map(str, st.lengths))} tokens, one probe pass each. Induction "
        f"and echo: {len(rep.seeds)} random sequences (seeds {rep.seeds}) of period T = {rep.period} drawn uniformly "
        f"from the tokenizer's {rep.vocabulary} ordinary ids, repeated {rep.repeats} times after the prefix "
        f"{rep.prefix} ({rep.n_tokens} tokens).",
        "Scores (see `sink_eval.measure.probe` and `sink_eval.analyses.taxonomy`): sink = mean A[i, 0]; "
        "previous = mean A[i, i-1]; "
        "streaming(s, w) = mean over queries i >= s + w of the mass on the first s tokens plus the last w keys; "
        "induction = mean over queries i >= T of the mass on the successors of every earlier occurrence of the "
        "query's token; echo = the same on the earlier occurrences themselves. Fractions: mean over inputs of the "
        "fraction of heads (of KV groups: a group counts when all its query heads do) in the class, ± the "
        f"bootstrap SE over inputs ({st.bootstrap_resamples} resamples). Members (overlaps, map): {st.membership}.",
        "## Streaming KV groups against pure sinks",
        headline_table(res),
        "## Fraction of heads and KV groups in each class, by length",
        fractions_table(res),
        "## Induction and echo heads (random repeated sequences)",
        f"theta = {st.induction_threshold:g}: most of the head's attention on those positions, against about 1/T = "
        f"{1 / rep.period:.3f} for uniform attention. The distribution of the heads' mean scores over the seeds, "
        "so that another threshold can be read off:",
        repeats_table(res),
        score_distribution_table(res),
        top_induction_table(res),
        "## Per-head consistency",
        "Consistency of a head = the fraction of inputs on which it is in the class. A KV group of member heads has "
        "every one of its query heads a member: the heads a static plan calibrated on these inputs could select "
        "group by group.",
        consistency_table(res),
        "## Overlaps",
        "Heads that are members of both classes (row, column); the diagonal counts each class's members.",
    ]
    for summary in res.lengths:
        parts += [f"### {summary.tokens} tokens", overlaps_table(summary)]
    parts += [
        f"## Primary class (the map), {longest.tokens} tokens",
        f"Precedence: {' > '.join(st.primary_precedence)}.",
        tabulate([[n, counts[n]] for n in st.primary_precedence], headers=["class", "heads"], tablefmt="github"),
    ]
    return "\n\n".join(parts) + "\n"


def write_taxonomy(res: TaxonomyResult, out: Path, overwrite: bool = False) -> None:
    """DIR/results.json, DIR/report.md and the class map, all or nothing."""
    render = lambda tmp: taxonomy_report(res, _class_map(res, tmp))  # noqa: E731
    write_report_dir(out, "taxonomy", render, res.to_json(), overwrite=overwrite)
