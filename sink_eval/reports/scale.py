"""The Markdown report and figure of `sink-eval scale` (`sink_eval.analyses.scale`): prevalence by bin, per-layer
prevalence against relative depth, consistent heads and first-layer agreement, the notes' claims with their verdict
rules (the docstrings of scale.py's verdict functions, quoted), and the length-matched domains."""

from __future__ import annotations

import inspect
from collections.abc import Callable, Sequence
from pathlib import Path

from tabulate import tabulate

from sink_eval.analyses.analyze import ConsistentHead, bin_key
from sink_eval.analyses.scale import (
    CLAIM_THRESHOLD,
    CONSISTENT,
    FIGURE,
    TOP_HEADS,
    BinPrevalence,
    Difference,
    DomainCell,
    MiddleClaim,
    ModelScale,
    ScaleResult,
    ShortLongClaim,
    SizeClaim,
    SizePair,
    consistent_verdict,
    length_matched,
    middle_verdict,
    predictability_verdict,
    short_long_verdict,
    size_verdict,
)
from sink_eval.reports.common import pyplot, save_figure, tau_label, write_report_dir

THIRDS = ("first", "middle", "last")


def _plus_minus(value: float | None, se: float | None, scale: float = 1, spec: str = "", unit: str = "") -> str:
    """scale x value in format `spec` with its unit, ± scale x se to one decimal; "undefined" without a value."""
    if value is None:
        return "undefined"
    return f"{scale * value:{spec}}{unit}" + (f" ± {scale * se:.1f}" if se is not None else "")


def _pct(value: float | None, se: float | None = None) -> str:
    return _plus_minus(value, se, 100, ".1f", " %")


def _points(diff: Difference) -> str:
    return "undefined" if diff.value is None else _plus_minus(diff.value, diff.se, 100, "+.1f") + " pts"


def _count(value: int | None, se: float | None) -> str:
    return _plus_minus(value, se)


def _heads_diff(diff: Difference) -> str:
    return _plus_minus(diff.value, diff.se, 1, "+.0f")


def _params_label(params: int | None) -> str:
    if params is None:
        return "size unknown"
    return f"{params / 1e9:.2f}B" if params >= 1e9 else f"{params / 1e6:.0f}M"


def _heads(heads: list[ConsistentHead], shown: int = 5) -> str:
    names = ", ".join(f"L{h.layer}.H{h.head}" for h in heads[:shown])
    return names + (f", … (+{len(heads) - shown})" if len(heads) > shown else "")


def prevalence_table(res: ScaleResult, tau: float) -> str:
    """Prevalence ± SE by length bin, one column per model, (non-trivial prompts) in each cell."""
    first = res.models[0].at(tau)
    rows = [[g.tokens, *[_bin_cell(m.at(tau).group(g.tokens)) for m in res.models]] for g in first.bins]
    return tabulate(rows, headers=["tokens", *[m.name for m in res.models]], tablefmt="github")


def _bin_cell(g: BinPrevalence) -> str:
    return f"{_pct(g.prevalence, g.prevalence_se)} (n={g.n_prompts - g.n_trivial})"


def consistency_table(res: ScaleResult) -> str:
    """Per model and threshold: consistent heads, and first-layer agreement and lift pooled and within bins."""
    rows = []
    for m in res.models:
        for t in m.thresholds:
            pooled = t.agreement[-1]
            lifts = [a.lift for a in t.agreement[:-1] if a.lift is not None]
            rows.append(
                [
                    m.name,
                    tau_label(t.threshold),
                    f"{len(t.consistent_heads)} of {m.layers * m.heads}",
                    _heads(t.consistent_heads, 3) or "-",
                    _pct(pooled.first_layer_agreement, pooled.first_layer_agreement_se),
                    _pct(pooled.base_rate),
                    "undefined" if pooled.lift is None else f"{pooled.lift:.2f}",
                    f"{min(lifts):.2f}-{max(lifts):.2f} ({len(lifts)} bins)" if lifts else "undefined",
                ]
            )
    headers = [
        "model",
        "threshold",
        f"heads consistent ≥ {CONSISTENT:.0%}",
        "most consistent",
        "first-layer agreement (all)",
        "base rate (all)",
        "lift (all)",
        "lift within bins (min-max)",
    ]
    return tabulate(rows, headers=headers, tablefmt="github")


