"""The GPU suite (`sink-eval gpu-suite`): in one prepared call on one GPU, CUDA correctness against the CPU, the
streaming patch's speed and memory at long contexts, then, in the time left, the lm-eval runs the CPU cannot finish.

Parts, in order (`--parts`), each bounded by the time budget (`budget_s`, wall, from the start of the suite):
1. correctness: each model (the tiny random models and smollm2-135m) in each dtype (fp32, bf16) on the device against
   the same model in fp32 on the CPU, on a left-padded batch of random ids: the probe's sink scores (max absolute
   difference), the logits of a copy plan and of a streaming plan in a full pass (relative error ‖Δ‖ / ‖ref‖ over
   the real positions), the logits of decode steps fed fixed ids into the streaming plan's own cache (relative
   error), that cache's KV bytes (equal to the CPU's, scaled by the element size), and that a cache streaming every
   candidate head stays the same size as it decodes (the constant-size cache). Tolerances (`TOLERANCES`): fp32
   tight, bf16 looser.
2. speed: the streaming plan that streams half of each layer's KV groups whole (s = 4, w = 256) on the Llama-3.1-8B
   shape (random weights, bf16: a shape benchmark, never a fidelity figure) and on qwen2.5-coder-1.5b (real weights,
   bf16), at 8k / 16k / 32k tokens, batch 1 and 8: prefill and decode time (paired against the unpatched model, the
   device synchronised at every clock read: `speed.paired`), the attention and cache-growth shares and the Amdahl
   ceilings (`speed.ceiling`), peak device memory, KV bytes of each cache (`kv_cache_bytes`), and the bytes floor of a
   decode step: (weight bytes read + KV bytes) / the device's memory bandwidth (`BANDWIDTHS`), per token = / batch.
   A case whose estimated cost exceeds the time left is skipped, and says so.
3. eval: lm-eval's full validation runs not yet done on the CPU (hellaswag for both Qwen models; the 1.5B's arc_easy
   and piqa), unpatched and calibrated τ = 0.8, shard by shard (`accuracy.run_eval`), until the budget ends; the
   finished shards are kept beside --out and `--resume` continues them.

`dry_run`: the same code on the CPU at tiny shapes (tiny models, 64 / 128 tokens, batch 1 and 2, speed in fp32, a few
documents of one local task), in about a minute: it checks the code path, and its numbers are never GPU figures (the
device and every shape say so). A model that is not installed is skipped with the reason, never a failure of the suite.
"""

from __future__ import annotations

import gc
import re
import time
from collections.abc import Callable
from contextlib import nullcontext
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from transformers import Cache, DynamicCache

from sink_eval.core import resume
from sink_eval.core.errors import SinkEvalError
from sink_eval.core.results import Provenance, TopLevel, provenance, to_json
from sink_eval.core.shape import model_shape
from sink_eval.evals import speed
from sink_eval.measure.probe import probe
from sink_eval.models.load import LoadedModel, load_model
from sink_eval.patches.base import Plan, kv_cache_bytes
from sink_eval.patches.copy import CopyPlan
from sink_eval.patches.streaming.plan import StreamingPlan

SCHEMA = "sink_eval.gpu_suite/1"
PARTS = ("correctness", "speed", "eval")
DEFAULT_BUDGET_S = 480.0
SPEED_SHARE = 0.65  # the speed part starts no case after this share of the budget
WRITE_RESERVE_S = 20.0  # kept at the end of the budget for writing the results

# Memory bandwidth by device name (bytes/s, the vendors' figures), matched in order on the lower-case name that torch
# reports: the first entry whose key it contains. Override with --bandwidth.
BANDWIDTHS: tuple[tuple[str, str, float], ...] = (
    ("h200", "H200 (HBM3e)", 4.8e12),
    ("gh200", "GH200 (HBM3)", 4.0e12),
    ("h100 nvl", "H100 NVL", 3.9e12),
    ("h100 pcie", "H100 PCIe", 2.0e12),
    ("h100", "H100 SXM", 3.35e12),
    ("a100-sxm4-80gb", "A100 SXM 80GB", 2.039e12),
    ("a100 80gb", "A100 80GB", 2.039e12),
    ("a100", "A100 40GB", 1.555e12),
    ("l40s", "L40S", 8.64e11),
    ("l4", "L4", 3.0e11),
    ("a10", "A10", 6.0e11),
    ("4090", "RTX 4090", 1.008e12),
)
DRY_RUN_BANDWIDTH = 2.0e10  # a nominal figure for a CPU's DRAM, so that the dry run computes every column

# Relative error of logits, max |Δ| of sink scores: the device in this dtype against the CPU in fp32.
TOLERANCES = {"float32": {"sink": 1e-4, "logits": 1e-4}, "bfloat16": {"sink": 3e-2, "logits": 5e-2}}
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}
DECODE_CHECK_STEPS = 4  # decode steps of the correctness checks

