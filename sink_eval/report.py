"""Tables (tabulate), figures (matplotlib) and the Markdown report of one or two result sets."""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path

from tabulate import tabulate

from sink_eval.analysis import MIN_SCORED_TOKENS, SCHEMA, summary_group, summary_groups
from sink_eval.errors import SinkEvalError
from sink_eval.files import write_output_dir

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


def thresholds(res: dict) -> list[str]:
    return [k for k in res["summary"] if k.startswith("tau=")]


def prevalence_table(res: dict) -> str:
    rows = []
    taus = thresholds(res)
    for key, first in summary_groups(res["summary"][taus[0]]):
        cells = [key]
        for tau in taus:
            group = summary_group(res["summary"][tau], key)
            se = group.get("prevalence_se")
            cells.append(_pct(group["prevalence"]) + (f" ± {100 * se:.1f}" if se else ""))
        cells += [first["n_prompts"], first["n_trivial"]]
        rows.append(cells)
    return tabulate(rows, headers=["tokens", *taus, "prompts", "trivial"], tablefmt="github")


def agreement_table(res: dict) -> str:
    rows = []
    for tau in thresholds(res):
        summary = res["summary"][tau]
        for key, group in summary_groups(summary):
            if group.get("prevalence") is None:
                continue
            rows.append(
                [
                    tau,
                    key,
                    _pct(group["first_layer_agreement"]),
                    _pct(group["base_rate"]),
                    _num(group["lift"]),
                    _pct(group["recall"]),
                    group["prompts_with_layer0_sink"],
                ]
            )
    return tabulate(
        rows,
        headers=["threshold", "tokens", "agreement", "base rate", "lift", "recall", "prompts w/ L0 sink"],
        tablefmt="github",
    )


def per_layer_table(res: dict, tau: str) -> str:
    bins = {k: g for k, g in res["summary"][tau]["bins"].items() if g.get("per_layer_prevalence")}
    rows = [
        [layer] + [_pct(g["per_layer_prevalence"][layer]) for g in bins.values()]
        for layer in range(res["model"]["layers"])
    ]
    return tabulate(rows, headers=["layer", *bins], tablefmt="github")


def top_heads_table(res: dict, tau: str) -> str:
    rows = [
        [f"L{h['layer']}.H{h['head']}", _pct(h["consistency"]), _num(h["mean_sink_score"], 3)]
        for h in res["summary"][tau]["top_consistent_heads"]
    ]
    return tabulate(rows, headers=["head", "consistency", "mean sink score"], tablefmt="github")


def _figures(res: dict, out: Path) -> list[str]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    name = res["model"]["name"]
    scored = [p for p in res["prompts"] if p["n_tokens"] >= MIN_SCORED_TOKENS]
    files = []

    mean_scores = np.nanmean(np.array([p["sink_score"] for p in scored], dtype=float), axis=0)
    fig, ax = plt.subplots(figsize=(1 + 0.5 * res["model"]["heads"], 1 + 0.22 * res["model"]["layers"]))
    image = ax.imshow(mean_scores, aspect="auto", cmap="magma", vmin=0, vmax=1)
    ax.set(xlabel="head", ylabel="layer", title=f"{name}: mean sink score (A[i,0], query 0 excluded)")
    fig.colorbar(image, ax=ax)
    files.append(_save(fig, out, "sink_heatmap.png"))

    fig, ax = plt.subplots(figsize=(7, 4))
    for tau in thresholds(res):
        t = float(tau.removeprefix("tau="))
        lengths = [p["n_tokens"] for p in scored]
        prevalence = [float(np.mean(np.array(p["sink_score"], dtype=float) >= t)) for p in scored]
        ax.scatter(lengths, prevalence, s=12, label=tau)
    ax.set(
        xscale="log",
        xlabel="prompt length (tokens)",
        ylabel="fraction of heads that are sinks",
        title=f"{name}: sink prevalence vs length (fixed threshold)",
    )
    ax.legend()
    files.append(_save(fig, out, "prevalence_vs_length.png"))

    tau = thresholds(res)[0]
    fig, ax = plt.subplots(figsize=(7, 4))
    for key, group in res["summary"][tau]["bins"].items():
        if group.get("per_layer_prevalence"):
            ax.plot(group["per_layer_prevalence"], marker=".", label=f"{key} tokens")
    ax.set(xlabel="layer", ylabel="fraction of heads that are sinks", title=f"{name}: per-layer prevalence, {tau}")
    ax.legend(fontsize=7)
    files.append(_save(fig, out, "per_layer_prevalence.png"))
    plt.close("all")
    return files


