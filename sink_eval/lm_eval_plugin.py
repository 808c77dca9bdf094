"""Makes the lm-eval command line see our model: `lm_eval --model sink_hf --model_args pretrained=...,policy=...`.

lm-eval (0.4) discovers no third-party models, so `python -m sink_eval.lm_eval_plugin` writes a one-line `.pth`
file into site-packages that, only when the running program is lm-eval (the `lm_eval`/`lm-eval` script, or
`python -m lm_eval`, as `accelerate launch -m lm_eval` starts each process), registers "sink_hf" as a lazy entry of
lm-eval's model registry (nothing heavy is imported before lm-eval asks for the model). With `--tasks-dir DIR` it
also writes `<task>_local` task files reading the local data, for `lm_eval --include_path DIR`.
"""

from __future__ import annotations

import argparse
import sys
import sysconfig
from pathlib import Path

from sink_eval.core.files import write_text_atomically

MODEL_NAME = "sink_hf"
PTH_NAME = "sink_eval_lm_eval.pth"
# site runs a .pth line before `python -m`'s module name reaches sys.argv (it is "-m" then): sys.orig_argv has it
PTH_LINE = (
    "import os, sys; a = getattr(sys, 'orig_argv', []); "
    "(sys.argv and os.path.basename(sys.argv[0]) in ('lm_eval', 'lm-eval') "
    "or any(x == '-m' and y == 'lm_eval' for x, y in zip(a, a[1:]))) "
    "and __import__('sink_eval.lm_eval_plugin').lm_eval_plugin.register()\n"
)


def register() -> None:
    import lm_eval.models  # noqa: F401  (lm-eval's own models first: its registry fills itself only when empty)
    from lm_eval.api.registry import model_registry

    if MODEL_NAME not in model_registry:
        model_registry.register(MODEL_NAME, target="sink_eval.evals.accuracy:SinkLM")


def pth_path(site_packages: Path | None = None) -> Path:
    return (site_packages or Path(sysconfig.get_paths()["purelib"])) / PTH_NAME


def install(site_packages: Path | None = None) -> Path:
    path = pth_path(site_packages)
    write_text_atomically(path, PTH_LINE)
    return path


def installed(site_packages: Path | None = None) -> bool:
    """Whether this version's hook is in site-packages (an older line may miss `python -m lm_eval`)."""
    try:
        return pth_path(site_packages).read_text() == PTH_LINE
    except OSError:
        return False


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m sink_eval.lm_eval_plugin", description=__doc__)
    parser.add_argument("--tasks-dir", type=Path, help="also write <task>_local YAML files here")
    parser.add_argument("--tasks", help="comma-separated (default: every task whose data is found)")
    parser.add_argument("--data-dir", type=Path, help="a folder holding the task files")
    args = parser.parse_args(argv)
    print(f"installed {install()}: `lm_eval --model {MODEL_NAME}` now finds sink_eval's model")
    if args.tasks_dir is not None:
        from sink_eval.core.errors import SinkEvalError
        from sink_eval.evals.accuracy import available_tasks, write_task_yamls

        tasks = args.tasks.split(",") if args.tasks else available_tasks(args.data_dir)
        try:
            names = write_task_yamls(args.tasks_dir, tasks, args.data_dir)
        except SinkEvalError as err:
            print(f"error: {err}", file=sys.stderr)
            return 2
        print(f"wrote {', '.join(names)} to {args.tasks_dir}: pass --include_path {args.tasks_dir}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
