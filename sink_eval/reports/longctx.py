"""The report of `sink-eval longctx`: the policy × length table, the verdicts against controls, the passkey heat map."""

from __future__ import annotations

import json
from pathlib import Path

from tabulate import tabulate

from sink_eval.core.files import write_output_dir
from sink_eval.evals.longctx import INFORMATIVE_FLOOR, LengthRow, LongctxResult, Run
from sink_eval.reports.common import pyplot, save_figure

HEATMAP = "passkey_heatmap.png"


def _acc(value: float | None, se: float | None) -> str:
    if value is None:
        return "uninformative"
    return f"{100 * value:.0f} % ± {100 * (se or 0.0):.0f}"


def _bytes(n: int) -> str:
    return f"{n / 2**20:.2f} MiB" if abs(n) >= 2**20 else f"{n / 2**10:.1f} KB"


def _speedups(row: LengthRow) -> str:
    values = (row.speedup, row.prefill_speedup, row.decode_speedup)
    return " / ".join("-" if v is None else f"{v:.2f}" for v in values)


def summary_table(res: LongctxResult) -> str:
    """Policy × length: passkey accuracy ± SE, perplexity ratio, fraction of heads / KV groups, KV saved, speed-up."""
    rows = []
    for r in res.runs:
        for row in r.lengths:
            ratio = (
                "1 (reference)"
                if row.perplexity_ratio is None
                else f"{row.perplexity_ratio:.4f} ± {row.perplexity_ratio_se or 0.0:.4f}"
            )
            rows.append(
                [
                    r.label,
                    row.length,
                    _acc(row.accuracy, row.accuracy_se),
                    f"{row.perplexity:.2f}",
                    ratio,
                    f"{100 * r.fraction_heads:.1f} %",
                    f"{100 * r.fraction_kv_groups:.1f} %",
                    f"{_bytes(row.kv_saved_bytes)} of {_bytes(row.kv_bytes + row.kv_saved_bytes)}",
                    _speedups(row),
                ]
            )
    headers = [
        "run",
        "L",
        "passkey",
        "ppl",
        "ppl ratio",
        "heads",
        "KV groups",
        "KV saved",
        "speed-up: all / prefill / decode",
    ]
    return tabulate(rows, headers=headers, tablefmt="github")


def verdict_table(res: LongctxResult) -> str:
    rows = []
    for c in res.comparisons:
        pk = c.passkey
        rows.append(
            [
                c.label,
                c.length,
                "uninformative" if pk is None else f"{pk.policy:.2f} vs {pk.control_mean:.2f} (margin {pk.margin:.2f})",
                "-" if pk is None else pk.verdict,
                f"{-c.neg_perplexity_ratio.policy:.4f} vs {-c.neg_perplexity_ratio.control_mean:.4f} "
                f"(margin {c.neg_perplexity_ratio.margin:.4f})",
                c.neg_perplexity_ratio.verdict,
            ]
        )
    headers = ["policy", "L", "passkey: policy vs controls", "verdict", "ppl ratio: policy vs controls", "verdict"]
    return tabulate(rows, headers=headers, tablefmt="github")


def reproduction_table(res: LongctxResult) -> str:
    """The StreamingLLM reproduction: perplexity of each attention restriction and its ratio to full attention."""
    rep = res.streaming_llm
    assert rep is not None, "only a result with the reproduction has its table"
    full = rep.rows[-1].perplexity
    rows = [[r.label, f"{r.perplexity:.2f} ± {r.perplexity_se:.2f}", f"{r.perplexity / full:.2f}"] for r in rep.rows]
    return tabulate(rows, headers=["every head of the full-attention layers", "ppl", "vs full"], tablefmt="github")


