"""The plan interface: one abstract `Plan` that every patch kind implements, and the machinery they share.

A plan names, per layer, the query heads a patch changes (`heads`, layer -> heads), and defines what a planned head
attends to (`allowed`: which keys its query may see). A plan kind is one subclass in one file, registered by its
`kind` name (`PLAN_KINDS`): `CopyPlan` (`sink_eval.patches.copy`: a planned head outputs the first token's value)
and `StreamingPlan` (`sink_eval.patches.streaming`: the first s tokens and a window of the last w keys).

Running a plan: `plan.patched(model[, cache])` switches the model, inside a block, to the registered attention
implementation "sink_<kind>" (transformers' `AttentionInterface`, with SDPA's mask function beside it), which asks
the plan's `PatchState` for each layer's output: heads the plan does not name run transformers' own SDPA, so an
empty plan is the unpatched model. `plan.new_cache(model, mask)` is the plan's decode cache (what KV memory it
saves), `plan.generate(...)` greedy generation into it, `plan.layer_errors(...)` each layer's error against the exact
attention. A kind supplies `allowed` and, for speed, its own `PatchState` and cache; the default `PatchState`
computes planned layers by `reference_attention`, the plain masked eager definition (`plan.reference(model)`), so a
new kind works (slowly) with `allowed` alone, and every kind's fast patch is tested against it.

Accounting, the same for every kind: `fraction` of (layer, head) pairs planned, `whole_groups` (KV groups all of
whose query heads are planned), `work_removed` (the fraction f of the attention work a forward pass skips, for the
speed ceilings of `sink_eval.evals.speed`), `kv_groups_removed` (KV groups whose decode cache stops growing), and
`kv_cache_bytes` of any cache. A kind that does not say what work it removes claims none (f = 0).
"""

from __future__ import annotations

import contextvars
import dataclasses
from abc import ABC, abstractmethod
from collections.abc import Iterable, Iterator, Mapping
from contextlib import AbstractContextManager, contextmanager, nullcontext
from dataclasses import dataclass, field
from typing import Any, ClassVar, Self, TypeAlias

import torch
from transformers import LogitsProcessorList
from transformers.cache_utils import Cache, DynamicCache
from transformers.integrations.sdpa_attention import sdpa_attention_forward
from transformers.masking_utils import sdpa_mask

from sink_eval.core import attention
from sink_eval.core.errors import SinkEvalError
from sink_eval.core.shape import Shape, model_shape

SUPPORTED_MODEL_TYPES = ("llama", "gemma3_text", "qwen2")
PLAN_KINDS: dict[str, type[Plan]] = {}  # kind name -> plan class, filled as each kind's module is imported


def is_index(value: object) -> bool:
    """A layer or head index: an int, not a bool."""
    return isinstance(value, int) and not isinstance(value, bool)


def _head_set(kind: str, layer: object, heads: object) -> frozenset:
    """The heads of one layer as a set; a string or a non-collection is refused."""
    if isinstance(heads, str | bytes) or not isinstance(heads, Iterable):
        raise SinkEvalError(f"a {kind} plan maps each layer to a collection of head ints; layer {layer} has {heads!r}")
    return frozenset(heads)


def _check_indices(kind: str, items: Iterable[tuple[object, Iterable[object]]]) -> None:
    """Rule: a plan's layers and heads are ints (not bools, floats or strings), so that it does what it counts."""
    for layer, heads in items:
        if not is_index(layer):
            raise SinkEvalError(f"a {kind} plan's layers are ints, not {layer!r} ({type(layer).__name__})")
        bad = [h for h in heads if not is_index(h)]
        if bad:
            name = type(bad[0]).__name__
            raise SinkEvalError(f"a {kind} plan's heads are ints; layer {layer} names {bad[0]!r} ({name})")