def _save(fig, out: Path, name: str) -> str:
    fig.tight_layout()
    fig.savefig(out / name, dpi=110)
    return name


def markdown_report(res: dict, figures: list[str]) -> str:
    model = res["model"]
    first_tau = thresholds(res)[0]
    parts = [
        f"# Attention sinks of {model['name']}",
        f"![mean sink score per layer and head]({figures[0]})",
        f"Model `{model['name']}` ({model['layers']} layers x {model['heads']} heads, {model['kv_heads']} KV heads, "
        f"{model['dtype']}), fingerprint `{model['fingerprint']}`; {len(res['prompts'])} prompts (set "
        f"`{res['settings']['prompt_set_sha256'][:16]}`); versions {json.dumps(res['versions'])}.",
        "Sink score of a head = mean over queries i = 1..N-1 of its attention to the first token; a sink head has "
        "sink score >= tau. Prevalence = mean over prompts of the fraction of heads that are sinks (± bootstrap "
        "standard error over prompts).",
        "## Prevalence by prompt length and threshold",
        prevalence_table(res),
        f"![prevalence vs length]({figures[1]})",
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
        f"## Per-layer prevalence, {first_tau}",
        f"![per-layer prevalence]({figures[2]})",
        per_layer_table(res, first_tau),
    ]
    for tau in thresholds(res):
        spearman = res["summary"][tau]["spearman_length_vs_prevalence"]
        parts += [
            f"## Most consistent sink heads, {tau}",
            f"Spearman correlation of prompt length with prevalence: {_num(spearman)}.",
            top_heads_table(res, tau),
        ]
    return "\n\n".join(parts) + "\n"


NO_NONTRIVIAL_PROMPT = "no non-trivial prompt: every prompt has one token, so no sink score is defined"


def _trivial_report(res: dict) -> str:
    """The report of a prompt set with no prompt of two or more tokens: its tables, no figures."""
    return f"# Attention sinks of {res['model']['name']}\n\n{NO_NONTRIVIAL_PROMPT}.\n\n{prevalence_table(res)}\n"


def has_scored_prompts(res: dict) -> bool:
    return any(p["n_tokens"] >= MIN_SCORED_TOKENS for p in res["prompts"])


def write_analysis(res: dict, out: Path, overwrite: bool = False) -> None:
    """DIR/results.json, DIR/report.md and the PNG figures, all or nothing; without a non-trivial prompt, the
    report says so and has no figures."""

    def fill(tmp: Path) -> None:
        (tmp / "results.json").write_text(json.dumps(res, indent=1))
        report = markdown_report(res, _figures(res, tmp)) if has_scored_prompts(res) else _trivial_report(res)
        (tmp / "report.md").write_text(report)

    write_output_dir(out, fill, "analyze", overwrite)


def read_results(path: Path) -> dict:
    """A results.json (or the directory that holds one), checked for the schema this version writes."""
    path = Path(path)
    file = path / "results.json" if path.is_dir() else path
    try:
        res = json.loads(file.read_text())
    except OSError as err:
        raise SinkEvalError(
            f"cannot read {file}: {err.strerror}; give a directory written by `sink-eval analyze`"
        ) from err
    except json.JSONDecodeError as err:
        raise SinkEvalError(
            f"{file} is not valid JSON ({err.msg} at line {err.lineno}); re-run `sink-eval analyze`"
        ) from err
    if not isinstance(res, dict) or res.get("schema") != SCHEMA:
        found = res.get("schema") if isinstance(res, dict) else None
        raise SinkEvalError(f"{file} has schema {found!r}, this sink_eval reads {SCHEMA!r}; re-run `sink-eval analyze`")
    return res