def claims_table(res: ScaleResult) -> str:
    """The notes' claims (rows) with each model's verdict and figures (columns)."""
    pairs = {name: pair for pair in res.size.within_family for name in (pair.smaller, pair.larger)}
    rows = [
        ["(a) larger models have fewer sinks, within a family", *[_size_cell(pairs.get(m.name)) for m in res.models]],
        ["(a) across families (no verdict: confounds family)", *[_across_cell(m) for m in res.models]],
        ["(b) middle layers hold the most sinks", *[_middle_cell(m.middle) for m in res.models]],
        ["(c) some heads are consistently sinks", *[_consistent_cell(m) for m in res.models]],
        ["(d) short ~71 %, 10+ tokens ~30-36 %", *[_short_long_cell(m.short_long) for m in res.models]],
    ]
    return tabulate(rows, headers=["claim (tau=0.8)", *[m.name for m in res.models]], tablefmt="github")


def _size_cell(pair: SizePair | None) -> str:
    if pair is None:
        return "no other model of its family"
    defined = [lo for lo in pair.left_out if lo.difference.value is not None]
    weakest = min(defined, key=lambda lo: _z(lo.difference), default=None)
    without = (
        ""
        if weakest is None
        else f"; weakest with one domain left out: without {weakest.domain}, "
        + (f"{_points(weakest.difference)} ({weakest.n_prompts} prompts)")
    )
    return (
        f"**{pair.verdict}**: {pair.smaller} − {pair.larger} = {_points(pair.difference)} ({pair.n_prompts} "
        f"paired prompts){without}"
    )


def _z(diff: Difference) -> float:
    """d / SE, the weakest difference first (0 without an SE)."""
    return (diff.value or 0.0) / diff.se if diff.se else 0.0


def _across_cell(m: ModelScale) -> str:
    if m.params is None:
        return "not in the size table: left out"
    return f"{_params_label(m.params)}: {_pct(m.at(CLAIM_THRESHOLD).group('all').prevalence)}"


def _middle_cell(c: MiddleClaim) -> str:
    depth = "undefined" if c.max_relative_depth is None else f"{c.max_relative_depth:.2f}"
    return (
        f"**{c.verdict}**: thirds {_pct(c.first)} / {_pct(c.middle)} / {_pct(c.last)}; middle − first "
        f"{_points(c.middle_minus_first)}, middle − last {_points(c.middle_minus_last)}; max at L{c.max_layer} "
        f"(depth {depth}, {_pct(c.max_prevalence)}, {THIRDS[c.max_third] if c.max_third is not None else '?'} "
        "third)"
    )


def _consistent_cell(m: ModelScale) -> str:
    c = m.consistent
    heads = m.at(c.threshold).consistent_heads
    robust = "" if c.robust_share is None else f"; some head consistent in {100 * c.robust_share:.1f} % of resamples"
    count = _count(c.n_consistent, c.n_consistent_se)
    return f"**{c.verdict}**: {count} of {c.n_heads}" + (f" ({_heads(heads)})" if heads else "") + robust


def _short_long_cell(c: ShortLongClaim) -> str:
    return (
        f"**{c.verdict}**: {c.short_tokens} tokens {_pct(c.short, c.short_se)} (n={c.short_n}), "
        f"≥ {c.long_min_tokens} tokens {_pct(c.long, c.long_se)} (n={c.long_n}); notes 66-76 % and 30-36 %; "
        f"short − long {_points(c.difference)}"
    )


def across_sentence(size: SizeClaim) -> str:
    across = size.across_families
    order = ", ".join(
        f"{name} ({_params_label(p)}, {_pct(v)})"
        for name, p, v in zip(across.models, across.params, across.prevalence, strict=True)
    )
    rho = "undefined (fewer than 3 sized models)" if across.spearman is None else f"{across.spearman:+.2f}"
    left_out = (
        f" Not in the size table, so left out of the size claim: {', '.join(across.not_sized)}."
        if across.not_sized
        else ""
    )
    return (
        f"Across families, by parameter count: {order}. Spearman's rho of parameter count vs pooled prevalence at "
        f"tau = {size.threshold:g}: {rho}, over {len(across.models)} models. It confounds size with family "
        "(architecture, tokenizer, training data) and rests on a handful of points: it is no evidence about size "
        f"alone.{left_out}"
    )


