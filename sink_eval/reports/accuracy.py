"""The report of `sink-eval eval`: lm-eval accuracy per task, unpatched and under each copy policy, with the change
against unpatched."""

from __future__ import annotations

from pathlib import Path

from tabulate import tabulate

from sink_eval.evals.accuracy import EvalResult
from sink_eval.reports.common import pct, write_report_dir


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
        rows.append([run.label, pct(run.fraction_copied), *cells, f"{run.model_s:.0f}", speedup])
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