LLAMA_8B_SHAPE = dict(
    num_hidden_layers=32,
    hidden_size=4096,
    num_attention_heads=32,
    num_key_value_heads=8,
    head_dim=128,
    intermediate_size=14336,
    vocab_size=128256,
    max_position_embeddings=131072,
    rope_theta=500000.0,
    tie_word_embeddings=False,
)
DRY_LLAMA_SHAPE = LLAMA_8B_SHAPE | dict(
    num_hidden_layers=2,
    hidden_size=128,
    num_attention_heads=8,
    num_key_value_heads=4,
    head_dim=16,
    intermediate_size=256,
    vocab_size=512,
    max_position_embeddings=4096,
)
LLAMA_8B = "llama-3.1-8b-shape"


@dataclass(frozen=True)
class SuiteConfig:
    """What the suite runs: the real one on a GPU, or the dry run on the CPU (`config`)."""

    dry_run: bool
    device: str
    correctness_models: tuple[str, ...]
    dtypes: tuple[str, ...]
    correctness_tokens: int
    speed_models: tuple[str, ...]  # LLAMA_8B (random weights of that shape) or a zoo name
    speed_dtype: str
    lengths: tuple[int, ...]
    batches: tuple[int, ...]
    sink: int
    window: int
    decode_steps: int
    rounds: int
    eval_jobs: tuple[tuple[str, tuple[str, ...]], ...]  # (model, tasks)
    eval_limit: int | None
    eval_batch_size: int
    llama_shape: dict[str, Any] = field(default_factory=lambda: dict(LLAMA_8B_SHAPE))


def config(dry_run: bool, device: str = "cuda") -> SuiteConfig:
    if dry_run:
        return SuiteConfig(
            dry_run=True,
            device="cpu",
            correctness_models=("tiny-llama", "tiny-gemma3", "tiny-qwen2"),
            dtypes=("float32", "bfloat16"),
            correctness_tokens=32,
            speed_models=(LLAMA_8B, "tiny-qwen2"),
            speed_dtype="float32",  # the CPU's bfloat16 matmuls are slow, and the dry run's speed is no figure
            lengths=(64, 128),
            batches=(1, 2),
            sink=4,
            window=16,
            decode_steps=4,
            rounds=1,
            eval_jobs=(("tiny-llama", ("piqa",)),),
            eval_limit=4,
            eval_batch_size=4,
            llama_shape=dict(DRY_LLAMA_SHAPE),
        )
    return SuiteConfig(
        dry_run=False,
        device=device,
        correctness_models=("tiny-llama", "tiny-gemma3", "tiny-qwen2", "smollm2-135m"),
        dtypes=("float32", "bfloat16"),
        correctness_tokens=96,
        speed_models=(LLAMA_8B, "qwen2.5-coder-1.5b"),
        speed_dtype="bfloat16",
        lengths=(8192, 16384, 32768),
        batches=(1, 8),
        sink=4,
        window=256,
        decode_steps=16,
        rounds=1,
        eval_jobs=(("qwen2.5-coder-0.5b", ("hellaswag",)), ("qwen2.5-coder-1.5b", ("hellaswag", "arc_easy", "piqa"))),
        eval_limit=None,
        eval_batch_size=64,
    )


# -- results ------------------------------------------------------------------------------------------------------


@dataclass
class Bandwidth:
    name: str  # the table's entry, "given (--bandwidth)" or the dry run's nominal figure
    bytes_per_s: float
    source: str


@dataclass
class DeviceInfo:
    name: str  # torch's device name, e.g. "NVIDIA H200"; "cpu (dry run)"
    slug: str  # file name of the baseline, e.g. "nvidia-h200"
    dry_run: bool
    memory_bytes: int | None
    bandwidth: Bandwidth
    cuda: str | None  # torch's CUDA version
    tf32: bool  # whether float32 matmuls may use TF32 (off: the fp32 checks are held to fp32)


@dataclass
class Check:
    model: str
    dtype: str
    what: str
    value: float
    tolerance: float
    passed: bool


