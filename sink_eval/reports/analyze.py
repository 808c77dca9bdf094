"""The report of `sink-eval analyze`: prevalence and first-layer agreement tables, per-layer and top-head tables,
the layer x head sink-score heatmap and the other figures, and the Markdown report."""

from __future__ import annotations

import json
from pathlib import Path

from tabulate import tabulate

from sink_eval.analyses.analyze import MIN_SCORED_TOKENS, AnalysisResult, Settings, ThresholdSummary
from sink_eval.reports.common import num, pct, pyplot, save_figure, tau_label, write_report_dir

ORIGINAL_NOTES = (
    "The original research notes (Llama-3.2-1B, tau = 0.8) report ~35 % sink heads overall, ~71 % for 1-3-token "
    "prompts and ~30-36 % for 10+ tokens, with first-layer agreement ~74 % for short prompts falling to ~27 % for "
    "long ones. Their 1-3-token figure counts query 0, which attends only to itself and so is a sink by "
    "construction; here query 0 is excluded and a one-token prompt is reported as trivial. Their agreement was not "
    "set beside a base rate: the lift column of the agreement table above does that."
)


def prevalence_table(res: AnalysisResult) -> str:
    rows = []
    for tokens_group in res.summary[0].groups():
        cells: list[int | str] = [tokens_group.tokens]
        for summary in res.summary:
            group = summary.group(tokens_group.tokens)
            se = group.prevalence_se
            cells.append(pct(group.prevalence) + (f" ± {100 * se:.1f}" if se else ""))
        cells += [tokens_group.n_prompts, tokens_group.n_trivial]
        rows.append(cells)
    headers = ["tokens", *[tau_label(s.threshold) for s in res.summary], "prompts", "trivial"]
    return tabulate(rows, headers=headers, tablefmt="github")


def agreement_table(res: AnalysisResult) -> str:
    rows = [
        [
            tau_label(summary.threshold),
            group.tokens,
            pct(group.first_layer_agreement),
            pct(group.base_rate),
            num(group.lift),
            pct(group.recall),
            group.prompts_with_layer0_sink,
        ]
        for summary in res.summary
        for group in summary.groups()
        if group.prevalence is not None
    ]
    return tabulate(
        rows,
        headers=["threshold", "tokens", "agreement", "base rate", "lift", "recall", "prompts w/ L0 sink"],
        tablefmt="github",
    )


def per_layer_table(summary: ThresholdSummary, layers: int) -> str:
    bins = [g for g in summary.bins if g.per_layer_prevalence]
    rows = [[layer] + [pct(g.per_layer_prevalence[layer]) for g in bins] for layer in range(layers)]
    return tabulate(rows, headers=["layer", *[g.tokens for g in bins]], tablefmt="github")


def top_heads_table(summary: ThresholdSummary) -> str:
    rows = [
        [f"L{h.layer}.H{h.head}", pct(h.consistency), num(h.mean_sink_score, 3)] for h in summary.top_consistent_heads
    ]
    return tabulate(rows, headers=["head", "consistency", "mean sink score"], tablefmt="github")


def _analysis_figures(res: AnalysisResult, out: Path) -> list[str]:
    """The heatmap, prevalence-vs-length and per-layer figures; none when no prompt is non-trivial."""
    scored = [p for p in res.prompts if p.n_tokens >= MIN_SCORED_TOKENS]
    if not scored:
        return []
    plt = pyplot()
    import numpy as np

    name = res.model.name
    files = []
    mean_scores = np.nanmean(np.array([p.sink_score for p in scored], dtype=float), axis=0)
    fig, ax = plt.subplots(figsize=(1 + 0.5 * res.model.heads, 1 + 0.22 * res.model.layers))
    image = ax.imshow(mean_scores, aspect="auto", cmap="magma", vmin=0, vmax=1)
    ax.set(xlabel="head", ylabel="layer", title=f"{name}: mean sink score (A[i,0], query 0 excluded)")
    fig.colorbar(image, ax=ax)
    files.append(save_figure(fig, out, "sink_heatmap.png"))

    fig, ax = plt.subplots(figsize=(7, 4))
    lengths = [p.n_tokens for p in scored]
    for summary in res.summary:
        prevalence = [float(np.mean(np.array(p.sink_score, dtype=float) >= summary.threshold)) for p in scored]
        ax.scatter(lengths, prevalence, s=12, label=tau_label(summary.threshold))
    ax.set(
        xscale="log",
        xlabel="prompt length (tokens)",
        ylabel="fraction of heads that are sinks",
        title=f"{name}: sink prevalence vs length (fixed threshold)",
    )
    ax.legend()
    files.append(save_figure(fig, out, "prevalence_vs_length.png"))

    first = res.summary[0]
    fig, ax = plt.subplots(figsize=(7, 4))
    for group in first.bins:
        if group.per_layer_prevalence:
            ax.plot(group.per_layer_prevalence, marker=".", label=f"{group.tokens} tokens")
    ax.set(
        xlabel="layer",
        ylabel="fraction of heads that are sinks",
        title=f"{name}: per-layer prevalence, {tau_label(first.threshold)}",
    )
    ax.legend(fontsize=7)
    files.append(save_figure(fig, out, "per_layer_prevalence.png"))
    plt.close("all")
    return files


