"""`sink-eval`: the command line a person uses."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from tabulate import tabulate

from sink_eval.errors import SinkEvalError
from sink_eval.sinks import DEFAULT_THRESHOLDS


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

    if args.out is None and not args.json:
        raise SinkEvalError("say where the results go: --out DIR (results.json, report.md, figures) and/or --json")
    if args.out is not None and args.out.exists() and not args.overwrite:
        raise SinkEvalError(f"output directory {args.out} already exists; choose another --out or pass --overwrite")
    prompts = read_prompt_file(args.prompts) if args.prompts else default_prompts(args.data_dir)
    loaded = load_model(args.model)
    context = getattr(loaded.model.config, "max_position_embeddings", None) or args.max_tokens
    if args.max_tokens > context:
        raise SinkEvalError(f"--max-tokens {args.max_tokens} exceeds {args.model}'s context of {context} tokens")
    tokenized = tokenize(loaded.tokenizer, prompts, args.max_tokens, args.truncate)
    thresholds = tuple(args.threshold or DEFAULT_THRESHOLDS)
    command = "sink-eval " + " ".join(sys.argv[1:]) if sys.argv[0].endswith("sink-eval") else ""
    res = results(loaded, probe_prompts(loaded, tokenized), thresholds, args.chance_corrected, command)
    if args.out is not None:
        write_analysis(res, args.out, overwrite=args.overwrite)
        print(f"wrote {args.out}/results.json, {args.out}/report.md and figures", file=sys.stderr)
    if args.json:
        print(json.dumps(res))
    else:
        from sink_eval.report import agreement_table, prevalence_table

        print(prevalence_table(res), agreement_table(res), sep="\n\n")


def _cmd_compare(args: argparse.Namespace) -> None:
    from sink_eval.files import write_dir_atomically
    from sink_eval.report import compare_report, read_results

    a, b = read_results(args.first), read_results(args.second)
    text, figure = compare_report(a, b, args.first.name or "first", args.second.name or "second")

    def fill(tmp: Path) -> None:
        figure(tmp)
        (tmp / "compare.md").write_text(text)

    write_dir_atomically(args.out, fill, overwrite=args.overwrite)
    print(text)


def _threshold(text: str) -> float:
    value = float(text)
    if not 0 < value <= 1:
        raise argparse.ArgumentTypeError(f"a threshold is a fraction of attention in (0, 1], not {text}")
    return value


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
    analyze.add_argument("--out", type=Path, help="directory for results.json, report.md and figures")
    analyze.add_argument("--overwrite", action="store_true", help="replace an existing --out directory")
    analyze.add_argument("--json", action="store_true", help="print the results JSON to stdout")
    analyze.set_defaults(func=_cmd_analyze)

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