@dataclass
class SpeedCase:
    model: str
    label: str  # what the weights are and what the figure is (and is not)
    dtype: str
    tokens: int
    batch: int
    plan: dict[str, Any]  # the streaming plan (`Plan.to_json`)
    kv_groups_streamed: float  # fraction of all KV groups streamed whole
    skipped: str | None  # why the case was not measured (None: measured)
    prefill_unpatched_s: float | None = None  # medians of the paired rounds
    prefill_patched_s: float | None = None
    prefill_speedup: float | None = None
    prefill_share: float | None = None  # attention share a
    prefill_ceiling: float | None = None
    decode_unpatched_s: float | None = None  # per step (all rows)
    decode_patched_s: float | None = None
    decode_speedup: float | None = None
    decode_share: float | None = None
    decode_growth_share: float | None = None
    decode_ceiling: float | None = None
    peak_unpatched_bytes: int | None = None  # device memory peak of a prefill plus decode (None on the CPU)
    peak_patched_bytes: int | None = None
    kv_unpatched_bytes: int | None = None  # after the prefill and the decode steps
    kv_patched_bytes: int | None = None
    weight_bytes_read: int | None = None  # per decode step: every weight but an untied input embedding
    floor_unpatched_s: float | None = None  # bytes floor of a decode step, (weights + KV) / bandwidth
    floor_patched_s: float | None = None
    floor_per_token_unpatched_s: float | None = None  # the same / batch
    floor_per_token_patched_s: float | None = None
    floor_speedup: float | None = None  # the most the decode can gain from the bytes it no longer reads


@dataclass
class EvalPart:
    model: str
    tasks: list[str]
    status: str  # "complete", "partial" (the budget ended first; --resume continues) or "skipped" (no model or data)
    reason: str
    shards_done: int
    shards_total: int
    results_file: str | None  # the EvalResult JSON in --out, when complete
    summary: dict[str, dict[str, float]]  # run label -> task -> acc, when complete


@dataclass
class GpuSuiteResult(TopLevel, schema=SCHEMA, command="gpu-suite"):
    """The results.json of `sink-eval gpu-suite` (and, from a GPU run, `baselines/gpu/<device>.json`)."""

    device: DeviceInfo
    settings: dict[str, Any]
    budget_s: float
    wall_s: dict[str, float]  # per part, and "total"
    correctness: list[Check]
    correctness_skipped: dict[str, str]  # model -> why
    speed: list[SpeedCase]
    evals: list[EvalPart]
    provenance: Provenance

    @property
    def failed(self) -> list[Check]:
        return [check for check in self.correctness if not check.passed]


# -- device ---------------------------------------------------------------------------------------------------------


def device_slug(name: str) -> str:
    return re.sub(r"[^a-z0-9]+", "-", name.lower()).strip("-") or "device"


def bandwidth_of(name: str, given: float | None = None, dry_run: bool = False) -> Bandwidth:
    """The memory bandwidth the bytes floor uses: `given`, else the table's entry for the device name."""
    if given is not None:
        return Bandwidth("given (--bandwidth)", given, "command line")
    if dry_run:
        return Bandwidth("nominal CPU DRAM (dry run)", DRY_RUN_BANDWIDTH, "a round figure, not a measurement")
    lower = name.lower()
    for key, label, value in BANDWIDTHS:
        if key in lower:
            return Bandwidth(label, value, f"vendor figure for {label} (sink_eval.evals.gpu_suite.BANDWIDTHS)")
    raise SinkEvalError(
        f"no memory bandwidth known for {name!r}: give it with --bandwidth BYTES_PER_S (e.g. 3.35e12 for an H100 SXM)"
    )


def device_info(cfg: SuiteConfig, given_bandwidth: float | None = None) -> DeviceInfo:
    device = torch.device(cfg.device)
    if device.type == "cuda":
        name = torch.cuda.get_device_name(device)
        memory = torch.cuda.get_device_properties(device).total_memory
    else:
        name, memory = f"{device.type} (dry run)" if cfg.dry_run else device.type, None
    return DeviceInfo(
        name=name,
        slug=device_slug(name),
        dry_run=cfg.dry_run,
        memory_bytes=memory,
        bandwidth=bandwidth_of(name, given_bandwidth, cfg.dry_run),
        cuda=torch.version.cuda,
        tf32=bool(torch.backends.cuda.matmul.allow_tf32),
    )


def _free(device: torch.device) -> None:
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()


# -- 1. correctness ---------------------------------------------------------------------------------------------------


