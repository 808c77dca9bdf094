"""Tables (tabulate), figures (matplotlib) and the Markdown report of one or two result sets."""

from __future__ import annotations

import json
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING

from tabulate import tabulate

from sink_eval.analyses.analyze import MIN_SCORED_TOKENS, SCHEMA, AnalysisResult, Settings, ThresholdSummary, restricted
from sink_eval.core.errors import SinkEvalError
from sink_eval.core.files import write_output_dir
from sink_eval.core.results import read_json_file

if TYPE_CHECKING:
    from sink_eval.evals.accuracy import EvalResult
    from sink_eval.evals.patch_eval import PatchEvalResult

ORIGINAL_NOTES = (
    "The original research notes (Llama-3.2-1B, tau = 0.8) report ~35 % sink heads overall, ~71 % for 1-3-token "
    "prompts and ~30-36 % for 10+ tokens, with first-layer agreement ~74 % for short prompts falling to ~27 % for "
    "long ones. Their 1-3-token figure counts query 0, which attends only to itself and so is a sink by "
    "construction; here query 0 is excluded and a one-token prompt is reported as trivial. Their agreement was not "
    "set beside a base rate: the lift column of the agreement table above does that."
)


def _pct(value: float | None) -> str:
    return "undefined" if value is None else f"{100 * value:.1f}%"


def _num(value: float | None, digits: int = 2) -> str:
    return "undefined" if value is None else f"{value:.{digits}f}"


def tau_label(threshold: float) -> str:
    return f"tau={threshold:g}"


def prevalence_table(res: AnalysisResult) -> str:
    rows = []
    for tokens_group in res.summary[0].groups():
        cells: list[int | str] = [tokens_group.tokens]
        for summary in res.summary:
            group = summary.group(tokens_group.tokens)
            se = group.prevalence_se
            cells.append(_pct(group.prevalence) + (f" ± {100 * se:.1f}" if se else ""))
        cells += [tokens_group.n_prompts, tokens_group.n_trivial]
        rows.append(cells)
    headers = ["tokens", *[tau_label(s.threshold) for s in res.summary], "prompts", "trivial"]
    return tabulate(rows, headers=headers, tablefmt="github")


