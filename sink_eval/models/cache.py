"""The conversion cache: checkpoint directories that are complete and verified, or absent.

An entry is a directory under `cache_root()` (`$SINK_EVAL_CACHE`, default `~/.cache/sink_eval`) holding a completion
marker (`sink_eval_cache.json`: the source's SHA-256, versions, and every file's size and SHA-256), written last
inside a temp directory that is then renamed into place. A directory without a valid marker is never loaded: it is
deleted and built again. This module knows nothing of models: `sink_eval.models.zoo` says what goes into an entry.
"""

from __future__ import annotations

import json
import os
import shutil
import sys
from collections.abc import Callable
from datetime import UTC, datetime
from importlib.metadata import version
from pathlib import Path

import torch

from sink_eval.core.files import check_writable, sha256_files, write_dir_atomically

CACHE_ENV = "SINK_EVAL_CACHE"
CACHE_MARKER = "sink_eval_cache.json"


def cache_root() -> Path:
    return Path(os.environ.get(CACHE_ENV) or Path.home() / ".cache" / "sink_eval")


def cache_is_valid(path: Path, source_sha256: str, check_hashes: bool = True) -> bool:
    """A cache directory is valid when its completion marker matches the source and every file it lists hashes
    to the recorded SHA-256 (the marker is written last, so a half-written directory has none)."""
    try:
        marker = json.loads((path / CACHE_MARKER).read_text())
        files = marker["files"]
        if marker["source_sha256"] != source_sha256 or not files:
            return False
        for name, entry in files.items():
            file = path / name
            if file.stat().st_size != entry["size"]:
                return False
            if check_hashes and sha256_files([file]) != entry["sha256"]:
                return False
    except (OSError, ValueError, KeyError, TypeError):
        return False
    return True


def write_cache_atomically(final: Path, fill: Callable[[Path], None], source_sha256: str) -> None:
    """Run `fill(tmpdir)`, record every file's size and SHA-256 in a completion marker, then rename the whole
    directory into place. An interruption at any point leaves no directory under `final`'s name (and the temp
    directories of killed builds are removed by the next one)."""

    def fill_and_mark(tmp: Path) -> None:
        fill(tmp)
        files = {
            p.name: {"size": p.stat().st_size, "sha256": sha256_files([p])}
            for p in sorted(tmp.iterdir())
            if p.is_file()
        }
        marker = {
            "source_sha256": source_sha256,
            "transformers": version("transformers"),
            "torch": torch.__version__,
            "created": datetime.now(UTC).isoformat(timespec="seconds"),
            "files": files,
        }
        (tmp / CACHE_MARKER).write_text(json.dumps(marker, indent=1))

    write_dir_atomically(final, fill_and_mark, overwrite=True)


def ensure_cache(path: Path, source_sha256: str, fill: Callable[[Path], None], valid: bool | None = None) -> Path:
    """The cache directory `path`, verified (marker + SHA-256 of every file) unless the caller did (`valid`);
    an incomplete or corrupt one is deleted, never loaded, and `fill(tmpdir)` builds it anew atomically."""
    if valid is None:
        valid = cache_is_valid(path, source_sha256)
    if not valid:
        check_writable(path, fix=f"set {CACHE_ENV} to a writable directory")
        if path.exists():
            print(f"sink_eval: cache {path} is incomplete or corrupt; rebuilding it", file=sys.stderr)
            shutil.rmtree(path)
        write_cache_atomically(path, fill, source_sha256)
    return path