def _inputs(vocab: int, tokens: int, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """Two rows of random ids (from 3: past the tiny tokenizer's specials), the first left-padded by a quarter."""
    ids = torch.randint(3, vocab, (2, tokens), generator=torch.Generator().manual_seed(seed))
    mask = torch.ones_like(ids)
    mask[0, : tokens // 4] = 0
    return ids, mask


def group_plan(model: torch.nn.Module, share: float, sink: int, window: int) -> StreamingPlan:
    """A streaming plan streaming the first round(share × G) KV groups (at least one) whole in every candidate
    layer: every query head of those groups."""
    shape = model_shape(model)
    groups = max(1, round(share * shape.kv_heads))
    heads = list(range(groups * shape.group_size))
    return StreamingPlan.of(dict.fromkeys(StreamingPlan.candidate_layers(model), heads), sink=sink, window=window)


def copy_plan(model: torch.nn.Module) -> CopyPlan:
    """A copy plan of the first KV group's heads (whole: its cache drops) in the first and the last layer."""
    shape = model_shape(model)
    return CopyPlan.of(dict.fromkeys({0, shape.layers - 1}, list(range(shape.group_size))))


def _positions(mask: torch.Tensor) -> torch.Tensor:
    return (mask.long().cumsum(-1) - 1).clamp(min=0)


@torch.no_grad()
def _full_pass(model: torch.nn.Module, plan: Plan, ids: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    with plan.patched(model):
        return model(input_ids=ids, attention_mask=mask, position_ids=_positions(mask), use_cache=False).logits


@torch.no_grad()
def _decode_logits(
    model: torch.nn.Module, plan: Plan, ids: torch.Tensor, mask: torch.Tensor, steps: torch.Tensor
) -> tuple[torch.Tensor, Cache, list[int]]:
    """The logits of decode steps fed the fixed ids `steps` (B, k) one by one into the plan's own cache after a
    prefill of `ids`: (B, k, vocab), the cache, and its KV bytes after each step."""
    cache = plan.new_cache(model, mask)
    out = []
    sizes = []
    with plan.patched(model, cache):
        model(input_ids=ids, attention_mask=mask, position_ids=_positions(mask), cache=cache, logits_to_keep=1)
        for k in range(steps.shape[1]):
            mask = torch.cat([mask, torch.ones_like(mask[:, :1])], dim=1)
            step = model(
                input_ids=steps[:, k : k + 1],
                attention_mask=mask,
                position_ids=_positions(mask)[:, -1:],
                cache=cache,
                logits_to_keep=1,
            )
            out.append(step.logits[:, -1])
            sizes.append(kv_cache_bytes(cache))
    return torch.stack(out, dim=1), cache, sizes


def _relative(got: torch.Tensor, ref: torch.Tensor, real: torch.Tensor | None = None) -> float:
    got, ref = got.detach().float().cpu(), ref.detach().float().cpu()
    if real is not None:
        got, ref = got[real], ref[real]
    return float(torch.linalg.vector_norm(got - ref) / torch.linalg.vector_norm(ref))


@dataclass
class _Outputs:
    sink: list[torch.Tensor]
    copy_logits: torch.Tensor
    streaming_logits: torch.Tensor
    decode_logits: torch.Tensor
    kv_bytes: int
    constant: tuple[int, int]  # KV bytes of the all-streaming cache after the first and the last decode step


def _outputs(model: torch.nn.Module, ids: torch.Tensor, mask: torch.Tensor, sink: int, window: int) -> _Outputs:
    device = next(model.parameters()).device
    ids, mask = ids.to(device), mask.to(device)
    steps = torch.randint(
        3, model.config.vocab_size, (ids.shape[0], DECODE_CHECK_STEPS), generator=torch.Generator().manual_seed(1)
    )
    steps = steps.to(device)
    streaming = group_plan(model, 0.5, sink, window)
    decoded, cache, _ = _decode_logits(model, streaming, ids, mask, steps)
    sizes = _decode_logits(model, group_plan(model, 1.0, sink, window), ids, mask, steps)[2]
    return _Outputs(
        sink=[s.sink.float().cpu() for s in probe(model, ids, mask).stats],
        copy_logits=_full_pass(model, copy_plan(model), ids, mask),
        streaming_logits=_full_pass(model, streaming, ids, mask),
        decode_logits=decoded,
        kv_bytes=kv_cache_bytes(cache),
        constant=(sizes[0], sizes[-1]),
    )


def correctness(cfg: SuiteConfig, progress: Callable[[str], None] = print) -> tuple[list[Check], dict[str, str]]:
    """Every correctness check of every model and dtype (module doc); models that cannot be loaded are skipped."""
    checks: list[Check] = []
    skipped: dict[str, str] = {}
    device = torch.device(cfg.device)
    for name in cfg.correctness_models:
        try:
            reference_model = load_model(name)
        except SinkEvalError as err:
            skipped[name] = str(err)
            progress(f"correctness: {name} skipped: {err}")
            continue
        ids, mask = _inputs(reference_model.model.config.vocab_size, cfg.correctness_tokens)
        reference = _outputs(reference_model.model, ids, mask, cfg.sink, cfg.window)
        real = mask.bool()
        for dtype in cfg.dtypes:
            model = load_model(name, device=device, dtype=DTYPES[dtype]).model
            got = _outputs(model, ids, mask, cfg.sink, cfg.window)
            tol = TOLERANCES[dtype]
            scale = DTYPES[dtype].itemsize / torch.float32.itemsize
            values = {
                "probe sink scores, max abs difference": (
                    max(
                        float((g - r).abs().nan_to_num(0.0).max())
                        for g, r in zip(got.sink, reference.sink, strict=True)
                    )
                ),
                "copy plan logits, relative error": _relative(got.copy_logits, reference.copy_logits, real),
                "streaming plan logits, relative error": _relative(
                    got.streaming_logits, reference.streaming_logits, real
                ),
                "streaming decode logits in its cache, relative error": _relative(
                    got.decode_logits, reference.decode_logits
                ),
                "streaming cache KV bytes - CPU's x element size": abs(got.kv_bytes - reference.kv_bytes * scale),
                f"all-streaming cache bytes after {DECODE_CHECK_STEPS} steps - after 1": abs(
                    got.constant[1] - got.constant[0]
                ),
            }
            tolerances = [tol["sink"], tol["logits"], tol["logits"], tol["logits"], 0.0, 0.0]
            for (what, value), tolerance in zip(values.items(), tolerances, strict=True):
                checks.append(Check(name, dtype, what, value, tolerance, value <= tolerance))
            failed = [c.what for c in checks[-len(values) :] if not c.passed]
            progress(f"correctness: {name} {dtype}: {'FAILED ' + ', '.join(failed) if failed else 'all passed'}")
            del model
            _free(device)
        del reference_model
        _free(device)
    return checks, skipped


# -- 2. speed -------------------------------------------------------------------------------------------------------


def kv_bytes_per_token(config: Any, itemsize: int) -> int:
    """Keys and values of one token in every layer: 2 × layers × KV heads × head dim × bytes."""
    text = config.get_text_config(decoder=True)
    head_dim = getattr(text, "head_dim", None) or text.hidden_size // text.num_attention_heads
    return 2 * text.num_hidden_layers * text.num_key_value_heads * head_dim * itemsize


def weight_bytes_read(model: torch.nn.Module) -> int:
    """Bytes of the weights a decode step reads: every parameter once, but an input embedding that is not tied to the
    output layer (a step reads one row of it per token)."""
    embedding = model.get_input_embeddings().weight
    tied = embedding is model.get_output_embeddings().weight
    return sum(p.numel() * p.element_size() for p in model.parameters() if tied or p is not embedding)


def bytes_floor(weights: int, kv: int, bandwidth: float) -> float:
    """Seconds of a decode step that reads `weights` and `kv` bytes at `bandwidth` bytes/s."""
    return (weights + kv) / bandwidth


def speed_model(name: str, cfg: SuiteConfig, device: torch.device) -> tuple[torch.nn.Module, str]:
    """The model of a speed case in the suite's speed dtype on `device`, and its label."""
    dtype = DTYPES[cfg.speed_dtype]
    if name == LLAMA_8B:
        from transformers import AutoModelForCausalLM, LlamaConfig

        shape = cfg.llama_shape
        described = (
            f"{shape['num_hidden_layers']} layers, {shape['hidden_size']} hidden, "
            f"{shape['num_attention_heads']} heads, {shape['num_key_value_heads']} KV heads, "
            f"{shape['intermediate_size']} intermediate, vocab {shape['vocab_size']}"
        )
        with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []), device:
            torch.manual_seed(0)
            model = AutoModelForCausalLM.from_config(LlamaConfig(**shape), dtype=dtype).eval()
        if cfg.dry_run:
            label = f"dry run: a tiny Llama ({described}) standing in for the Llama-3.1-8B shape; not a GPU figure"
        else:
            label = f"Llama-3.1-8B shape ({described}), random weights: a shape benchmark, never a fidelity figure"
        return model, label
    loaded = load_model(name, device=device, dtype=dtype)
    label = f"{name}, its real weights"
    if cfg.dry_run:
        label = f"dry run: {name} (random weights) standing in for qwen2.5-coder-1.5b; not a GPU figure"
    return loaded.model, label


def _peak(device: torch.device, fn: Callable[[], object], base: int) -> int | None:
    """Peak device memory of `fn` alone on top of `base` bytes (the model's): the peak while it runs less what was
    allocated before it (other variants' caches), plus `base`. None on the CPU."""
    if device.type != "cuda":
        fn()
        return None
    speed.synchronize(device)
    before = torch.cuda.memory_allocated(device)
    torch.cuda.reset_peak_memory_stats(device)
    fn()
    speed.synchronize(device)
    return int(torch.cuda.max_memory_allocated(device)) - before + base


@torch.no_grad()
def _decode_steps(model: torch.nn.Module, token: torch.Tensor, cache: Cache, steps: int) -> tuple[float, torch.Tensor]:
    """Mean seconds of one greedy decode step over `steps` steps (the device synchronised at both clock reads)."""
    start = speed.clock(token.device)
    for _ in range(steps):
        token = model(input_ids=token, cache=cache, logits_to_keep=1).logits.argmax(-1)
    return (speed.clock(token.device) - start) / steps, token


@torch.no_grad()
def measure_case(
    model: torch.nn.Module,
    plan: StreamingPlan,
    tokens: int,
    batch: int,
    cfg: SuiteConfig,
    bandwidth: float,
    seconds_left: float,
) -> dict[str, Any]:
    """Prefill and decode of one (tokens, batch) case, unpatched against the plan, paired (module doc); {"skipped":
    reason} when the first prefill says the case would not fit in `seconds_left`."""
    device = next(model.parameters()).device
    shape = model_shape(model)
    ids = torch.randint(3, model.config.vocab_size, (batch, tokens), generator=torch.Generator().manual_seed(2))
    ids = ids.to(device)
    mask = torch.ones_like(ids)
    base = torch.cuda.memory_allocated(device) if device.type == "cuda" else 0  # the weights and the ids

    def prefill(context: Callable[[], Any]) -> Callable[[], None]:
        def run() -> None:
            with context():
                model(input_ids=ids, use_cache=False, logits_to_keep=1)

        return run

    unpatched_prefill = prefill(nullcontext)
    start = speed.clock(device)
    unpatched_prefill()
    first = speed.clock(device) - start
    # warm-ups (2), paired prefill rounds (4 per round), one prefill per decode cache (3), 2 x 3 decode runs per round
    estimate = first * (2 + 4 * cfg.rounds + 3) + first / tokens * cfg.decode_steps * 6 * cfg.rounds * 4
    if estimate > seconds_left:
        return {
            "skipped": f"budget: estimated {estimate:.0f} s from a {first:.1f} s prefill, {seconds_left:.0f} s left"
        }
    variants = {
        "patched": prefill(lambda: plan.patched(model)),
        "without": prefill(lambda: speed.without_attention(model)),
    }
    prefill_t = speed.paired(unpatched_prefill, variants, cfg.rounds, warmup=True, device=device)

    total_steps = 2 + cfg.decode_steps * 3 * cfg.rounds  # each cache's warm-up steps and timed rounds
    caches: dict[str, Cache] = {}
    tokens_of: dict[str, torch.Tensor] = {}
    peaks: dict[str, int | None] = {}

    def start_decode(name: str, cache: Cache, context: Callable[[Cache], Any]) -> None:
        def run() -> None:
            with context(cache):
                token = model(input_ids=ids, cache=cache, logits_to_keep=1).logits.argmax(-1)
                _, tokens_of[name] = _decode_steps(model, token, cache, 2)

        caches[name] = cache
        peaks[name] = _peak(device, run, base)

    start_decode("unpatched", DynamicCache(config=model.config), lambda cache: nullcontext())
    start_decode("patched", plan.new_cache(model, mask), lambda cache: plan.patched(model, cache))
    start_decode(
        "static",
        speed.growth_free_cache(model, tokens + total_steps + 2),
        lambda cache: speed.without_attention(model),
    )

    def decode(name: str, context: Callable[[], Any]) -> Callable[[], float]:
        def run() -> float:
            with context():
                seconds, tokens_of[name] = _decode_steps(model, tokens_of[name], caches[name], cfg.decode_steps)
            return seconds

        return run

    decode_t = speed.paired(
        decode("unpatched", nullcontext),
        {
            "patched": decode("patched", lambda: plan.patched(model, caches["patched"])),
            # the unpatched cache, its attention skipped: the same growth, no attention
            "without": decode("unpatched", lambda: speed.without_attention(model)),
            "static": decode("static", lambda: speed.without_attention(model)),
        },
        cfg.rounds,
        warmup=False,
        device=device,
    )
    prefill_share = speed.attention_share(prefill_t["without"])
    decode_share = speed.attention_share(decode_t["without"])
    growth = speed.growth_share(decode_t["without"], decode_t["static"])
    kv_unpatched, kv_patched = kv_cache_bytes(caches["unpatched"]), kv_cache_bytes(caches["patched"])
    weights = weight_bytes_read(model)
    floor_u, floor_p = bytes_floor(weights, kv_unpatched, bandwidth), bytes_floor(weights, kv_patched, bandwidth)
    groups = plan.kv_groups_removed(shape) / (shape.layers * shape.kv_heads)
    return {
        "skipped": None,
        "prefill_unpatched_s": prefill_t["patched"].unpatched_s,
        "prefill_patched_s": prefill_t["patched"].variant_s,
        "prefill_speedup": prefill_t["patched"].speedup,
        "prefill_share": prefill_share,
        "prefill_ceiling": speed.ceiling(plan.work_removed(shape, tokens, 0), prefill_share),
        "decode_unpatched_s": decode_t["patched"].unpatched_s,
        "decode_patched_s": decode_t["patched"].variant_s,
        "decode_speedup": decode_t["patched"].speedup,
        "decode_share": decode_share,
        "decode_growth_share": growth,
        "decode_ceiling": speed.ceiling(plan.work_removed(shape, tokens, 1), decode_share, groups, growth),
        "peak_unpatched_bytes": peaks["unpatched"],
        "peak_patched_bytes": peaks["patched"],
        "kv_unpatched_bytes": kv_unpatched,
        "kv_patched_bytes": kv_patched,
        "weight_bytes_read": weights,
        "floor_unpatched_s": floor_u,
        "floor_patched_s": floor_p,
        "floor_per_token_unpatched_s": floor_u / batch,
        "floor_per_token_patched_s": floor_p / batch,
        "floor_speedup": floor_u / floor_p,
    }


def speed_part(
    cfg: SuiteConfig, bandwidth: float, deadline: float, progress: Callable[[str], None] = print
) -> list[SpeedCase]:
    """Every speed case (module doc), batch 1 of every model before batch 8, each model's lengths ascending (so that
    the budget drops the costliest cases); those that would end past the deadline, or run out of memory, skipped.
    The models stay loaded together (the Llama-3.1-8B shape and the 1.5B take about 19 GB in bf16)."""
    device = torch.device(cfg.device)
    loaded: dict[str, tuple[torch.nn.Module, str, StreamingPlan] | str] = {}
    for name in cfg.speed_models:
        try:
            model, label = speed_model(name, cfg, device)
            loaded[name] = (model, label, group_plan(model, 0.5, cfg.sink, cfg.window))
        except SinkEvalError as err:
            progress(f"speed: {name} skipped: {err}")
            loaded[name] = f"not loaded: {err}"
    cases: list[SpeedCase] = []
    for batch in cfg.batches:
        for name, entry in loaded.items():
            for tokens in cfg.lengths:
                if isinstance(entry, str):
                    cases.append(SpeedCase(name, name, cfg.speed_dtype, tokens, batch, {}, 0.0, entry))
                    continue
                model, label, plan = entry
                shape = model_shape(model)
                fraction = plan.kv_groups_removed(shape) / (shape.layers * shape.kv_heads)
                case = SpeedCase(name, label, cfg.speed_dtype, tokens, batch, plan.to_json(), fraction, None)
                try:
                    measured = measure_case(model, plan, tokens, batch, cfg, bandwidth, deadline - time.monotonic())
                except torch.cuda.OutOfMemoryError as err:
                    measured = {"skipped": f"out of device memory: {str(err).splitlines()[0]}"}
                for key, value in measured.items():
                    setattr(case, key, value)
                cases.append(case)
                what = case.skipped or (
                    f"prefill x{case.prefill_speedup:.2f} (ceiling {case.prefill_ceiling:.2f}), "
                    f"decode x{case.decode_speedup:.2f} (ceiling {case.decode_ceiling:.2f}, bytes floor "
                    f"{case.floor_speedup:.2f})"
                )
                progress(f"speed: {name} {tokens} tokens x {batch}: {what}")
                _free(device)
    loaded.clear()
    _free(device)
    return cases


# -- 3. eval --------------------------------------------------------------------------------------------------------


def _dry_calibration(loaded: LoadedModel) -> list:
    """The dry run's calibration: the first 4 default calibration prompts cut to 64 tokens (the full set takes
    half a minute to probe on the CPU)."""
    from sink_eval.measure.probe import probe_prompts
    from sink_eval.prompts.prompt_set import default_split, tokenize

    prompts = tokenize(loaded.tokenizer, default_split()[0][:4], 64, truncate=True)
    return [p.stats for p in probe_prompts(loaded, prompts, progress=False)]


def eval_part(
    cfg: SuiteConfig,
    work: Path,
    deadline: float,
    command: str,
    progress: Callable[[str], None] = print,
) -> tuple[list[EvalPart], dict[str, dict]]:
    """The lm-eval jobs, unpatched and calibrated τ 0.8, shard by shard until the deadline (module doc): each job's
    part, and the finished jobs' results JSON by file name."""
    from sink_eval.evals.accuracy import SHARD_DOCS, OutOfTime, check_data_file, locate, run_eval, shards
    from sink_eval.policies.registry import policy_class

    parts: list[EvalPart] = []
    files: dict[str, dict] = {}
    for name, tasks in cfg.eval_jobs:
        out = work / f"eval-{name}"
        try:
            documents = {task: check_data_file(task, locate(task)) for task in tasks}
        except SinkEvalError as err:
            parts.append(EvalPart(name, list(tasks), "skipped", str(err), 0, 0, None, {}))
            continue
        total = 2 * sum(len(shards(min(n, cfg.eval_limit or n), SHARD_DOCS)) for n in documents.values())
        eval_work = resume.work_dir(out, "eval")
        done = len(list(eval_work.glob("run-*.json"))) if eval_work.exists() else 0
        if time.monotonic() >= deadline:
            parts.append(EvalPart(name, list(tasks), "partial", "the time budget ended first", done, total, None, {}))
            continue
        try:
            loaded = load_model(name, device=cfg.device)
        except SinkEvalError as err:
            parts.append(EvalPart(name, list(tasks), "skipped", f"not loaded: {err}", 0, total, None, {}))
            continue
        calibrated = policy_class("calibrated").with_options(threshold=0.8)
        calibration = _dry_calibration(loaded) if cfg.dry_run else None
        try:
            res = run_eval(
                loaded,
                [calibrated],
                list(tasks),
                cfg.eval_limit,
                batch_size=cfg.eval_batch_size,
                command=command,
                out=out,
                resume_run=True,  # continue what an interrupted suite saved (the command refuses one without --resume)
                calibration=calibration,
                deadline=deadline,
            )
        except OutOfTime as stop:
            done = len(list(eval_work.glob("run-*.json")))
            parts.append(EvalPart(name, list(tasks), "partial", str(stop), done, total, None, {}))
            progress(f"eval: {name}: {done} of {total} shards done; the rest with --resume")
            continue
        finally:
            del loaded
            _free(torch.device(cfg.device))
        file = f"eval-{name}.json"
        files[file] = res.to_json()
        resume.finish(eval_work)
        summary = {run.label: {task: score.acc for task, score in run.tasks.items()} for run in res.runs}
        parts.append(EvalPart(name, list(tasks), "complete", "", total, total, file, summary))
        progress(f"eval: {name}: complete, {summary}")
    return parts, files


# -- the suite ------------------------------------------------------------------------------------------------------


def run(
    cfg: SuiteConfig,
    budget_s: float,
    work: Path,
    parts: tuple[str, ...] = PARTS,
    bandwidth: float | None = None,
    command: str = "",
    earlier: GpuSuiteResult | None = None,
    progress: Callable[[str], None] = print,
) -> tuple[GpuSuiteResult, dict[str, dict]]:
    """The suite's parts in order within `budget_s` (module doc); parts not run are kept from `earlier` (the results
    of the run being resumed), if given. Returns the results and the finished lm-eval results by file name."""
    threads = torch.get_num_threads()
    if cfg.dry_run:  # tiny shapes gain nothing from threads, and lose much to a busy machine's contended ones
        torch.set_num_threads(1)
    try:
        return _run(cfg, budget_s, work, parts, bandwidth, command, earlier, progress)
    finally:
        torch.set_num_threads(threads)


def _run(
    cfg: SuiteConfig,
    budget_s: float,
    work: Path,
    parts: tuple[str, ...],
    bandwidth: float | None,
    command: str,
    earlier: GpuSuiteResult | None,
    progress: Callable[[str], None],
) -> tuple[GpuSuiteResult, dict[str, dict]]:
    start = time.monotonic()
    torch.backends.cuda.matmul.allow_tf32 = False  # fp32 checks and figures in fp32
    info = device_info(cfg, bandwidth)
    wall: dict[str, float] = dict(earlier.wall_s) if earlier else {}
    checks, skipped = (earlier.correctness, earlier.correctness_skipped) if earlier else ([], {})
    cases = earlier.speed if earlier else []
    evals = earlier.evals if earlier else []
    files: dict[str, dict] = {}
    if "correctness" in parts:
        t = time.monotonic()
        checks, skipped = correctness(cfg, progress)
        wall["correctness"] = time.monotonic() - t
    if "speed" in parts:
        t = time.monotonic()
        cases = speed_part(cfg, info.bandwidth.bytes_per_s, start + SPEED_SHARE * budget_s, progress)
        wall["speed"] = time.monotonic() - t
    if "eval" in parts:
        t = time.monotonic()
        evals, files = eval_part(cfg, work, start + budget_s - WRITE_RESERVE_S, command, progress)
        wall["eval"] = time.monotonic() - t
    wall["total"] = time.monotonic() - start
    settings = to_json(cfg) | {"parts": list(parts), "tolerances": TOLERANCES, "speed_share": SPEED_SHARE}
    result = GpuSuiteResult(
        device=info,
        settings=settings,
        budget_s=budget_s,
        wall_s=wall,
        correctness=checks,
        correctness_skipped=skipped,
        speed=cases,
        evals=evals,
        provenance=provenance(command, ("sink_eval", "torch", "transformers", "lm_eval")),
    )
    return result, files


def incomplete_evals(result: GpuSuiteResult) -> bool:
    return any(part.status == "partial" for part in result.evals)


def check_budget(budget_s: float) -> None:
    if budget_s <= WRITE_RESERVE_S:
        raise SinkEvalError(f"--budget-s {budget_s:g} leaves no time: give more than {WRITE_RESERVE_S:g} seconds")
