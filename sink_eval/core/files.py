"""Files: atomic writes (a reader sees the whole new file or directory, or the old one, never a half-written one)
and their SHA-256.

Output directories (`write_output_dir`) carry a marker naming their kind and the files written; `--overwrite`
replaces only such a directory, never one that holds anything else (`check_output_dir`).
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
from collections.abc import Callable, Sequence
from pathlib import Path

from sink_eval.core.errors import SinkEvalError

OUTPUT_MARKER = ".sink_eval-output.json"


def temp_prefix(final: Path) -> str:
    """Temp directories for `final` are named `.<name>.tmp-<pid>-…` beside it, so that a killed writer's leftovers
    can be told apart and cleaned up."""
    return f".{final.name}.tmp-"


def pid_alive(pid: int) -> bool:
    """Whether a process with this id exists (one of another user counts as alive)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def remove_abandoned_temps(final: Path) -> None:
    """Delete the temp directories of `final` that writers no longer running (killed ones) left behind."""
    for stale in Path(final).parent.glob(f"{temp_prefix(Path(final))}*"):
        pid = stale.name.removeprefix(temp_prefix(Path(final))).split("-")[0]
        if not pid.isdigit() or not pid_alive(int(pid)):
            shutil.rmtree(stale, ignore_errors=True)


def write_dir_atomically(final: Path, fill: Callable[[Path], None], overwrite: bool = False) -> None:
    """Run `fill(tmpdir)` on a temp directory beside `final`, then rename it into place. An existing `final` is an
    error unless `overwrite`. Temp directories of earlier, killed writers of `final` are removed first."""
    final = Path(final)
    if final.exists() and not overwrite:
        raise SinkEvalError(f"{final} already exists; choose another output directory or pass --overwrite")
    final.parent.mkdir(parents=True, exist_ok=True)
    remove_abandoned_temps(final)
    tmp = Path(tempfile.mkdtemp(prefix=f"{temp_prefix(final)}{os.getpid()}-", dir=final.parent))
    try:
        fill(tmp)
        tmp.chmod(0o755)
        if final.exists():
            shutil.rmtree(final)
        os.rename(tmp, final)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def write_text_atomically(path: Path, text: str) -> None:
    """Write `text` to a temp file beside `path` and rename it over `path`."""
    write_bytes_atomically(path, text.encode("utf-8"))


def write_bytes_atomically(path: Path, data: bytes) -> None:
    """Write `data` to a temp file beside `path` and rename it over `path`."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.tmp-", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
        os.chmod(tmp, 0o644)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def check_writable(target: Path, fix: str = "choose another --out") -> None:
    """Refuse a `target` that cannot be created: it is a file, or its nearest existing ancestor is not a directory
    or refuses a new entry (tried by creating and removing a temp directory there)."""
    target = Path(target)
    if target.exists() and not target.is_dir():
        raise SinkEvalError(f"{target} is a file, not a directory; {fix}")
    parent = target.absolute().parent
    while not parent.exists():
        parent = parent.parent
    if not parent.is_dir():
        raise SinkEvalError(f"cannot create {target}: {parent} is a file, not a directory; {fix}")
    try:
        os.rmdir(tempfile.mkdtemp(prefix=".sink_eval-probe-", dir=parent))
    except OSError as err:
        raise SinkEvalError(f"cannot write {target}: {parent} is not writable ({err.strerror}); {fix}") from err


def _is_within(path: Path, other: Path) -> bool:
    """Whether `path` is `other` or inside it (both resolved)."""
    return path == other or other in path.parents


def check_output_dir(final: Path, kind: str, overwrite: bool, inputs: Sequence[Path] = ()) -> None:
    """The rules for an output directory, checked before any work: it must be writable; an existing one is
    replaced only with `overwrite`, and only when sink_eval wrote it as a `kind` output (its marker says so) and it
    holds nothing else. `.`, an ancestor of the working directory and the command's own `inputs` (or a directory
    holding one) are never replaced."""
    final = Path(final)
    check_writable(final)
    if not final.exists():
        return
    if not overwrite:
        raise SinkEvalError(f"output directory {final} already exists; choose another --out or pass --overwrite")
    resolved = final.resolve()
    if _is_within(Path.cwd().resolve(), resolved):
        raise SinkEvalError(f"--out {final} is the working directory or holds it; --overwrite never replaces that")
    for given in inputs:
        if _is_within(Path(given).resolve(), resolved):
            raise SinkEvalError(f"--out {final} holds the input {given}; write the output somewhere else")
    unknown = sorted(set(os.listdir(final)) - set(_marked_files(final, kind)))
    if unknown:
        raise SinkEvalError(
            f"--overwrite refused: {final} holds {', '.join(unknown[:3])}{', …' if len(unknown) > 3 else ''}, which "
            f"`sink-eval` did not write there as {kind} output; remove it yourself or choose another --out"
        )


def _marked_files(directory: Path, kind: str) -> list[str]:
    """The files a `kind` output directory's marker lists, the marker included; [] if it has no such marker."""
    try:
        marker = json.loads((directory / OUTPUT_MARKER).read_text(encoding="utf-8"))
        if marker["kind"] != kind:
            return []
        return [OUTPUT_MARKER, *(str(name) for name in marker["files"])]
    except (OSError, ValueError, KeyError, TypeError):
        return []


def write_output_dir(
    final: Path, fill: Callable[[Path], None], kind: str, overwrite: bool = False, inputs: Sequence[Path] = ()
) -> None:
    """`write_dir_atomically` for an output directory of `kind`: the `check_output_dir` rules, then `fill`, then the
    marker listing what `fill` wrote."""
    check_output_dir(final, kind, overwrite, inputs)

    def fill_and_mark(tmp: Path) -> None:
        fill(tmp)
        marker = {"kind": kind, "files": sorted(os.listdir(tmp))}
        (tmp / OUTPUT_MARKER).write_text(json.dumps(marker, indent=1), encoding="utf-8")

    write_dir_atomically(final, fill_and_mark, overwrite)


def sha256_files(paths: list[Path]) -> str:
    """SHA-256 of the files' bytes, concatenated in order."""
    digest = hashlib.sha256()
    for path in paths:
        with open(path, "rb") as f:
            while block := f.read(1 << 24):
                digest.update(block)
    return digest.hexdigest()