def compare_report(a: dict, b: dict, label_a: str, label_b: str) -> tuple[str, Callable[[Path], list[str]]]:
    """A Markdown comparison of two result sets (prevalence and agreement by bin) and a function drawing its figure."""
    shared = [t for t in thresholds(a) if t in thresholds(b)]
    if not shared:
        raise SinkEvalError(f"the two result sets share no threshold ({thresholds(a)} vs {thresholds(b)})")
    rows = []
    for tau in shared:
        for key, ga in summary_groups(a["summary"][tau]):
            gb = summary_group(b["summary"][tau], key)
            pa, pb = ga.get("prevalence"), gb.get("prevalence")
            diff = f"{100 * (pb - pa):+.1f}" if pa is not None and pb is not None else "undefined"
            rows.append([tau, key, _pct(pa), _pct(pb), diff, _num(ga.get("lift")), _num(gb.get("lift"))])
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

    def figure(out: Path) -> list[str]:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        fig, ax = plt.subplots(figsize=(7, 4))
        for res, label in ((a, label_a), (b, label_b)):
            for tau in shared:
                bins = res["summary"][tau]["bins"]
                keys = [k for k, g in bins.items() if g.get("prevalence") is not None]
                ax.plot(keys, [bins[k]["prevalence"] for k in keys], marker="o", label=f"{label} {tau}")
        ax.set(xlabel="prompt length (tokens)", ylabel="sink prevalence", title="sink prevalence by length bin")
        ax.legend(fontsize=7)
        name = _save(fig, out, "compare_prevalence.png")
        plt.close("all")
        return [name]

    text = (
        f"# {label_a} vs {label_b}\n\n![prevalence by length bin](compare_prevalence.png)\n\n"
        f"{label_a}: {a['model']['name']} ({a['model']['fingerprint'][:24]}…), {len(a['prompts'])} prompts; "
        f"{label_b}: {b['model']['name']} ({b['model']['fingerprint'][:24]}…), {len(b['prompts'])} prompts.\n\n"
        f"{table}\n"
    )
    return text, figure


def _mib(n_bytes: int) -> str:
    return f"{n_bytes / 2**20:.2f}"


def patch_table(res: dict) -> str:
    """One row per policy: heads copied, fidelity, speed-ups beside their ceilings, KV memory saved."""
    rows = []
    for row in res["policies"]:
        speed = row["speed"]
        rows.append(
            [
                row["label"],
                _pct(row["fraction_copied"]),
                f"{max(row['kl'], 0.0):.4f}",  # a KL below 0 is rounding error
                _pct(row["top1"]),
                _pct(row["greedy_agreement"]),
                _num(row["greedy_prefix"], 1),
                f"{speed['prefill_speedup']:.2f} ({speed['prefill_ceiling']:.2f})",
                f"{speed['decode_speedup']:.2f} ({speed['decode_ceiling']:.2f})",
                f"{_mib(speed['kv_bytes_saved'])} of {_mib(speed['kv_bytes_unpatched'])}",
            ]
        )
    return tabulate(
        rows,
        headers=[
            "policy",
            "heads copied",
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


def _patch_figure(res: dict, out: Path) -> str:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.5))
    for row in res["policies"]:
        speed = row["speed"]
        x = max(row["kl"], 1e-6)
        ax.scatter([x], [speed["prefill_speedup"]], marker="o")
        ax.scatter([x], [speed["prefill_ceiling"]], marker="_", s=200, color="grey")
        ax.annotate(row["label"], (x, speed["prefill_speedup"]), fontsize=7, xytext=(4, 4), textcoords="offset points")
    ax.axhline(1.0, color="grey", lw=0.5)
    ax.set(
        xscale="log",
        xlabel="next-token KL(unpatched || patched), nats",
        ylabel="prefill speed-up (grey: ceiling)",
        title=f"{res['model']['name']}: speed-up vs fidelity, {res['settings']['speed_prompt']['tokens']} tokens",
    )
    name = _save(fig, out, "speedup_vs_fidelity.png")
    plt.close("all")
    return name


