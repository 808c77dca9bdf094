"""Resumable long commands (`sink-eval analyze`, `sink-eval eval`, `sink-eval longctx`): partial results in a hidden
work directory beside --out.

The work directory `.<out>.<command>-work` holds `key.json` (what the results depend on: the model fingerprint and
settings, and the prompt-set SHA-256 of `analyze` or the runs in order of `eval` and `longctx`) and one file per
finished unit of work, each written atomically as soon as it is done: `prompt-NNNNN.pt` per probed prompt of
`analyze`; one JSON per (run, task, shard) of `eval`; one JSON per (run, length) and `streaming-llm.json` of `longctx`.
`--resume` continues from them when the key is the same (another model, prompt set, plan or setting is refused); the
finished results equal an uninterrupted run's (timings aside: those of a resumed run come from two processes;
`longctx` measures a length left part-measured again whole, so that each length is timed by one). The directory is
removed once the results are written.
"""

from __future__ import annotations

import json
import shutil
import sys
from collections.abc import Callable
from pathlib import Path
from typing import TypeVar

from sink_eval.core.errors import SinkEvalError
from sink_eval.core.files import output_lock, write_text_atomically
from sink_eval.core.results import from_json, to_json

KEY_FILE = "key.json"
T = TypeVar("T")


def work_dir(out: Path, command: str) -> Path:
    return Path(out).parent / f".{Path(out).name}.{command}-work"


def check_no_interrupted_run(out: Path, command: str) -> None:
    """Refuse to start afresh over the partial results of an interrupted run (they would be lost silently), or of a
    run still going (it holds the lock of `out`, `files.output_lock`: that is the error then)."""
    work = work_dir(out, command)
    if work.exists():
        with output_lock(out):
            pass
        raise SinkEvalError(
            f"{work} holds the partial results of an interrupted run for --out {out}; pass --resume to continue "
            f"it, or delete {work} to start over"
        )


def open_work_dir(out: Path, key: dict, resume: bool, command: str) -> Path:
    """The work directory for `out`, created with `key`; with `resume`, an existing one whose key is `key`."""
    work = work_dir(out, command)
    if work.exists():
        if not resume:
            check_no_interrupted_run(out, command)
        _check_key(work, key)
        return work
    work.mkdir(parents=True)
    write_text_atomically(work / KEY_FILE, json.dumps(key, indent=1, sort_keys=True))
    return work


def _check_key(work: Path, key: dict) -> None:
    try:
        found = json.loads((work / KEY_FILE).read_text(encoding="utf-8"))
    except (OSError, ValueError) as err:
        raise SinkEvalError(f"{work / KEY_FILE} is unreadable; delete {work} to start over") from err
    differ = sorted(k for k in key.keys() | found.keys() if key.get(k) != found.get(k))
    if differ:
        raise SinkEvalError(
            f"--resume refused: the interrupted run in {work} had another {', '.join(differ)}; rerun it with the "
            f"same model, prompts and options, or delete {work} to start over"
        )


def measure_again(path: Path) -> None:
    """Rule for a damaged unit (a saved file that does not read back, e.g. one truncated by a full disk): it is
    measured again and its file rewritten, as the model cache rebuilds a damaged entry; this says so on stderr."""
    print(f"sink_eval: {path} is damaged; measuring that part again", file=sys.stderr)


def once(work: Path | None, name: str, cls: type[T], compute: Callable[[], T]) -> tuple[T, bool]:
    """A unit of work (a dataclass `cls`): the one an earlier run saved in `work` as `name` (JSON), and True; or
    `compute()`, saved there as `name` (unless `work` is None), and False; a damaged saved one is computed again
    (`measure_again`)."""
    if work is None:
        return compute(), False
    path = work / name
    if path.exists():
        try:
            return from_json(cls, json.loads(path.read_bytes().decode("utf-8")), path), True
        except (ValueError, RecursionError, SinkEvalError):
            measure_again(path)
    value = compute()
    write_text_atomically(path, json.dumps(to_json(value)))
    return value, False


def finish(work: Path) -> None:
    """Remove the work directory once the results are written."""
    shutil.rmtree(work)
