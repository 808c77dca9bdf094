"""The report of `sink-eval compare`: two analyses side by side on the prompts they share."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from pathlib import Path

from tabulate import tabulate

from sink_eval.analyses.analyze import AnalysisResult, restricted
from sink_eval.core.errors import SinkEvalError
from sink_eval.reports.common import num, pct, pyplot, save_figure, tau_label, write_report_dir


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
            rows.append([tau_label(tau), ga.tokens, pct(pa), pct(pb), diff, num(ga.lift), num(gb.lift)])
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