def patch_report(res: dict, figure: str) -> str:
    model, settings = res["model"], res["settings"]
    return (
        "\n\n".join(
            [
                f"# Copy-pattern patch on {model['name']}",
                f"Model `{model['name']}` ({model['layers']} x {model['heads']} heads, {model['kv_heads']} KV heads), "
                f"fingerprint `{model['fingerprint']}`; {len(settings['evaluation_prompts'])} evaluation prompts, "
                f"{len(settings['calibration_prompts'])} calibration prompts (disjoint); speed on "
                f"`{settings['speed_prompt']['id']}` ({settings['speed_prompt']['tokens']} tokens), medians of "
                f"{settings['speed_rounds']} paired rounds, {settings['threads']} threads on "
                f"{settings['device']}.",
                "KL: mean next-token KL(unpatched || patched) over up to 32 positions per prompt; top-1: argmax "
                "agreement there; greedy: 32-token greedy continuations of the shortest prompts, fraction of equal "
                "tokens and mean common prefix. Speed-ups: median of unpatched / patched times taken back to back; the "
                "ceiling 1 / (1 - f a) uses "
                "the plan's fraction f and the measured attention share a. KV saved: bytes of the plan's cache vs the "
                "model's own cache after the decode run.",
                patch_table(res),
                f"![speed-up vs fidelity]({figure})",
            ]
        )
        + "\n"
    )


def write_patch_eval(res: dict, out: Path, overwrite: bool = False) -> None:
    """DIR/results.json, DIR/report.md and the figure, all or nothing."""

    def fill(tmp: Path) -> None:
        (tmp / "results.json").write_text(json.dumps(res, indent=1))
        (tmp / "report.md").write_text(patch_report(res, _patch_figure(res, tmp)))

    write_output_dir(out, fill, "patch-eval", overwrite)


def eval_table(res: dict) -> str:
    """Accuracy ± stderr per task, unpatched then each policy (with its change against unpatched ± paired SE)."""
    tasks = res["settings"]["tasks"]
    rows = []
    for run in res["runs"]:
        cells = []
        for task in tasks:
            t = run["tasks"][task]
            cell = f"{100 * t['acc']:.1f} ± {100 * t['acc_stderr']:.1f}"
            if "change" in t:
                cell += f" ({100 * t['change']:+.1f} ± {100 * t['change_se']:.1f})"
            cells.append(cell)
        speedup = f"{run['speedup']:.2f}" if "speedup" in run else "1.00"
        rows.append([run["label"], _pct(run["fraction_copied"]), *cells, f"{run['model_s']:.0f}", speedup])
    headers = ["policy", "heads copied", *[f"{t} acc % ({res['settings']['splits'][t]})" for t in tasks]]
    return tabulate(rows, headers=[*headers, "forward s", "speed-up"], tablefmt="github")


def write_eval(res: dict, out: Path, overwrite: bool = False) -> None:
    """DIR/results.json and DIR/report.md, all or nothing."""
    notes = "; ".join(f"{task}: {note}" for task, note in res["settings"]["split_notes"].items())
    limit = res["settings"]["limit"]
    text = "\n\n".join(
        [
            f"# Accuracy of {res['model']['name']} under copy plans (lm-evaluation-harness)",
            f"Fingerprint `{res['model']['fingerprint']}`; "
            + (f"the first {limit} documents of each task" if limit else "every document of each task")
            + f". Splits: {notes or 'lm-eval defaults'}. Accuracy ± lm-eval's standard error; in brackets the "
            "change against unpatched on the same documents ± its paired standard error (points). Forward s: "
            "seconds in the model's forward passes (per-prompt policies include their probe); speed-up = unpatched "
            "/ policy forward s.",
            eval_table(res),
        ]
    )

    def fill(tmp: Path) -> None:
        (tmp / "results.json").write_text(json.dumps(res, indent=1))
        (tmp / "report.md").write_text(text + "\n")

    write_output_dir(out, fill, "eval", overwrite)