def _heatmap(res: LongctxResult, out: Path) -> str:
    """Passkey accuracy over (L, d), one panel per non-control run; uninformative cells hatched."""
    import numpy as np

    plt = pyplot()
    shown: list[Run] = [r for r in res.runs if r.role != "control"]
    lengths, depths = res.settings.lengths, res.settings.depths
    fig, axes = plt.subplots(
        1,
        len(shown) + 1,  # the last, narrow: the colour bar's own axes, so that tight_layout keeps it off the panels
        figsize=(1.8 + 2.6 * len(shown), 1.2 + 0.5 * len(depths)),
        squeeze=False,
        gridspec_kw={"width_ratios": [1.0] * len(shown) + [0.06]},
    )
    for ax, r in zip(axes[0][:-1], shown, strict=True):
        grid = np.array(
            [[np.nan if cell.accuracy is None else cell.accuracy for cell in row.passkey] for row in r.lengths]
        ).T  # (depths, lengths); NaN: a plan's uninformative cell, not run
        image = ax.imshow(grid, cmap="RdYlGn", vmin=0, vmax=1, aspect="auto", origin="upper")
        for j, row in enumerate(r.lengths):
            for i, cell in enumerate(row.passkey):
                value = "-" if cell.accuracy is None else f"{cell.accuracy:.1f}"
                ax.text(j, i, value + ("" if cell.informative else "*"), ha="center", va="center")
        ax.set_xticks(range(len(lengths)), [str(length) for length in lengths])
        ax.set_yticks(range(len(depths)), [f"{d:g}" for d in depths])
        ax.set(xlabel="tokens L", ylabel="needle depth d", title=r.label[:40])
    fig.colorbar(image, cax=axes[0][-1])
    fig.suptitle(
        f"{res.model.name}: passkey accuracy (* uninformative: unpatched < {INFORMATIVE_FLOOR:g}; - not run there)"
    )
    name = save_figure(fig, out, HEATMAP)
    plt.close("all")
    return name


def markdown(res: LongctxResult, figure: str) -> str:
    s = res.settings
    return "\n\n".join(
        [
            f"# Long-context fidelity of {res.model.name}",
            f"![passkey accuracy by length and depth]({figure})",
            f"Model `{res.model.name}` ({res.model.layers} layers x {res.model.heads} heads, {res.model.kv_heads} KV "
            f"heads), fingerprint `{res.model.fingerprint}`; lengths {s.lengths}, depths {s.depths}, {s.trials} "
            f"trials per cell (seed {s.seed}), control seeds {s.control_seeds}; haystacks and perplexity from the "
            f"evaluation long passages {', '.join(s.passages)}; {s.threads} threads on {s.device}; versions "
            f"{json.dumps(res.provenance.versions)}.",
            "Passkey: a 5-digit key at depth d of real text, L tokens in all; correct iff the greedy answer starts "
            f"with the key. A cell where the unpatched model scores below {INFORMATIVE_FLOOR:g} is uninformative: no "
            "plan is run on its trials, and it is left out of a run's accuracy. Perplexity ratio = ppl(run) / "
            "ppl(unpatched) over the same passages, each in one forward pass. KV saved is measured from the cache "
            "objects; the speed-ups are ratios of wall times of the same generate calls (those of the informative "
            "cells): whole calls, their prefill (to the end of the prompt's forward pass) and their decode steps, on "
            "a machine that may be shared.",
            "## Policy x length",
            summary_table(res),
            "## Against random plans of the same size",
            "A policy *chooses well* where it beats the mean of its random controls by more than max(the controls' "
            "spread over seeds, 2 x its own SE); *chooses worse* where it trails by as much.",
            verdict_table(res) if res.comparisons else "(no policy with controls)",
            *_reproduction(res),
        ]
    )


def _reproduction(res: LongctxResult) -> list[str]:
    rep = res.streaming_llm
    if rep is None:
        return []
    return [
        f"## StreamingLLM reproduction, {rep.length} tokens, cache {rep.cache}",
        f"The paper: {rep.paper}. Here, the evaluation long passages (keys keep their original positions).",
        reproduction_table(res),
    ]


def write_longctx(res: LongctxResult, out: Path, overwrite: bool = False) -> None:
    """results.json, report.md and the heat map, written atomically as a `longctx` output directory."""

    def fill(tmp: Path) -> None:
        (tmp / "results.json").write_text(json.dumps(res.to_json(), indent=1), encoding="utf-8")
        (tmp / "report.md").write_text(markdown(res, _heatmap(res, tmp)) + "\n", encoding="utf-8")

    write_output_dir(Path(out), fill, "longctx", overwrite)