def domain_cells_table(m: ModelScale, length_bins: list[list[int]]) -> str:
    """Non-trivial prompts (and trivial ones, in brackets) per domain and bin."""
    cells = m.domains[0].cells
    bins = [bin_key(lo, hi) for lo, hi in length_bins]
    lookup = {(c.domain, c.tokens): c for c in cells}
    rows = [[d, *[_n_cell(lookup.get((d, b))) for b in bins]] for d in sorted({c.domain for c in cells})]
    return tabulate(rows, headers=["domain", *bins], tablefmt="github")


def _n_cell(cell: DomainCell | None) -> str:
    if cell is None:
        return "0"
    return f"{cell.n_prompts}" + (f" (+{cell.n_trivial} trivial)" if cell.n_trivial else "")


def domain_table(res: ScaleResult) -> str:
    """Length-matched prevalence, consistent heads and top-10 consistency per model, domain and threshold."""
    rows = []
    for m in res.models:
        for d in m.domains:
            bins = ", ".join(d.shared_bins) or "none"
            for v in d.domains:
                rows.append(
                    [
                        m.name,
                        tau_label(d.threshold),
                        v.domain,
                        v.n_prompts,
                        bins,
                        _pct(v.prevalence, v.prevalence_se),
                        _count(v.n_consistent, v.n_consistent_se),
                        _pct(v.top_consistency, v.top_consistency_se),
                    ]
                )
    headers = [
        "model",
        "threshold",
        "domain",
        "prompts",
        "shared bins",
        "prevalence (length-matched)",
        f"heads consistent ≥ {CONSISTENT:.0%}",
        f"top-{TOP_HEADS} consistency",
    ]
    return tabulate(rows, headers=headers, tablefmt="github")


def domain_verdict_table(res: ScaleResult) -> str:
    """Each specialised domain against prose: prevalence and predictability differences and the verdict."""
    rows = [
        [
            m.name,
            tau_label(d.threshold),
            f"{c.domain} − {c.reference}",
            _points(c.prevalence),
            _points(c.top_consistency),
            f"**{c.verdict}**",
            _heads_diff(c.n_consistent),
            f"**{c.n_consistent_verdict}**",
        ]
        for m in res.models
        for d in m.domains
        for c in d.contrasts
    ]
    headers = [
        "model",
        "threshold",
        "domains",
        "prevalence diff",
        f"top-{TOP_HEADS} consistency diff",
        f"more predictable? (top-{TOP_HEADS})",
        f"diff of heads consistent ≥ {CONSISTENT:.0%}",
        "more predictable? (heads)",
    ]
    return tabulate(rows, headers=headers, tablefmt="github")


def per_layer_figure(res: ScaleResult, out: Path) -> str:
    """Per-layer prevalence (all prompts) against relative depth: one panel per threshold, one line per model."""
    plt = pyplot()
    thresholds = res.settings.thresholds
    fig, axes = plt.subplots(1, len(thresholds), figsize=(5.5 * len(thresholds), 4), squeeze=False)
    for ax, tau in zip(axes[0], thresholds, strict=True):
        for m in res.models:
            t = m.at(tau)
            ax.plot(t.relative_depth, t.per_layer_prevalence, marker=".", label=m.name)
        ax.set(
            xlabel="relative depth (layer / layers)",
            ylabel="fraction of heads that are sinks",
            title=f"per-layer prevalence, {tau_label(tau)}",
            xlim=(0, 1),
        )
        ax.legend(fontsize=7)
    name = save_figure(fig, out, FIGURE)
    plt.close("all")
    return name


def _rule(function: Callable) -> str:
    return "- " + " ".join(inspect.cleandoc(function.__doc__ or "").split())


