"""The report of `sink-eval gpu-suite`: CUDA correctness against the CPU, the streaming patch's speed and memory beside
its ceilings and the bytes floor, and the lm-eval runs' progress; and the output directory (results.json, report.md,
each finished lm-eval run's results JSON)."""

from __future__ import annotations

import json
from pathlib import Path

from tabulate import tabulate

from sink_eval.core.files import write_output_dir
from sink_eval.evals.gpu_suite import DECODE_CHECK_STEPS, GpuSuiteResult, SpeedCase

GIB = 2**30
MIB = 2**20


def _num(value: float | int | None, fmt: str) -> str:
    return "-" if value is None else format(value, fmt)


def _ms(value: float | None) -> str:
    return "-" if value is None else f"{1e3 * value:.2f}"


def _bytes(value: int | None, unit: int) -> str:
    return "-" if value is None else f"{value / unit:.2f}"


def correctness_table(res: GpuSuiteResult) -> str:
    rows = [
        [c.model, c.dtype, c.what, f"{c.value:.3g}", f"{c.tolerance:g}", "pass" if c.passed else "FAIL"]
        for c in res.correctness
    ]
    return tabulate(rows, headers=["model", "dtype", "check", "value", "tolerance", ""], tablefmt="github")


def speed_table(res: GpuSuiteResult) -> str:
    def row(c: SpeedCase) -> list[str]:
        if c.skipped:
            return [c.model, str(c.tokens), str(c.batch), f"skipped: {c.skipped}", *[""] * 10]
        return [
            c.model,
            str(c.tokens),
            str(c.batch),
            f"{_ms(c.prefill_unpatched_s)} / {_ms(c.prefill_patched_s)}",
            f"{_num(c.prefill_speedup, '.2f')} ({_num(c.prefill_ceiling, '.2f')})",
            f"{_ms(c.decode_unpatched_s)} / {_ms(c.decode_patched_s)}",
            f"{_num(c.decode_speedup, '.2f')} ({_num(c.decode_ceiling, '.2f')})",
            f"{_ms(c.floor_per_token_unpatched_s)} / {_ms(c.floor_per_token_patched_s)}",
            _num(c.floor_speedup, ".2f"),
            f"{_bytes(c.kv_unpatched_bytes, MIB)} / {_bytes(c.kv_patched_bytes, MIB)}",
            f"{_bytes(c.peak_unpatched_bytes, GIB)} / {_bytes(c.peak_patched_bytes, GIB)}",
            _num(c.prefill_share, ".2f"),
            f"{_num(c.decode_share, '.2f')} / {_num(c.decode_growth_share, '.2f')}",
        ]

    headers = [
        "model",
        "tokens",
        "batch",
        "prefill ms (unpatched / patched)",
        "prefill speed-up (ceiling)",
        "decode ms/step",
        "decode speed-up (ceiling)",
        "bytes floor ms/token",
        "floor bound",
        "KV MiB",
        "peak GiB",
        "prefill a",
        "decode a / g",
    ]
    return tabulate([row(c) for c in res.speed], headers=headers, tablefmt="github")


def eval_table(res: GpuSuiteResult) -> str:
    rows = []
    for part in res.evals:
        acc = "; ".join(
            f"{label}: " + ", ".join(f"{task} {100 * acc:.1f}" for task, acc in tasks.items())
            for label, tasks in part.summary.items()
        )
        rows.append(
            [
                part.model,
                ",".join(part.tasks),
                part.status,
                f"{part.shards_done}/{part.shards_total}",
                acc or part.reason,
            ]
        )
    return tabulate(rows, headers=["model", "tasks", "status", "shards", "acc % / why"], tablefmt="github")


def summary_table(res: GpuSuiteResult) -> str:
    """What the command prints: the failures, the speed cases and the eval parts."""
    failed = res.failed
    head = f"{len(res.correctness) - len(failed)} of {len(res.correctness)} correctness checks passed"
    if failed:
        head += "; failed: " + "; ".join(f"{c.model} {c.dtype} {c.what} = {c.value:.3g}" for c in failed)
    return "\n\n".join([head, speed_table(res), eval_table(res)])