def agreement_table(res: AnalysisResult) -> str:
    rows = [
        [
            tau_label(summary.threshold),
            group.tokens,
            _pct(group.first_layer_agreement),
            _pct(group.base_rate),
            _num(group.lift),
            _pct(group.recall),
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
    rows = [[layer] + [_pct(g.per_layer_prevalence[layer]) for g in bins] for layer in range(layers)]
    return tabulate(rows, headers=["layer", *[g.tokens for g in bins]], tablefmt="github")


def top_heads_table(summary: ThresholdSummary) -> str:
    rows = [
        [f"L{h.layer}.H{h.head}", _pct(h.consistency), _num(h.mean_sink_score, 3)] for h in summary.top_consistent_heads
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


def pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def save_figure(fig, out: Path, name: str) -> str:
    fig.tight_layout()
    fig.savefig(out / name, dpi=110)
    return name


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
            f"Spearman correlation of prompt length with prevalence: {_num(summary.spearman_length_vs_prevalence)}.",
            top_heads_table(summary),
        ]
    return "\n\n".join(parts) + "\n"


def write_report_dir(
    out: Path,
    kind: str,
    render: Callable[[Path], str],
    results: dict | None = None,
    name: str = "report.md",
    overwrite: bool = False,
    inputs: Sequence[Path] = (),
) -> None:
    """DIR/results.json (when `results`), DIR/`name` with the text `render(dir)` returns after drawing its figures
    into dir: all or nothing, as a sink_eval output directory of `kind` (`files.write_output_dir`)."""

    def fill(tmp: Path) -> None:
        if results is not None:
            (tmp / "results.json").write_text(json.dumps(results, indent=1))
        (tmp / name).write_text(render(tmp))

    write_output_dir(out, fill, kind, overwrite, inputs)


def has_scored_prompts(res: AnalysisResult) -> bool:
    return any(p.n_tokens >= MIN_SCORED_TOKENS for p in res.prompts)


def write_analysis(res: AnalysisResult, out: Path, overwrite: bool = False) -> None:
    """DIR/results.json, DIR/report.md and the PNG figures, all or nothing."""
    render = lambda tmp: markdown_report(res, _analysis_figures(res, tmp))  # noqa: E731
    write_report_dir(out, "analyze", render, res.to_json(), overwrite=overwrite)


def read_results(path: Path) -> AnalysisResult:
    """A results.json (or the directory that holds one), every field checked."""
    path = Path(path)
    file = path / "results.json" if path.is_dir() else path
    fix = "give a directory written by this version's `sink-eval analyze`, or re-run it"
    return AnalysisResult.from_json(read_json_file(file, SCHEMA, fix), file)


def shared_prompts(
    a: AnalysisResult, b: AnalysisResult, label_a: str, label_b: str
) -> tuple[AnalysisResult, AnalysisResult, str]:
    """The two results over the prompts they share (same id and text), and a sentence saying what was compared.
    Results of one prompt set are compared as they are; sets that share no prompt are refused."""
    if a.settings.prompt_set_sha256 == b.settings.prompt_set_sha256:
        return a, b, f"Both on the same {len(a.prompts)} prompts."
    keys_a = {(p.id, p.text_sha256) for p in a.prompts}
    keys_b = {(p.id, p.text_sha256) for p in b.prompts}
    shared = keys_a & keys_b
    if not shared:
        raise SinkEvalError(
            f"{label_a} and {label_b} were measured on different prompt sets that share no prompt (same id and "
            "text): there is nothing to compare"
        )
    return (
        restricted(a, shared),
        restricted(b, shared),
        f"The prompt sets differ (sha256 `{a.settings.prompt_set_sha256[:12]}` vs "
        f"`{b.settings.prompt_set_sha256[:12]}`): compared on the {len(shared)} prompts they share (same id and "
        f"text), summarised again from their stored scores; left out: {len(keys_a - shared)} prompts only in "
        f"{label_a}, {len(keys_b - shared)} only in {label_b}.",
    )


def compare_report(a: AnalysisResult, b: AnalysisResult, label_a: str, label_b: str) -> Callable[[Path], str]:
    """A function that draws the comparison figure (prevalence by bin) into a directory and returns the Markdown
    comparison of two result sets (prevalence and agreement by bin, over the prompts they share)."""
    shared = [t for t in a.settings.thresholds if t in b.settings.thresholds]
    if not shared:
        raise SinkEvalError(
            f"the two result sets share no threshold ({a.settings.thresholds} vs {b.settings.thresholds})"
        )
    a, b, prompts_note = shared_prompts(a, b, label_a, label_b)
    rows = []
    for tau in shared:
        for ga in a.at(tau).groups():
            gb = b.at(tau).group(ga.tokens)
            pa, pb = ga.prevalence, gb.prevalence
            diff = f"{100 * (pb - pa):+.1f}" if pa is not None and pb is not None else "undefined"
            rows.append([tau_label(tau), ga.tokens, _pct(pa), _pct(pb), diff, _num(ga.lift), _num(gb.lift)])
    table = tabulate(
        rows,
        headers=[
            "threshold",
            "tokens",
            f"prevalence {label_a}",
            f"prevalence {label_b}",
            "diff (points)",
            f"lift {label_a}",
            f"lift {label_b}",
        ],
        tablefmt="github",
    )

    def render(out: Path) -> str:
        plt = pyplot()
        fig, ax = plt.subplots(figsize=(7, 4))
        for res, label in ((a, label_a), (b, label_b)):
            for tau in shared:
                bins = [g for g in res.at(tau).bins if g.prevalence is not None]
                ax.plot([g.tokens for g in bins], [g.prevalence for g in bins], marker="o", label=f"{label} {tau:g}")
        ax.set(xlabel="prompt length (tokens)", ylabel="sink prevalence", title="sink prevalence by length bin")
        ax.legend(fontsize=7)
        name = save_figure(fig, out, "compare_prevalence.png")
        plt.close("all")
        return (
            f"# {label_a} vs {label_b}\n\n![prevalence by length bin]({name})\n\n"
            f"{label_a}: {a.model.name} ({a.model.fingerprint[:24]}…); "
            f"{label_b}: {b.model.name} ({b.model.fingerprint[:24]}…). {prompts_note}\n\n"
            f"{table}\n"
        )

    return render


def write_compare(
    a: AnalysisResult,
    b: AnalysisResult,
    labels: tuple[str, str],
    out: Path,
    overwrite: bool = False,
    inputs: Sequence[Path] = (),
) -> str:
    """DIR/compare.md and its figure, all or nothing; returns the Markdown."""
    render = compare_report(a, b, *labels)
    write_report_dir(out, "compare", render, name="compare.md", overwrite=overwrite, inputs=inputs)
    return (Path(out) / "compare.md").read_text()


def _mib(n_bytes: int) -> str:
    return f"{n_bytes / 2**20:.2f}"


def _fraction_groups(value: float | None) -> str:
    return "-" if value is None else _pct(value)


def patch_table(res: PatchEvalResult) -> str:
    """One row per policy: the prompts it is evaluated on, heads and KV groups planned, fidelity, speed-ups beside
    their ceilings, KV memory saved."""
    rows = [
        [
            row.label,
            row.evaluation,
            _pct(row.fidelity.fraction_heads),
            _fraction_groups(row.fidelity.fraction_groups),
            f"{max(row.fidelity.kl, 0.0):.4f}",  # a KL below 0 is rounding error
            _pct(row.fidelity.top1),
            _pct(row.greedy.agreement),
            _num(row.greedy.prefix, 1),
            f"{row.speed.prefill_speedup:.2f} ({row.ceilings.prefill:.2f})",
            f"{row.speed.decode_speedup:.2f} ({row.ceilings.decode:.2f})",
            f"{_mib(row.kv.saved_bytes)} of {_mib(row.kv.unpatched_bytes)}",
        ]
        for row in res.policies
    ]
    return tabulate(
        rows,
        headers=[
            "policy",
            "prompts",
            "heads",
            "KV groups",
            "KL (nats)",
            "top-1",
            "greedy agree",
            "greedy prefix",
            "prefill x (ceiling)",
            "decode x (ceiling)",
            "KV MiB saved",
        ],
        tablefmt="github",
    )


def _patch_figure(res: PatchEvalResult, out: Path) -> str:
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(7, 4.5))
    for row in res.policies:
        x = max(row.fidelity.kl, 1e-6)
        ax.scatter([x], [row.speed.prefill_speedup], marker="o")
        ax.scatter([x], [row.ceilings.prefill], marker="_", s=200, color="grey")
        ax.annotate(row.label, (x, row.speed.prefill_speedup), fontsize=7, xytext=(4, 4), textcoords="offset points")
    ax.axhline(1.0, color="grey", lw=0.5)
    ax.set(
        xscale="log",
        xlabel="next-token KL(unpatched || patched), nats",
        ylabel="prefill speed-up (grey: ceiling)",
        title=f"{res.model.name}: speed-up vs fidelity, {res.settings.speed_prompt.tokens} tokens",
    )
    name = save_figure(fig, out, "speedup_vs_fidelity.png")
    plt.close("all")
    return name


def patch_report(res: PatchEvalResult, figure: str) -> str:
    model, settings = res.model, res.settings
    long = ""
    if settings.long_evaluation_prompts:
        cut = f", cut to {settings.long_tokens} tokens" if settings.long_tokens else ""
        long = (
            f" Streaming policies are evaluated on long prompts ({len(settings.long_evaluation_prompts)}: "
            f"{', '.join(settings.long_evaluation_prompts)}{cut}; greedy on "
            f"{len(settings.long_greedy_prompts)} of them) and calibrated on the calibration prompts plus "
            f"{len(settings.long_calibration_prompts)} long ones: on a prompt of N <= s + w tokens a streaming plan "
            "is the unpatched model exactly, so the default prompts, mostly short, would show a trivially perfect "
            "fidelity."
        )
    return (
        "\n\n".join(
            [
                f"# Copy and streaming patches on {model.name}",
                f"Model `{model.name}` ({model.layers} x {model.heads} heads, {model.kv_heads} KV heads), "
                f"fingerprint `{model.fingerprint}`; {len(settings.evaluation_prompts)} evaluation prompts, "
                f"{len(settings.calibration_prompts)} calibration prompts (disjoint); speed on "
                f"`{settings.speed_prompt.id}` ({settings.speed_prompt.tokens} tokens), medians of "
                f"{settings.speed_rounds} paired rounds, {settings.threads} threads on {settings.device}." + long,
                "Heads / KV groups: fraction of (layer, head) pairs the plan copies or streams, and of KV groups all "
                "of whose query heads it does (a copy plan drops their cache; a streaming plan keeps s + w entries "
                "of it). KL: mean next-token KL(unpatched || patched) over up to 32 positions per prompt; top-1: "
                "argmax agreement there; greedy: 32-token greedy continuations of the shortest prompts, fraction of "
                "equal tokens and mean common prefix. Speed-ups: median of unpatched / patched times taken back to "
                "back; the ceiling 1 / (1 - f a) uses the fraction f of attention work the plan removes (copy: the "
                "fraction of heads copied; streaming: the fraction streamed times 1 - rho, rho the share of a head's "
                "work a streamed head still does) and the measured attention share a. KV saved: bytes of the plan's "
                "cache vs the model's own cache after the decode run, measured from the cache objects.",
                patch_table(res),
                f"![speed-up vs fidelity]({figure})",
            ]
        )
        + "\n"
    )


def write_patch_eval(res: PatchEvalResult, out: Path, overwrite: bool = False) -> None:
    """DIR/results.json, DIR/report.md and the figure, all or nothing."""
    render = lambda tmp: patch_report(res, _patch_figure(res, tmp))  # noqa: E731
    write_report_dir(out, "patch-eval", render, res.to_json(), overwrite=overwrite)


def eval_table(res: EvalResult) -> str:
    """Accuracy ± stderr per task, unpatched then each policy (with its change against unpatched ± paired SE)."""
    tasks = res.settings.tasks
    rows = []
    for run in res.runs:
        cells = []
        for task in tasks:
            t = run.tasks[task]
            cell = f"{100 * t.acc:.1f} ± {100 * t.acc_stderr:.1f}"
            if t.change is not None:
                assert t.change_se is not None, "a change is always stored with its paired SE"
                cell += f" ({100 * t.change:+.1f} ± {100 * t.change_se:.1f})"
            cells.append(cell)
        speedup = f"{run.speedup:.2f}" if run.speedup is not None else "1.00"
        rows.append([run.label, _pct(run.fraction_copied), *cells, f"{run.model_s:.0f}", speedup])
    headers = ["policy", "heads copied", *[f"{t} acc % ({res.settings.splits[t]})" for t in tasks]]
    return tabulate(rows, headers=[*headers, "forward s", "speed-up"], tablefmt="github")


def eval_report(res: EvalResult) -> str:
    notes = "; ".join(f"{task}: {note}" for task, note in res.settings.split_notes.items())
    limit = res.settings.limit
    return (
        "\n\n".join(
            [
                f"# Accuracy of {res.model.name} under copy plans (lm-evaluation-harness)",
                f"Fingerprint `{res.model.fingerprint}`; "
                + (f"the first {limit} documents of each task" if limit else "every document of each task")
                + f". Splits: {notes or 'lm-eval defaults'}. Accuracy ± lm-eval's standard error; in brackets the "
                "change against unpatched on the same documents ± its paired standard error (points). Forward s: "
                "seconds in the model's forward passes (per-prompt policies include their probe); speed-up = "
                "unpatched / policy forward s.",
                eval_table(res),
            ]
        )
        + "\n"
    )


def write_eval(res: EvalResult, out: Path, overwrite: bool = False) -> None:
    """DIR/results.json and DIR/report.md, all or nothing."""
    write_report_dir(out, "eval", lambda tmp: eval_report(res), res.to_json(), overwrite=overwrite)
