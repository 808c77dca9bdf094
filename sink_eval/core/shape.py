"""A model's attention shape, read off its config in one place: layers, query heads, KV heads, model type."""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch

if TYPE_CHECKING:
    from transformers import PretrainedConfig


@dataclass(frozen=True)
class Shape:
    layers: int
    heads: int
    kv_heads: int
    model_type: str

    @property
    def group_size(self) -> int:
        return self.heads // self.kv_heads

    def whole_groups(self, heads: Mapping[int, Iterable[int]]) -> dict[int, frozenset[int]]:
        """Per layer, the KV groups all of whose query heads are in `heads` (layer -> query heads); layers with none
        are left out."""
        g = self.group_size
        groups = {}
        for layer, hs in heads.items():
            chosen = set(hs)
            kv = frozenset(k for k in range(self.kv_heads) if all(k * g + i in chosen for i in range(g)))
            if kv:
                groups[layer] = kv
        return groups

    def n_whole_groups(self, heads: Mapping[int, Iterable[int]]) -> int:
        """How many KV groups all of whose query heads are in `heads`."""
        return sum(len(kv) for kv in self.whole_groups(heads).values())


def config_shape(config: PretrainedConfig) -> Shape:
    """The shape of a (possibly multimodal) config's text decoder; no `num_key_value_heads` means one per head."""
    text = config.get_text_config(decoder=True)
    return Shape(
        text.num_hidden_layers,
        text.num_attention_heads,
        getattr(text, "num_key_value_heads", None) or text.num_attention_heads,
        text.model_type,
    )


def model_shape(model: torch.nn.Module) -> Shape:
    return config_shape(model.config)