NO_NONTRIVIAL_PROMPT = "no non-trivial prompt: every prompt has one token, so no sink score is defined"
NO_FIGURE = "(no figure: no non-trivial prompt, i.e. none of at least two tokens)"


def _figure(alt: str, figures: list[str], index: int) -> str:
    return f"![{alt}]({figures[index]})" if figures else NO_FIGURE


def truncation_note(settings: Settings) -> str:
    if not settings.truncated:
        return f"No prompt was longer than max_tokens = {settings.max_tokens}."
    cut = ", ".join(f"`{t.id}` ({t.original_tokens} tokens)" for t in settings.truncated)
    return (
        f"{len(settings.truncated)} prompts were cut to their first max_tokens = {settings.max_tokens} tokens: {cut}."
    )


def markdown_report(res: AnalysisResult, figures: list[str]) -> str:
    """The report of an analysis; `figures` as `_analysis_figures` drew them (none: says why)."""
    model = res.model
    first = res.summary[0]
    parts = [
        f"# Attention sinks of {model.name}",
        _figure("mean sink score per layer and head", figures, 0),
        f"Model `{model.name}` ({model.layers} layers x {model.heads} heads, {model.kv_heads} KV heads, "
        f"{model.dtype}), fingerprint `{model.fingerprint}`; {len(res.prompts)} prompts (set "
        f"`{res.settings.prompt_set_sha256[:16]}`); versions {json.dumps(res.provenance.versions)}.",
        truncation_note(res.settings),
        "Sink score of a head = mean over queries i = 1..N-1 of its attention to the first token; a sink head has "
        "sink score >= tau. Prevalence = mean over prompts of the fraction of heads that are sinks (± bootstrap "
        "standard error over prompts).",
        "## Prevalence by prompt length and threshold",
        prevalence_table(res),
        _figure("prevalence vs length", figures, 1),
        "## First-layer agreement (the original hypothesis) against its base rate",
        "Agreement: over heads h that are sinks in layer 0, the fraction of later layers where head h is a sink. "
        "Base rate: the fraction of all later-layer heads that are sinks. Lift = agreement / base rate (1 = no "
        "better than guessing from the base rate). Recall: the fraction of later-layer sinks whose head index is a "
        "layer-0 sink. Read the rows of one length bin: the `all` row pools lengths, and short prompts have both "
        "more layer-0 sinks and more sinks in every layer, so its lift mixes that length effect in (Simpson's "
        "paradox) even where no single bin shows any lift.",
        agreement_table(res),
        "## Beside the original notes",
        ORIGINAL_NOTES,
        f"## Per-layer prevalence, {tau_label(first.threshold)}",
        _figure("per-layer prevalence", figures, 2),
        per_layer_table(first, model.layers),
    ]
    for summary in res.summary:
        parts += [
            f"## Most consistent sink heads, {tau_label(summary.threshold)}",
            f"Spearman correlation of prompt length with prevalence: {num(summary.spearman_length_vs_prevalence)}.",
            top_heads_table(summary),
        ]
    return "\n\n".join(parts) + "\n"


def has_scored_prompts(res: AnalysisResult) -> bool:
    return any(p.n_tokens >= MIN_SCORED_TOKENS for p in res.prompts)


def write_analysis(res: AnalysisResult, out: Path, overwrite: bool = False) -> None:
    """DIR/results.json, DIR/report.md and the PNG figures, all or nothing."""
    render = lambda tmp: markdown_report(res, _analysis_figures(res, tmp))  # noqa: E731
    write_report_dir(out, "analyze", render, res.to_json(), overwrite=overwrite)
