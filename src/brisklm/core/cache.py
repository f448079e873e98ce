"""A per-layer key/value cache that also remembers who each key is (order, position, validity, tags).

Plans decide visibility from row metadata, so cached keys must carry theirs. Layers may hold different
numbers of keys (token dropping, evicted keys), which HF's DynamicCache also allows.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

RowMeta = dict[str, torch.Tensor]  # name -> (B, T) tensor; always has "order", "position", "valid"


def cat_meta(parts: list[RowMeta]) -> RowMeta:
    """Concatenate row metadata along the token axis, keeping only keys present in every part."""
    parts = [p for p in parts if p]
    if not parts:
        return {}
    keys = set(parts[0])
    for p in parts[1:]:
        keys &= set(p)
    return {k: torch.cat([p[k] for p in parts], dim=1) for k in keys}


@dataclass
class LayerKV:
    """Keys and values of one layer, (B, H_kv, T, head_dim), with (B, T) metadata per key."""

    keys: torch.Tensor | None = None
    values: torch.Tensor | None = None
    meta: RowMeta = field(default_factory=dict)

    @property
    def length(self) -> int:
        return 0 if self.keys is None else int(self.keys.shape[2])


class KVCache:
    """Key/value store for the layer-loop executor; `update` appends and returns everything cached."""

    def __init__(self, num_layers: int):
        self.layers = [LayerKV() for _ in range(num_layers)]

    def __len__(self) -> int:
        return len(self.layers)

    def get_seq_length(self, layer_idx: int = 0) -> int:
        """Number of keys held by a layer."""
        return self.layers[layer_idx].length

    def update(self, keys: torch.Tensor, values: torch.Tensor, meta: RowMeta, layer_idx: int):
        """Append new keys/values (+metadata) to a layer; return the layer's full keys, values, metadata."""
        layer = self.layers[layer_idx]
        if layer.keys is None:
            layer.keys, layer.values, layer.meta = keys, values, dict(meta)
        else:
            layer.keys = torch.cat([layer.keys, keys], dim=2)
            layer.values = torch.cat([layer.values, values], dim=2)
            layer.meta = cat_meta([layer.meta, meta])
        return layer.keys, layer.values, layer.meta

    def read(self, layer_idx: int):
        """The layer's keys, values and metadata without changing them (None when empty)."""
        layer = self.layers[layer_idx]
        return layer.keys, layer.values, layer.meta

    def pop_last(self, n: int) -> None:
        """Drop the last n keys of every layer (roll back the newest tokens)."""
        if n <= 0:
            return
        for layer in self.layers:
            if layer.keys is None:
                continue
            keep = max(layer.length - n, 0)
            layer.keys = layer.keys[:, :, :keep]
            layer.values = layer.values[:, :, :keep]
            layer.meta = {k: v[:, :keep] for k, v in layer.meta.items()}

    def select_batch(self, index: torch.Tensor) -> None:
        """Keep (and reorder) batch rows, e.g. when some streams of a batch finish."""
        for layer in self.layers:
            if layer.keys is None:
                continue
            layer.keys = layer.keys.index_select(0, index)
            layer.values = layer.values.index_select(0, index)
            layer.meta = {k: v.index_select(0, index) for k, v in layer.meta.items()}

    def nbytes(self) -> int:
        """Bytes held by keys and values across layers (metadata not counted)."""
        total = 0
        for layer in self.layers:
            if layer.keys is not None:
                total += layer.keys.numel() * layer.keys.element_size()
                total += layer.values.numel() * layer.values.element_size()
        return total

    def to_dynamic_cache(self, config=None):
        """Export as a transformers DynamicCache (keys/values only) for use with `model.generate`."""
        from transformers import DynamicCache

        cache = DynamicCache(config=config) if config is not None else DynamicCache()
        for idx, layer in enumerate(self.layers):
            if layer.keys is not None:
                cache.update(layer.keys, layer.values, idx)
        return cache
