"""`sink-eval`: the command line a person uses."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from tabulate import tabulate

from sink_eval.errors import SinkEvalError
from sink_eval.sinks import DEFAULT_THRESHOLDS

POLICY_NAMES = ("first_layer", "calibrated", "oracle", "hybrid")  # sink_eval.policies.POLICIES, without importing torch


def models_table() -> str:
    """The zoo as a table: name, architecture, shape, whether installed and cached, and how to install."""
    from sink_eval.models import ZOO, cache_status, gguf_chunk_paths

    rows = []
    for spec in ZOO.values():
        if spec.gguf is None:
            installed, cached, todo = "built in", "-", ""
        else:
            present = gguf_chunk_paths(spec.gguf) is not None
            installed, cached = ("yes" if present else "no"), cache_status(spec)
            todo = "" if present or cached == "cached" else spec.gguf.install
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
    from sink_eval.models import CACHE_ENV, cache_root

    print(models_table())
    print(
        f"\ncache: {cache_root()} (set {CACHE_ENV} to move it); also accepted: a hub id (org/name) or a "
        "local checkpoint directory."
    )


def _cmd_analyze(args: argparse.Namespace) -> None:
    import json

    from sink_eval.analysis import probe_prompts, results
    from sink_eval.models import load_model
    from sink_eval.prompts import default_prompts, read_prompt_file, tokenize
    from sink_eval.report import write_analysis

    _check_output(args, "results.json, report.md, figures")
    prompts = read_prompt_file(args.prompts) if args.prompts else default_prompts(args.data_dir)
    loaded = load_model(args.model)
    context = getattr(loaded.model.config, "max_position_embeddings", None) or args.max_tokens
    if args.max_tokens > context:
        raise SinkEvalError(f"--max-tokens {args.max_tokens} exceeds {args.model}'s context of {context} tokens")
    tokenized = tokenize(loaded.tokenizer, prompts, args.max_tokens, args.truncate)
    thresholds = tuple(args.threshold or DEFAULT_THRESHOLDS)
    command = "sink-eval " + " ".join(sys.argv[1:]) if sys.argv[0].endswith("sink-eval") else ""
    res = results(loaded, probe_prompts(loaded, tokenized), thresholds, args.chance_corrected, command, args.max_tokens)
    if args.out is not None:
        write_analysis(res, args.out, overwrite=args.overwrite)
        print(f"wrote {args.out}/results.json, {args.out}/report.md and figures", file=sys.stderr)
    if args.json:
        print(json.dumps(res.to_json()))
    else:
        from sink_eval.report import agreement_table, prevalence_table

        print(prevalence_table(res), agreement_table(res), sep="\n\n")


def _cmd_compare(args: argparse.Namespace) -> None:
    from sink_eval.report import read_results, write_compare

    a, b = read_results(args.first), read_results(args.second)
    labels = args.first.name or "first", args.second.name or "second"
    print(write_compare(a, b, *labels, args.out, overwrite=args.overwrite))


def _policies(args: argparse.Namespace, default: tuple[str, ...]) -> list:
    from sink_eval.patch_eval import Policy
    from sink_eval.policies import PolicyOptions, check_policy

    options = PolicyOptions(
        threshold=args.threshold,
        chance_corrected=args.chance_corrected,
        consistency=args.consistency,
        base=args.hybrid_base,
        max_tokens=args.hybrid_max_tokens,
        decode_steps=args.hybrid_decode_steps,
    )
    policies = [Policy(name, options) for name in args.policy or default]
    for policy in policies:
        check_policy(policy.name, policy.options)
    return policies


def _cmd_eval(args: argparse.Namespace) -> None:
    import json

    from sink_eval.evaluate import run_eval
    from sink_eval.models import load_model
    from sink_eval.report import eval_table, write_eval

    _check_output(args, "results.json, report.md")
    tasks = [t.strip() for t in args.tasks.split(",") if t.strip()]
    if not tasks:
        raise SinkEvalError("--tasks needs at least one task name, e.g. --tasks piqa,arc_easy")
    policies = _policies(args, default=("calibrated",))
    command = "sink-eval " + " ".join(sys.argv[1:]) if sys.argv[0].endswith("sink-eval") else ""
    loaded = load_model(args.model, device=args.device)
    res = run_eval(loaded, policies, tasks, args.limit, args.data_dir, args.batch_size, command)
    if args.out is not None:
        write_eval(res, args.out, overwrite=args.overwrite)
        print(f"wrote {args.out}/results.json and {args.out}/report.md", file=sys.stderr)
    print(json.dumps(res.to_json()) if args.json else eval_table(res))


def _cmd_patch_eval(args: argparse.Namespace) -> None:
    import json

    from sink_eval.models import load_model
    from sink_eval.patch_eval import run
    from sink_eval.policies import check_disjoint, split_prompts
    from sink_eval.prompts import default_prompts, read_prompt_file, tokenize
    from sink_eval.report import patch_table, write_patch_eval

    _check_output(args, "results.json, report.md, figure")
    policies = _policies(args, default=POLICY_NAMES)
    if args.prompts is None and args.calibration_prompts is None:
        calibration, evaluation = split_prompts(default_prompts(args.data_dir))
    elif args.prompts is not None and args.calibration_prompts is not None:
        calibration, evaluation = read_prompt_file(args.calibration_prompts), read_prompt_file(args.prompts)
    else:
        raise SinkEvalError("give both --prompts and --calibration-prompts, or neither (the default set's split)")
    check_disjoint(calibration, evaluation)
    loaded = load_model(args.model)
    calib_t = tokenize(loaded.tokenizer, calibration, args.max_tokens, args.truncate)
    eval_t = tokenize(loaded.tokenizer, evaluation, args.max_tokens, args.truncate)
    longest = max(calib_t + eval_t, key=lambda tp: len(tp.input_ids))
    speed_prompt = type(longest)(longest.prompt, longest.input_ids[: args.speed_tokens])
    command = "sink-eval " + " ".join(sys.argv[1:]) if sys.argv[0].endswith("sink-eval") else ""
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
    )
    if args.out is not None:
        write_patch_eval(res, args.out, overwrite=args.overwrite)
        print(f"wrote {args.out}/results.json, {args.out}/report.md and a figure", file=sys.stderr)
    print(json.dumps(res.to_json()) if args.json else patch_table(res))


def _threshold(text: str) -> float:
    value = float(text)
    if not 0 < value <= 1:
        raise argparse.ArgumentTypeError(f"a threshold is a fraction of attention in (0, 1], not {text}")
    return value


def _output_arguments(parser: argparse.ArgumentParser, what: str) -> None:
    parser.add_argument("--out", type=Path, help=f"directory for {what}")
    parser.add_argument("--overwrite", action="store_true", help="replace an existing --out directory")
    parser.add_argument("--json", action="store_true", help="print the results JSON to stdout")


def _check_output(args: argparse.Namespace, what: str) -> None:
    """Refuse a run whose results would go nowhere, or over an existing directory without --overwrite."""
    if args.out is None and not args.json:
        raise SinkEvalError(f"say where the results go: --out DIR ({what}) and/or --json")
    if args.out is not None and args.out.exists() and not args.overwrite:
        raise SinkEvalError(f"output directory {args.out} already exists; choose another --out or pass --overwrite")


def _policy_arguments(parser: argparse.ArgumentParser, default: str) -> None:
    parser.add_argument("--policy", action="append", choices=POLICY_NAMES, help=f"repeat for several ({default})")
    parser.add_argument("--threshold", type=_threshold, default=0.8, help="sink threshold tau (0.8)")
    parser.add_argument("--chance-corrected", action="store_true", help="length-dependent tau(N)")
    parser.add_argument("--consistency", type=_threshold, default=0.9, help="calibrated: consistency p (0.9)")
    parser.add_argument("--hybrid-base", default="calibrated", choices=[p for p in POLICY_NAMES if p != "hybrid"])
    parser.add_argument("--hybrid-max-tokens", type=int, default=64, help="hybrid: copy while <= L tokens (64)")
    parser.add_argument("--hybrid-decode-steps", type=int, help="hybrid: copy only in the first k decode steps")


def build_parser() -> argparse.ArgumentParser:
    from sink_eval.models import DEFAULT_MODEL
    from sink_eval.prompts import DATA_ENV, DEFAULT_MAX_TOKENS

    parser = argparse.ArgumentParser(prog="sink-eval", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    sub.add_parser("models", help="list the model zoo: shapes, installed?, cached?").set_defaults(func=_cmd_models)

    analyze = sub.add_parser("analyze", help="measure attention sinks of a model over a prompt set")
    analyze.add_argument("--model", default=DEFAULT_MODEL, help=f"zoo name, hub id or local dir ({DEFAULT_MODEL})")
    analyze.add_argument("--prompts", type=Path, help="JSONL prompt file (default: the built-in real-text set)")
    analyze.add_argument("--data-dir", type=Path, help=f"eval data for the default set (default: ${DATA_ENV})")
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
    analyze.add_argument("--max-tokens", type=int, default=DEFAULT_MAX_TOKENS, help="longest prompt allowed")
    analyze.add_argument("--truncate", action="store_true", help="cut longer prompts to --max-tokens")
    _output_arguments(analyze, "results.json, report.md and figures")
    analyze.set_defaults(func=_cmd_analyze)

    patch_eval = sub.add_parser("patch-eval", help="copy policies: heads copied, fidelity, speed-up, KV saved")
    patch_eval.add_argument("--model", default=DEFAULT_MODEL, help=f"zoo name, hub id or local dir ({DEFAULT_MODEL})")
    _policy_arguments(patch_eval, "all of them")
    patch_eval.add_argument("--prompts", type=Path, help="JSONL evaluation prompts (default: half the built-in set)")
    patch_eval.add_argument("--calibration-prompts", type=Path, help="JSONL calibration prompts (default: other half)")
    patch_eval.add_argument("--data-dir", type=Path, help=f"eval data for the default set (default: ${DATA_ENV})")
    patch_eval.add_argument("--max-tokens", type=int, default=DEFAULT_MAX_TOKENS, help="longest prompt allowed")
    patch_eval.add_argument("--truncate", action="store_true", help="cut longer prompts to --max-tokens")
    patch_eval.add_argument("--speed-tokens", type=int, default=1024, help="length of the speed prompt (1024)")
    patch_eval.add_argument("--speed-rounds", type=int, default=3, help="paired timing rounds (3)")
    patch_eval.add_argument("--generations", type=int, default=8, help="greedy continuations compared (8)")
    patch_eval.add_argument("--new-tokens", type=int, default=32, help="tokens per greedy continuation (32)")
    _output_arguments(patch_eval, "results.json, report.md and the figure")
    patch_eval.set_defaults(func=_cmd_patch_eval)

    evaluate = sub.add_parser("eval", help="lm-eval accuracy, unpatched vs copy policies, from local task data")
    evaluate.add_argument("--model", default=DEFAULT_MODEL, help=f"zoo name, hub id or local dir ({DEFAULT_MODEL})")
    evaluate.add_argument("--tasks", required=True, help="comma-separated, e.g. piqa,arc_easy,hellaswag,sciq")
    evaluate.add_argument("--limit", type=int, help="only the first N documents of each task")
    evaluate.add_argument("--batch-size", type=int, default=8)
    evaluate.add_argument("--device", default="cpu", help="torch device to run on, e.g. cuda (cpu)")
    evaluate.add_argument("--data-dir", type=Path, help=f"a folder holding the task files (default: ${DATA_ENV})")
    _policy_arguments(evaluate, "calibrated")
    _output_arguments(evaluate, "results.json and report.md")
    evaluate.set_defaults(func=_cmd_eval)

    compare = sub.add_parser("compare", help="two result sets side by side")
    compare.add_argument("first", type=Path, help="a directory written by `sink-eval analyze`")
    compare.add_argument("second", type=Path)
    compare.add_argument("--out", type=Path, required=True, help="directory for compare.md and its figure")
    compare.add_argument("--overwrite", action="store_true")
    compare.set_defaults(func=_cmd_compare)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        args.func(args)
    except SinkEvalError as err:
        print(f"sink-eval: error: {err}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
