"""`sink-eval`: the command line a person uses."""

from __future__ import annotations

import argparse
import sys

from tabulate import tabulate

from sink_eval.errors import SinkEvalError


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


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="sink-eval", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    sub.add_parser("models", help="list the model zoo: shapes, installed?, cached?").set_defaults(func=_cmd_models)
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