def suite_report(res: GpuSuiteResult) -> str:
    d = res.device
    banner = (
        "**Dry run on the CPU at tiny shapes: it checks the suite's code path; none of its numbers is a GPU figure.**"
        if d.dry_run
        else f"Measured on one {d.name} ({_bytes(d.memory_bytes, GIB)} GiB)."
    )
    labels = sorted({f"- {c.model}: {c.label}" for c in res.speed})
    skipped = [f"- {model}: {why}" for model, why in res.correctness_skipped.items()]
    wall = ", ".join(f"{part} {seconds:.0f} s" for part, seconds in res.wall_s.items())
    return (
        "\n\n".join(
            [
                f"# GPU suite: {d.name}",
                banner,
                f"Time budget {res.budget_s:.0f} s; wall: {wall}. torch CUDA {d.cuda or 'none'}; TF32 "
                f"{'on' if d.tf32 else 'off'} for float32 matmuls.",
                "## Correctness against the CPU",
                "Each model in each dtype on the device against the same model in float32 on the CPU, on a "
                "left-padded batch of random ids: sink scores of the probe (max absolute difference); logits of a copy "
                "plan and of a streaming plan (half the KV groups) in a full pass, and of "
                f"{DECODE_CHECK_STEPS} decode steps fed fixed ids into the streaming plan's own cache (relative error "
                "over the real positions); that cache's KV bytes against the CPU's, scaled by the element size; a "
                f"cache streaming every candidate head: its bytes after {DECODE_CHECK_STEPS} decode steps against "
                "after 1 (the constant-size cache).",
                correctness_table(res) if res.correctness else "(not run)",
                *(["Skipped models:", "\n".join(skipped)] if skipped else []),
                "## Speed and memory of the streaming patch",
                "The plan streams half of each layer's KV groups whole (sink s and window w in the settings). Times "
                "are medians of rounds paired with the unpatched model, the device synchronised at every clock read; "
                "the ceilings are Amdahl's from the measured attention share a and cache-growth share g "
                "(sink_eval.evals.speed). Bytes floor of a decode step = (weight bytes read + KV bytes) / memory "
                f"bandwidth ({d.bandwidth.name}: {d.bandwidth.bytes_per_s:.3g} B/s, {d.bandwidth.source}), per "
                "token = / batch; floor bound = unpatched floor / patched floor: the most the decode can gain from "
                "the KV bytes the plan no longer reads. Peak memory: the model plus one variant's prefill and cache.",
                "\n".join(labels),
                speed_table(res) if res.speed else "(not run)",
                "## lm-eval runs",
                "Unpatched and calibrated τ = 0.8, every document of each task's validation split (the dry run: a "
                "few), in shards; a partial job continues with `sink-eval gpu-suite --resume`.",
                eval_table(res) if res.evals else "(not run)",
            ]
        )
        + "\n"
    )


def write_suite(
    res: GpuSuiteResult, out: Path, eval_files: dict[str, dict], overwrite: bool = False, keep: Path | None = None
) -> None:
    """DIR/results.json, DIR/report.md and each finished lm-eval run's JSON (those of `keep`, the directory being
    replaced, carried over), all or nothing."""

    def fill(tmp: Path) -> None:
        if keep is not None and keep.is_dir():
            for old in keep.glob("eval-*.json"):
                (tmp / old.name).write_bytes(old.read_bytes())
        for name, data in eval_files.items():
            (tmp / name).write_text(json.dumps(data, indent=1))
        (tmp / "results.json").write_text(json.dumps(res.to_json(), indent=1))
        (tmp / "report.md").write_text(suite_report(res))

    write_output_dir(out, fill, "gpu-suite", overwrite)