@dataclass(frozen=True)
class Plan(ABC):
    """Which query heads a patch changes, per layer (0-based), and how (`allowed`). Subclasses are frozen
    dataclasses that add their own settings (a copy plan's hybrid limits, a streaming plan's s and w)."""

    kind: ClassVar[str]
    heads: Mapping[int, frozenset[int]] = field(default_factory=dict)

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        if "kind" in cls.__dict__:
            PLAN_KINDS[cls.kind] = cls

    def __post_init__(self) -> None:
        _check_indices(self.kind, self.heads.items())

    @classmethod
    def of(cls, heads: Mapping[int, Iterable[int]], *args: Any, **kwargs: Any) -> Self:
        """A plan from layer -> heads (layers without heads left out) and the kind's own settings."""
        items = [(layer, _head_set(cls.kind, layer, h)) for layer, h in heads.items()]
        _check_indices(cls.kind, items)  # before sorting: mixed types do not sort
        return cls({layer: h for layer, h in sorted(items) if h}, *args, **kwargs)

    # -- what a kind defines ---------------------------------------------------------------------------------------

    @abstractmethod
    def allowed(self, query_pos: torch.Tensor, key_pos: torch.Tensor, first: torch.Tensor) -> torch.Tensor:
        """Which keys a planned head's query may attend to (broadcast shapes; absolute positions, `first` the row's
        first non-padding position): the definition of the patch, which `reference_attention` computes plainly."""

    def state(self, model: torch.nn.Module, cache: Cache | None) -> PatchState:
        """What the registered attention reads while the plan runs on `model` (checked here)."""
        return PatchState(self, self.check(model), cache)

    def new_cache(self, model: torch.nn.Module, attention_mask: torch.Tensor) -> Cache:
        """The plan's decode cache for a left-padded batch with this mask (B, N); by default the model's own, which
        keeps every entry (no KV memory saved)."""
        self.check(model)
        return PlanCache(model, attention_mask)

    @classmethod
    def candidate_layers(cls, model: torch.nn.Module) -> list[int]:
        """The layers a plan of this kind may name (every layer by default)."""
        return list(range(model_shape(model).layers))

    def not_a_candidate(self, layer: int, candidates: list[int]) -> str:
        """Why `layer` may not be planned, for the error message."""
        return f"a {self.kind} plan may name the layers {candidates}, not layer {layer}"

    @property
    def conditional(self) -> bool:
        """Whether the plan applies to some forward passes only (then it keeps the whole cache)."""
        return False

    def applies(self, seq_len: int, decode_step: int) -> bool:
        """Whether the plan changes a forward pass over `seq_len` positions; decode step 0 is the prefill."""
        return bool(self.heads)

    def work_removed(self, shape: Shape, seq_len: int, decode_step: int) -> float:
        """The fraction f of the model's attention work a forward pass skips (none, unless a kind says so)."""
        return 0.0

    def kv_groups_removed(self, shape: Shape) -> int:
        """KV groups whose decode cache stops growing under `new_cache` (none, unless a kind says so)."""
        return 0

    def to_json(self) -> dict:
        """The plan as JSON: heads (layer -> sorted heads) and the kind's own settings."""
        out: dict[str, Any] = {"heads": {str(layer): sorted(h) for layer, h in self.heads.items()}}
        out.update({f.name: getattr(self, f.name) for f in dataclasses.fields(self) if f.name != "heads"})
        return out

    # -- shared ----------------------------------------------------------------------------------------------------

    def with_heads(self, heads: Mapping[int, Iterable[int]]) -> Self:
        """A plan of the same kind and settings planning `heads` instead (a random control's)."""
        settings = {f.name: getattr(self, f.name) for f in dataclasses.fields(self) if f.name != "heads"}
        return type(self).of(heads, **settings)

    def n_heads(self) -> int:
        return sum(len(h) for h in self.heads.values())

    def fraction(self, layers: int, heads: int) -> float:
        """Fraction of all (layer, head) pairs the plan names."""
        return self.n_heads() / (layers * heads)

    def per_layer(self, layers: int) -> list[int]:
        return [len(self.heads.get(layer, ())) for layer in range(layers)]

    def whole_groups(self, shape: Shape) -> dict[int, frozenset[int]]:
        """Per layer, the KV groups all of whose query heads the plan names."""
        return shape.whole_groups(self.heads)

    def n_whole_groups(self, shape: Shape) -> int:
        return shape.n_whole_groups(self.heads)

    def check(self, model: torch.nn.Module) -> Shape:
        """The model's shape, after checking that the patches support it and that the plan fits it."""
        shape = model_shape(model)
        if shape.model_type not in SUPPORTED_MODEL_TYPES:
            raise SinkEvalError(
                f"the {self.kind} patch supports {', '.join(SUPPORTED_MODEL_TYPES)} models, not {shape.model_type!r}"
            )
        candidates = self.candidate_layers(model)
        for layer, heads in self.heads.items():
            if not 0 <= layer < shape.layers:
                raise SinkEvalError(f"the plan names layer {layer}; the model has layers 0..{shape.layers - 1}")
            if layer not in candidates:
                raise SinkEvalError(self.not_a_candidate(layer, candidates))
            bad = sorted(h for h in heads if not 0 <= h < shape.heads)
            if bad:
                raise SinkEvalError(
                    f"the plan names head(s) {bad} of layer {layer}; the model has heads 0..{shape.heads - 1}"
                )
        return shape

    @property
    def attention_name(self) -> str:
        """The name its attention implementation is registered under."""
        return f"sink_{self.kind}"

    @contextmanager
    def patched(self, model: torch.nn.Module, cache: Cache | None = None) -> Iterator[None]:
        """Run `model` under the plan inside the block; the previous attention is restored on exit, also after an
        exception. `cache`: the plan's own cache (`new_cache`), to decode token by token with its savings."""
        state = self.state(model, cache)
        with running(model, state, self.attention_name, patch=True), state.using():
            yield

    def reference(self, model: torch.nn.Module) -> AbstractContextManager[None]:
        """Run `model` under the plan's `reference_attention` inside the block (every head of a planned layer by
        eager masked attention; the model's own cache keeps every entry): slow, the definition a kind's fast patch
        is held to."""
        state = PatchState(self, self.check(model), None)
        return running(model, state, f"{self.attention_name}_reference", patch=True)

    @torch.no_grad()
    def generate(
        self,
        model: torch.nn.Module,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        max_new_tokens: int = 32,
        logits_processor: LogitsProcessorList | None = None,
    ) -> tuple[torch.Tensor, Cache]:
        """Greedy generation of `max_new_tokens` (at least 1) after input_ids (B, N) under the plan, into its cache:
        (prompt + new token ids (B, N + new), the cache). `logits_processor`: as `greedy`'s."""
        if not is_index(max_new_tokens) or max_new_tokens < 1:
            raise SinkEvalError(
                f"max_new_tokens is the number of tokens to generate, at least 1, not {max_new_tokens!r}"
            )
        if attention_mask is None:
            attention_mask = torch.ones_like(input_ids)
        cache = self.new_cache(model, attention_mask)
        with self.patched(model, cache):
            ids = greedy(model, input_ids, attention_mask, cache, max_new_tokens, logits_processor)
        return ids, cache

    @torch.no_grad()
    def layer_errors(
        self, model: torch.nn.Module, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None
    ) -> dict[int, float]:
        """Per-layer relative error of the patched attention output against the exact one on the same input.

        error(l) = ||O_patched(l) - O_exact(l)|| / ||O_exact(l)|| (Frobenius norms over heads, features and
        non-padding queries), both from the exact model's hidden states: each layer's own error, not accumulated
        ones. Layers the plan does not touch have error 0 and are left out."""
        if attention_mask is None:
            attention_mask = torch.ones_like(input_ids)
        first_positions(attention_mask)
        state = self.state(model, None)
        state.errors = {}
        with running(model, state, f"{self.attention_name}_error", patch=False):
            model(input_ids=input_ids, attention_mask=attention_mask, use_cache=False, logits_to_keep=1)
        return dict(sorted(state.errors.items()))


