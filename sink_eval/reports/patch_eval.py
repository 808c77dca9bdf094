"""The report of `sink-eval patch-eval`: per policy, heads planned, fidelity, speed-ups beside their ceilings, KV
memory; a figure of the fidelity against the fraction planned."""

from __future__ import annotations

from pathlib import Path

from tabulate import tabulate

from sink_eval.evals.patch_eval import PatchEvalResult
from sink_eval.reports.common import num, pct, pyplot, save_figure, write_report_dir


def _mib(n_bytes: int) -> str:
    return f"{n_bytes / 2**20:.2f}"


def _fraction_groups(value: float | None) -> str:
    return "-" if value is None else pct(value)


def patch_table(res: PatchEvalResult) -> str:
    """One row per policy: the prompts it is evaluated on, heads and KV groups planned, fidelity, speed-ups beside
    their ceilings, KV memory saved."""
    rows = [
        [
            row.label,
            row.evaluation,
            pct(row.fidelity.fraction_heads),
            _fraction_groups(row.fidelity.fraction_groups),
            f"{max(row.fidelity.kl, 0.0):.4f}",  # a KL below 0 is rounding error
            pct(row.fidelity.top1),
            pct(row.greedy.agreement),
            num(row.greedy.prefix, 1),
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