def scale_report(res: ScaleResult, figure: str) -> str:
    s = res.settings
    models = "; ".join(
        f"`{m.name}` ({m.layers} x {m.heads} heads, {_params_label(m.params)}, `{m.fingerprint[:28]}…`, from "
        f"`{m.source}`)"
        for m in res.models
    )
    parts = [
        f"# Attention sinks across {len(res.models)} models",
        f"Models: {models}. All on the same {s.n_prompts} prompts (set `{s.prompt_set_sha256[:16]}`), thresholds "
        f"{s.thresholds}{' (chance-corrected)' if s.chance_corrected_threshold else ''}. A prompt of one token has "
        "no sink score (trivial); n counts the non-trivial prompts. Prevalence = mean over prompts of the fraction of "
        f"heads that are sinks, ± bootstrap SE over prompts ({s.bootstrap_resamples} resamples); the bin and pooled "
        "values, first-layer agreement and per-layer prevalence are each model's own analysis summary. Length bins "
        "are in each model's own tokens, so one prompt can fall into different bins for different models.",
        "## Prevalence by length bin",
    ]
    for tau in s.thresholds:
        parts += [f"### {tau_label(tau)}", prevalence_table(res, tau)]
    parts += [
        "## Per-layer prevalence against relative depth",
        f"![per-layer prevalence against relative depth]({figure})",
        "Relative depth of layer l = l / n_layers; all prompts pooled.",
        "## Consistent heads and first-layer agreement",
        f"Consistency of a head = the fraction of non-trivial prompts on which it is a sink; consistent = "
        f"≥ {s.consistent_at:.0%}. First-layer agreement: over heads h that are sinks in layer 0, the fraction of "
        "later layers where head h is a sink; lift = agreement / base rate. The pooled lift mixes in the length "
        "effect (short prompts have more sinks everywhere); the within-bin range is the one to read.",
        consistency_table(res),
        "## The original notes' claims",
        f"Each claim at tau = {s.claim_threshold:g}, the notes' threshold; their figures came from Llama-3.2-1B and "
        "counted query 0 (a sink by construction), which is excluded here.",
        claims_table(res),
        across_sentence(res.size),
        "Verdict rules:",
        "\n".join(_rule(f) for f in (size_verdict, middle_verdict, consistent_verdict, short_long_verdict)),
        "## Domains, length-matched",
        f"Domains: every prompt domain but {', '.join(s.length_bin_domains)} (1-3-word sentence openings: a length "
        f"bin, not a domain), compared with {s.reference_domain} within the length bins where every compared domain "
        f"has at least {s.min_cell_prompts} non-trivial prompts. Length-matched value: "
        + " ".join(inspect.cleandoc(length_matched.__doc__ or "").split())
        + " Predictability: the mean length-matched consistency of the ten most consistent heads (top-10), and the "
        f"number of heads whose length-matched consistency is ≥ {s.consistent_at:.0%}, each ± its bootstrap SE.",
        "### Prompts per domain and length bin",
    ]
    for m in res.models:
        parts += [f"{m.name}:", domain_cells_table(m, s.length_bins)]
    parts += [
        "### Length-matched prevalence and consistency",
        domain_table(res),
        "### Do specialised prompts make sink heads more predictable than prose?",
        domain_verdict_table(res),
        _rule(predictability_verdict),
        "## Provenance",
        f"Written {res.provenance.date} by `{res.provenance.command or 'sink_eval.analyses.scale'}`; versions "
        f"{', '.join(f'{k} {v}' for k, v in res.provenance.versions.items())}. Inputs (results.json SHA-256): "
        + "; ".join(f"`{m.source}` `{m.results_sha256[:16]}`" for m in res.models)
        + ".",
    ]
    return "\n\n".join(parts) + "\n"


def write_scale(res: ScaleResult, out: Path, overwrite: bool = False, inputs: Sequence[Path] = ()) -> None:
    """DIR/results.json, DIR/report.md and DIR/per_layer_prevalence.png, all or nothing."""
    render = lambda tmp: scale_report(res, per_layer_figure(res, tmp))  # noqa: E731
    write_report_dir(out, "scale", render, res.to_json(), overwrite=overwrite, inputs=inputs)
