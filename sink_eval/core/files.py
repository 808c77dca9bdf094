"""Files: atomic writes (a reader sees the whole new file or directory, or the old one, never a half-written one)
and their SHA-256.

Output directories (`write_output_dir`) carry a marker naming their kind and the files written; `--overwrite`
replaces only such a directory, never one that holds anything else (`check_output_dir`). One writer at a time: a
directory is written under its lock (`output_lock`), and the rename that puts it in place never replaces anything
that appeared at its name meanwhile (`rename_no_replace`).
"""

from __future__ import annotations

import ctypes
import errno
import fcntl
import hashlib
import json
import os
import shutil
import tempfile
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path

from sink_eval.core.errors import SinkEvalError

OUTPUT_MARKER = ".sink_eval-output.json"
# The names sink_eval keeps beside an output `<name>` add at most this many bytes to it: `.<name>.tmp-<pid>-<8>`,
# `.<name>.tmp-<pid>-old-<8>` (pids of up to 9 digits), `.<name>.lock` and `.<name>.<command>-work`.
SIDE_NAME_BYTES = 32
DEFAULT_NAME_MAX = 255  # where the file system does not say (`os.pathconf`)


def temp_prefix(final: Path) -> str:
    """Temp directories for `final` are named `.<name>.tmp-<pid>-…` beside it, so that a killed writer's leftovers
    can be told apart and cleaned up."""
    return f".{final.name}.tmp-"


def lock_path(final: Path) -> Path:
    """The lock file of `final`: `.<name>.lock` beside it, there only while a writer holds it."""
    return Path(final).parent / f".{Path(final).name}.lock"


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


_HELD: set[Path] = set()  # the lock files this process holds (`output_lock` is re-entrant within a process)


@contextmanager
def output_lock(final: Path, wait: bool = False) -> Iterator[None]:
    """Hold the lock of `final` (`lock_path`, an exclusive `flock`, with the holder's pid in it) for the block.
    Rule: one process writes an output (and its temp and work directories) at a time; where another holds the lock,
    wait for it (`wait`) or fail with an error naming its pid. The lock file is removed on release."""
    path = lock_path(Path(final)).absolute()
    if path in _HELD:
        yield
        return
    fd = _acquire(path, Path(final), wait)
    _HELD.add(path)
    try:
        yield
    finally:
        _HELD.discard(path)
        path.unlink(missing_ok=True)
        os.close(fd)


def _acquire(path: Path, final: Path, wait: bool) -> int:
    """An open descriptor of the lock file `path`, locked; retried where its holder removed it meanwhile."""
    path.parent.mkdir(parents=True, exist_ok=True)
    while True:
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | (0 if wait else fcntl.LOCK_NB))
        except BlockingIOError:
            holder = os.pread(fd, 32, 0).decode(errors="replace").strip()
            os.close(fd)
            pid = f" (pid {holder})" if holder.isdigit() else ""
            raise SinkEvalError(
                f"another sink-eval run{pid} is writing {final}; wait for it to finish, or choose another --out"
            ) from None
        try:
            if os.stat(path).st_ino == os.fstat(fd).st_ino:
                break
        except FileNotFoundError:
            pass
        os.close(fd)  # the previous holder removed the file as it released it: lock the new one
    os.ftruncate(fd, 0)
    os.pwrite(fd, str(os.getpid()).encode(), 0)
    return fd


def _libc_renameat2() -> Callable[..., int] | None:
    try:
        return ctypes.CDLL(None, use_errno=True).renameat2
    except (OSError, AttributeError):
        return None


_RENAMEAT2 = _libc_renameat2()
_AT_FDCWD, _RENAME_NOREPLACE = -100, 1


def rename_no_replace(src: Path, dst: Path) -> None:
    """Rename `src` to `dst`; FileExistsError if anything stands at `dst`, which is never replaced (`os.rename`
    replaces an empty directory). Linux's renameat2(RENAME_NOREPLACE) makes the test and the rename one step;
    elsewhere (or on a file system without it) `dst` is tested just before the rename."""
    if _RENAMEAT2 is not None:
        if _RENAMEAT2(_AT_FDCWD, os.fsencode(src), _AT_FDCWD, os.fsencode(dst), _RENAME_NOREPLACE) == 0:
            return
        code = ctypes.get_errno()
        if code not in (errno.EINVAL, errno.ENOSYS):
            raise OSError(code, os.strerror(code), str(dst))
    if os.path.lexists(dst):
        raise FileExistsError(errno.EEXIST, os.strerror(errno.EEXIST), str(dst))
    os.rename(src, dst)


def check_not_link(final: Path) -> None:
    """Rule: an output is never written through a symbolic link (replacing it would replace the link, not the
    directory it points at)."""
    if Path(final).is_symlink():
        raise SinkEvalError(
            f"--out {final} is a symbolic link (to {os.readlink(final)}); give the directory itself, not a link"
        )