@dataclass(frozen=True)
class LayerHeads:
    """One layer's query heads under a plan, and their KV groups (query head h uses group h // group size)."""

    planned: list[int]  # sorted
    planned_groups: list[int]  # the planned heads' KV groups, sorted
    whole: bool  # the planned heads are exactly every head of `planned_groups`, in order
    attending: list[int]  # the heads that still attend in full
    kept_groups: list[int]  # their KV groups

    @classmethod
    def of(cls, heads: frozenset[int], shape: Shape) -> LayerHeads:
        g = shape.group_size
        planned = sorted(heads)
        groups = sorted({h // g for h in planned})
        attending = [h for h in range(shape.heads) if h not in heads]
        whole = planned == [k * g + i for k in groups for i in range(g)]
        return cls(planned, groups, whole, attending, sorted({h // g for h in attending}))

    @property
    def dropped_groups(self) -> frozenset[int]:
        """The planned groups no attending head uses."""
        return frozenset(self.planned_groups) - set(self.kept_groups)


class PlanCache(DynamicCache):
    """transformers' `DynamicCache`, holding also each row's first non-padding position `first` (B,) read off the
    attention mask it was made for: in a decode step the mask no longer shows it."""

    def __init__(self, model: torch.nn.Module, attention_mask: torch.Tensor):
        super().__init__(config=model.config)
        self.first = first_positions(attention_mask)


@dataclass(frozen=True)
class AttentionCall:
    """One call of a layer's attention, as transformers makes it: query (B, H, T, D) at the last T of S positions,
    key/value (B, H_kv, S, D), the boolean SDPA mask (B, 1, T, S) or None (causal), the score scaling."""

    module: torch.nn.Module
    query: torch.Tensor
    key: torch.Tensor
    value: torch.Tensor
    mask: torch.Tensor | None
    scaling: float | None

    @property
    def layer(self) -> int:
        return self.module.layer_idx

    @property
    def full_pass(self) -> bool:
        """No earlier context: the queries are every position."""
        return self.query.shape[2] == self.key.shape[2]

    def exact(self) -> torch.Tensor:
        """transformers' own SDPA attention of the call: (B, T, H, D)."""
        return sdpa_attention_forward(self.module, self.query, self.key, self.value, self.mask, 0.0, self.scaling)[0]


class PatchState:
    """A plan running on one model: what the registered attention function asks, on every call, for the layer's
    output. This default computes every head of a planned layer by `reference_attention`, the plain definition: slow,
    and what each kind's own fast state is tested against (`Plan.reference`)."""

    def __init__(self, plan: Plan, shape: Shape, cache: Cache | None):
        self.plan = plan
        self.shape = shape
        self.cache = cache
        self.layers = {layer: LayerHeads.of(heads, shape) for layer, heads in plan.heads.items()}
        self.errors: dict[int, float] | None = None  # per layer, while `Plan.layer_errors` records them
        self._first_of_mask: tuple[torch.Tensor, torch.Tensor] | None = None

    def using(self) -> AbstractContextManager[object]:
        """A context the plan's run holds (e.g. its cache accepting updates)."""
        return nullcontext()

    def first(self, call: AttentionCall) -> torch.Tensor:
        """The first non-padding position of each row (B,): held by the plan's cache; else read off a boolean SDPA
        mask: in a full pass its diagonal (a real token sees itself; right for sliding-window layers too), in a step
        after cached context the first key the new token may see (right for full-attention layers)."""
        mask, query = call.mask, call.query
        if isinstance(self.cache, PlanCache):
            return self.cache.first.to(query.device)
        if mask is None:
            return torch.zeros(query.shape[0], dtype=torch.long, device=query.device)
        if mask.dtype != torch.bool:
            raise SinkEvalError(f"the {self.plan.kind} patch expects SDPA's boolean masks")
        if not call.full_pass:
            return mask[:, 0, -1].long().argmax(dim=-1)
        if self._first_of_mask is None or self._first_of_mask[0] is not mask:  # the same mask serves every layer
            t_len = query.shape[2]
            diagonal = torch.diagonal(mask[:, 0, :, mask.shape[-1] - t_len :], dim1=-2, dim2=-1)
            self._first_of_mask = (mask, diagonal.long().argmax(dim=-1))
        return self._first_of_mask[1]

    def output(self, call: AttentionCall) -> torch.Tensor | None:
        """The patched attention output (B, T, H, D) of one layer's call; None where the plan changes nothing there
        (the exact attention applies)."""
        if call.layer not in self.layers:
            return None
        return reference_attention(self.plan, call, self.first(call))


def reference_attention(plan: Plan, call: AttentionCall, first: torch.Tensor) -> torch.Tensor:
    """A plan's attention at `layer`, as plainly as it can be written: eager softmax attention of every head, a
    planned head under the mask `plan.allowed`, any other under the model's own boolean mask (causal, padding, sliding
    window; None: causal). A query that may see no key sees itself (a padding row, whose output is not used).
    The call's key/value hold every position; first (B,) the rows' first real positions -> output (B, T, H, D)."""
    query, key, value, mask, scaling = call.query, call.key, call.value, call.mask, call.scaling
    batch, heads, t_len, dim = query.shape
    s_len = key.shape[2]
    group = heads // key.shape[1]
    key, value = key.repeat_interleave(group, dim=1), value.repeat_interleave(group, dim=1)  # (B, H, S, D)
    query_pos = torch.arange(s_len - t_len, s_len, device=query.device).view(1, 1, t_len, 1)
    key_pos = torch.arange(s_len, device=query.device).view(1, 1, 1, s_len)
    own = key_pos <= query_pos if mask is None else mask
    planned = torch.zeros(1, heads, 1, 1, dtype=torch.bool, device=query.device)
    planned[0, sorted(plan.heads.get(call.layer, ())), 0, 0] = True
    allowed = torch.where(planned, plan.allowed(query_pos, key_pos, first.view(batch, 1, 1, 1)), own)
    allowed = allowed | ((key_pos == query_pos) & ~allowed.any(dim=-1, keepdim=True))
    scores = query @ key.transpose(-1, -2) * (dim**-0.5 if scaling is None else scaling)
    probs = scores.masked_fill(~allowed, float("-inf")).softmax(dim=-1)
    return (probs @ value).transpose(1, 2)


_ACTIVE: contextvars.ContextVar[PatchState | None] = contextvars.ContextVar("sink_eval_patch", default=None)


def _active_state(module: torch.nn.Module, kwargs: dict) -> PatchState:
    """The running plan's state, after checking that the attention call is one the patches support."""
    state = _ACTIVE.get()
    if state is None:
        raise RuntimeError("a sink_eval patch's attention ran outside Plan.patched() or Plan.layer_errors()")
    if kwargs.get("softcap") is not None:
        raise SinkEvalError(f"the {state.plan.kind} patch does not support attention logit soft-capping")
    if module.training:
        raise SinkEvalError(f"the {state.plan.kind} patch is for inference: call model.eval() first")
    return state


def patch_attention(
    module: torch.nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: torch.Tensor | None,
    dropout: float = 0.0,
    scaling: float | None = None,
    **kwargs,
) -> tuple[torch.Tensor, None]:
    """The registered attention of every plan kind: query (B, H, T, D), key/value (B, H_kv', S, D) -> (B, T, H, D),
    the running plan's output where it changes the layer, else transformers' own SDPA. While `Plan.layer_errors`
    records errors, it records the relative error of the plan's output against the exact one and returns the exact
    one, so that every layer sees the exact model's hidden states."""
    state = _active_state(module, kwargs)
    call = AttentionCall(module, query, key, value, attention_mask, scaling)
    out = state.output(call)
    if out is not None and state.errors is None:
        return out, None
    exact, _ = sdpa_attention_forward(module, query, key, value, attention_mask, dropout, scaling, **kwargs)
    if out is not None and state.errors is not None:
        state.errors[call.layer] = relative_error(out, exact, state.first(call))
    return exact, None


@contextmanager
def running(model: torch.nn.Module, state: PatchState, name: str, patch: bool) -> Iterator[None]:
    """Run `model` with `patch_attention` (registered as `name`, with SDPA's masks) reading `state`; `patch`: a patch,
    which another patch may not nest in (`sink_eval.core.attention.use`)."""
    token = _ACTIVE.set(state)
    try:
        with attention.use(model, name, patch_attention, sdpa_mask, patch=patch):
            yield
    finally:
        _ACTIVE.reset(token)


def relative_error(out: torch.Tensor, exact: torch.Tensor, first: torch.Tensor) -> float:
    """||out - exact|| / ||exact|| over the non-padding queries: outputs (B, T, H, D), `first` (B,) the first real
    position of each row."""
    t_len = exact.shape[1]
    real = torch.arange(t_len, device=exact.device)[None, :] >= first[:, None]  # (B, T) non-padding queries
    return float(torch.linalg.vector_norm((out - exact)[real].float()) / torch.linalg.vector_norm(exact[real].float()))


def first_positions(attention_mask: torch.Tensor) -> torch.Tensor:
    """First non-padding position per row (B,) of a left-padded (B, N) mask."""
    if bool((attention_mask[:, -1] == 0).any()):
        raise SinkEvalError("the patches need left padding: set tokenizer.padding_side = 'left'")
    return attention_mask.long().argmax(dim=-1)


HeadIndex: TypeAlias = slice | torch.Tensor


def head_index(heads: list[int], device: torch.device) -> HeadIndex:
    """`heads` (sorted) as an index of a head dimension, made once: a slice where they are a consecutive range (a view,
    no copy), else an index tensor on `device`."""
    if heads and heads == list(range(heads[0], heads[0] + len(heads))):
        return slice(heads[0], heads[0] + len(heads))
    return torch.tensor(heads, dtype=torch.long, device=device)


def take(x: torch.Tensor, index: HeadIndex) -> torch.Tensor:
    """x[:, index] for x (B, heads, ...) and a `head_index`."""
    return x[:, index] if isinstance(index, slice) else x.index_select(1, index)


def select_heads(x: torch.Tensor, heads: list[int]) -> torch.Tensor:
    """x[:, heads] for x (B, H, ...): a view where the heads are a consecutive range, else a gathered
    copy (`head_index` made on the spot; a hot path makes it once and calls `take`)."""
    return take(x, head_index(heads, x.device))


def attend_heads(
    layer: LayerHeads, group_size: int, call: AttentionCall, key: torch.Tensor, value: torch.Tensor, kv_index: dict
) -> tuple[list[int], torch.Tensor]:
    """SDPA for the layer's attending heads of `call` over `key`/`value` (B, H_kv', S, D) (the call's own, or a plan
    cache's kept groups; `kv_index`: KV group -> their row), in one call: (the query heads computed, their output
    (B, h, T, D)).

    Prefill is compute-bound: exactly the attending heads are computed, each with its KV head gathered (a copy of
    O(S D) per head, small beside the O(T S D) attention). Decode is bound by the bytes of K/V read: every head of a
    kept KV group is computed against that group's K/V, read once (GQA), and no K/V is copied; the planned heads'
    rows are overwritten afterwards.
    """
    sdpa = torch.nn.functional.scaled_dot_product_attention
    query, mask, scaling = call.query, call.mask, call.scaling
    if query.shape[2] > 1:
        kv = torch.tensor([kv_index[h // group_size] for h in layer.attending], device=key.device)
        result = sdpa(
            select_heads(query, layer.attending),
            key.index_select(1, kv),
            value.index_select(1, kv),
            attn_mask=mask,
            scale=scaling,
            is_causal=mask is None,
        )
        return layer.attending, result
    heads = [group * group_size + i for group in layer.kept_groups for i in range(group_size)]
    rows = [kv_index[group] for group in layer.kept_groups]
    if rows != list(range(key.shape[1])):
        index = torch.tensor(rows, device=key.device)
        key, value = key.index_select(1, index), value.index_select(1, index)
    result = sdpa(select_heads(query, heads), key, value, attn_mask=mask, scale=scaling, enable_gqa=group_size > 1)
    return heads, result


def kv_cache_bytes(cache: Cache) -> int:
    """KV bytes a cache holds: the nbytes of every floating-point tensor its layers hold (keys and values; a copy
    layer's first-token values; a streaming layer's sink and ring slots), each tensor once. Integer bookkeeping
    (positions, group indices) is not counted."""
    seen: set[int] = set()
    total = 0
    for layer in cache.layers:
        for tensor in vars(layer).values():
            if isinstance(tensor, torch.Tensor) and tensor.is_floating_point() and id(tensor) not in seen:
                seen.add(id(tensor))
                total += tensor.numel() * tensor.element_size()
    return total


def greedy(
    model: torch.nn.Module,
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor,
    cache: Cache,
    new_tokens: int,
    logits_processor: LogitsProcessorList | None = None,
) -> torch.Tensor:
    """Plain `model.generate`, greedy, of exactly `new_tokens` tokens after input_ids (B, N) into `cache`: the
    prompt and new ids (B, N + new_tokens). `logits_processor`: generate's, e.g. a `speed.StepClock`."""
    return model.generate(
        input_ids=input_ids,
        attention_mask=attention_mask,
        cache=cache,  # generate's name for past_key_values since transformers 5.x
        max_new_tokens=new_tokens,
        min_new_tokens=new_tokens,
        do_sample=False,
        pad_token_id=pad_id(model),
        logits_processor=logits_processor,
    )


def pad_id(model: torch.nn.Module) -> int:
    """The id generation pads with: the model's pad token, else its (first) EOS token, else 0."""
    config = model.generation_config
    pad = config.pad_token_id if config.pad_token_id is not None else config.eos_token_id
    if isinstance(pad, list):
        pad = pad[0]
    return 0 if pad is None else pad
