"""Files: atomic writes (a reader sees the whole new file or directory, or the old one, never a half-written one)
and their SHA-256."""

from __future__ import annotations

import hashlib
import os
import shutil
import tempfile
from collections.abc import Callable
from pathlib import Path

from sink_eval.errors import SinkEvalError


def temp_prefix(final: Path) -> str:
    """Temp directories for `final` are named `.<name>.tmp-<pid>-…` beside it, so that a killed writer's leftovers
    can be told apart and cleaned up."""
    return f".{final.name}.tmp-"


def write_dir_atomically(final: Path, fill: Callable[[Path], None], overwrite: bool = False) -> None:
    """Run `fill(tmpdir)` on a temp directory beside `final`, then rename it into place. An existing `final` is an
    error unless `overwrite`."""
    final = Path(final)
    if final.exists() and not overwrite:
        raise SinkEvalError(f"{final} already exists; choose another output directory or pass --overwrite")
    final.parent.mkdir(parents=True, exist_ok=True)
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
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.tmp-", dir=path.parent)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.write(text)
        os.chmod(tmp, 0o644)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def sha256_files(paths: list[Path]) -> str:
    """SHA-256 of the files' bytes, concatenated in order."""
    digest = hashlib.sha256()
    for path in paths:
        with open(path, "rb") as f:
            while block := f.read(1 << 24):
                digest.update(block)
    return digest.hexdigest()