def write_dir_atomically(
    final: Path, fill: Callable[[Path], None], overwrite: bool = False, verify: Callable[[Path], None] | None = None
) -> None:
    """Run `fill(tmpdir)` on a temp directory beside `final`, then rename it into place, holding `final`'s lock
    (`output_lock`, waiting for another writer) throughout. An existing `final` is an error unless `overwrite`.
    Temp directories of earlier, killed writers of `final` are removed first.

    Rules of the rename: with `overwrite`, the existing `final` is first moved aside, checked by `verify` (put back
    if that raises) and removed only once the new directory is in place; anything else that appears at `final`
    while `fill` runs is never replaced or removed: the write fails instead."""
    final = Path(final)
    check_not_link(final)
    final.parent.mkdir(parents=True, exist_ok=True)
    with output_lock(final, wait=True):
        if os.path.lexists(final) and not overwrite:
            raise SinkEvalError(f"{final} already exists; choose another output directory or pass --overwrite")
        remove_abandoned_temps(final)
        tmp = Path(tempfile.mkdtemp(prefix=f"{temp_prefix(final)}{os.getpid()}-", dir=final.parent))
        try:
            fill(tmp)
            tmp.chmod(0o755)
            _put_in_place(tmp, final, overwrite, verify)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)


def _put_in_place(tmp: Path, final: Path, overwrite: bool, verify: Callable[[Path], None] | None) -> None:
    """Rename `tmp` to `final`, moving an existing `final` aside first where `overwrite` (module rules)."""
    old = None
    if overwrite and os.path.lexists(final):
        check_not_link(final)
        old = Path(tempfile.mkdtemp(prefix=f"{temp_prefix(final)}{os.getpid()}-old-", dir=final.parent))
        os.rename(final, old)
        try:
            if verify is not None:
                verify(old)
        except BaseException:
            rename_no_replace(old, final)
            raise
    try:
        rename_no_replace(tmp, final)
    except OSError as err:
        kept = f"; the output it replaced is kept in {old}" if old is not None else ""
        raise SinkEvalError(
            f"{final} appeared while sink-eval was writing it, and is left as it is{kept}: nothing was written "
            "there; move it away or choose another --out, and run again"
        ) from err
    if old is not None:
        shutil.rmtree(old)


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
    parent = _nearest_existing(target.absolute().parent)
    if not parent.is_dir():
        raise SinkEvalError(f"cannot create {target}: {parent} is a file, not a directory; {fix}")
    try:
        os.rmdir(tempfile.mkdtemp(prefix=".sink_eval-probe-", dir=parent))
    except OSError as err:
        raise SinkEvalError(f"cannot write {target}: {parent} is not writable ({err.strerror}); {fix}") from err


def _nearest_existing(path: Path) -> Path:
    while not path.exists():
        path = path.parent
    return path


def max_out_name_bytes(parent: Path) -> int:
    """The longest name (in bytes) an output directory in `parent` may have: the file system's limit on a name, less
    SIDE_NAME_BYTES for the names kept beside it."""
    try:
        name_max = os.pathconf(_nearest_existing(Path(parent).absolute()), "PC_NAME_MAX")
    except (OSError, ValueError):
        name_max = DEFAULT_NAME_MAX
    return name_max - SIDE_NAME_BYTES


def _check_name_length(final: Path) -> None:
    size, most = len(os.fsencode(final.name)), max_out_name_bytes(final.absolute().parent)
    if size > most:
        raise SinkEvalError(
            f"--out name {final.name[:24]}… is {size} bytes, too long for the names sink-eval keeps beside it "
            f"(.<name>.tmp-…, .<name>.lock); give a name of at most {most} bytes"
        )


def _is_within(path: Path, other: Path) -> bool:
    """Whether `path` is `other` or inside it (both resolved)."""
    return path == other or other in path.parents


def check_output_dir(final: Path, kind: str, overwrite: bool, inputs: Sequence[Path] = ()) -> None:
    """The rules for an output directory, checked before any work: it is no symbolic link, its name leaves room for
    the names kept beside it (`max_out_name_bytes`) and it must be writable; an existing one is replaced only with
    `overwrite`, and only when sink_eval wrote it as a `kind` output (its marker says so) and it holds nothing else.
    `.`, an ancestor of the working directory and the command's own `inputs` (or a directory holding one) are never
    replaced."""
    final = Path(final)
    check_not_link(final)
    _check_name_length(final)
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
    _check_own_output(final, final, kind)


def _check_own_output(directory: Path, final: Path, kind: str) -> None:
    """Rule for replacing `final` (now at `directory`): it holds only what its `kind` marker lists."""
    unknown = sorted(set(os.listdir(directory)) - set(_marked_files(directory, kind)))
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
    marker listing what `fill` wrote; the directory it replaces is checked again as it is moved aside."""
    check_output_dir(final, kind, overwrite, inputs)

    def fill_and_mark(tmp: Path) -> None:
        fill(tmp)
        marker = {"kind": kind, "files": sorted(os.listdir(tmp))}
        (tmp / OUTPUT_MARKER).write_text(json.dumps(marker, indent=1), encoding="utf-8")

    write_dir_atomically(final, fill_and_mark, overwrite, verify=lambda old: _check_own_output(old, final, kind))


def sha256_files(paths: list[Path]) -> str:
    """SHA-256 of the files' bytes, concatenated in order."""
    digest = hashlib.sha256()
    for path in paths:
        with open(path, "rb") as f:
            while block := f.read(1 << 24):
                digest.update(block)
    return digest.hexdigest()
