"""What every command's report uses: percentages and numbers as text, figures (matplotlib without a display), and
an output directory of results.json, report.md and figures written atomically."""

from __future__ import annotations

import json
from collections.abc import Callable, Sequence
from pathlib import Path

from sink_eval.core.files import write_output_dir


def pct(value: float | None) -> str:
    return "undefined" if value is None else f"{100 * value:.1f}%"


def num(value: float | None, digits: int = 2) -> str:
    return "undefined" if value is None else f"{value:.{digits}f}"


def tau_label(threshold: float) -> str:
    return f"tau={threshold:g}"


def pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def save_figure(fig, out: Path, name: str) -> str:
    fig.tight_layout()
    fig.savefig(out / name, dpi=110)
    return name


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
