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


GROW_AFTER = 256  # below this many keys an append is a plain torch.cat (cheaper per call than buffer views)


@dataclass
class LayerKV:
    """Keys and values of one layer, (B, H_kv, T, head_dim), with (B, T) metadata per key.

    `keys`, `values` and `meta` are what the layer holds (assign them freely). Once a layer holds GROW_AFTER
    keys, appends write into a preallocated buffer that doubles when full, so a token-by-token stream does not
    copy the whole cache at every step; `keys` etc. are then views of its first `length` slots (an assignment
    from outside simply detaches them). Shorter layers concatenate, which costs less per call at that size.
    """

    keys: torch.Tensor | None = None
    values: torch.Tensor | None = None
    meta: RowMeta = field(default_factory=dict)
    _buffers: tuple | None = field(default=None, repr=False, compare=False)  # (keys, values, meta) with spare room
    _views: tuple | None = field(default=None, repr=False, compare=False)  # the views last handed out

    @property
    def length(self) -> int:
        return 0 if self.keys is None else int(self.keys.shape[2])

    @property
    def capacity(self) -> int:
        """Keys the layer can hold before its next reallocation (= length when it holds no spare room)."""
        return self.length if not self._buffers_current() else int(self._buffers[0].shape[2])

    def append(self, keys: torch.Tensor, values: torch.Tensor, meta: RowMeta) -> None:
        """Add new keys/values (+metadata) after the held ones; amortised O(new keys) per call."""
        if self.keys is None:
            self.keys, self.values, self.meta = keys, values, dict(meta)
            self._buffers = self._views = None
            return
        current = self._buffers_current()
        short = not current and self.length + keys.shape[2] < GROW_AFTER
        if short or not self._can_grow_in_place(keys, values, meta):
            self.keys = torch.cat([self.keys, keys], dim=2)
            self.values = torch.cat([self.values, values], dim=2)
            self.meta = cat_meta([self.meta, meta])
            self._buffers = self._views = None
            return
        old, new = self.length, self.length + int(keys.shape[2])
        if not current or self._buffers[0].shape[2] < new:
            self._reallocate(max(new, 2 * old))
        bk, bv, bm = self._buffers
        n = new - old
        bk.narrow(2, old, n).copy_(keys)
        bv.narrow(2, old, n).copy_(values)
        for name, tensor in bm.items():
            tensor.narrow(1, old, n).copy_(meta[name])
        self.keys, self.values = bk.narrow(2, 0, new), bv.narrow(2, 0, new)
        self.meta = {name: tensor.narrow(1, 0, new) for name, tensor in bm.items()}
        self._views = (self.keys, self.values, dict(self.meta))

    def _buffers_current(self) -> bool:
        """True when keys/values/meta are still the views of the buffers (nobody assigned or replaced them)."""
        if self._buffers is None or self._views is None:
            return False
        keys, values, meta = self._views
        return (self.keys is keys and self.values is values and self.meta.keys() == meta.keys()
                and all(self.meta[name] is tensor for name, tensor in meta.items()))

    def _can_grow_in_place(self, keys: torch.Tensor, values: torch.Tensor, meta: RowMeta) -> bool:
        """In-place growth keeps cat's result exactly: same shapes but length, dtypes, devices, metadata names,
        and no autograd (an in-place write would invalidate tensors saved for backward)."""
        if any(t.requires_grad for t in (keys, values, self.keys, self.values)):
            return False
        if not self.meta or self.meta.keys() != meta.keys():
            return False
        for new, held in ((keys, self.keys), (values, self.values)):
            if (new.dim() != 4 or new.shape[:2] != held.shape[:2] or new.shape[3] != held.shape[3]
                    or new.dtype != held.dtype or new.device != held.device):
                return False
        for name, new in meta.items():
            held = self.meta[name]
            if new.dim() != 2 or new.shape[0] != held.shape[0] or new.dtype != held.dtype or new.device != held.device:
                return False
        return True

    def _reallocate(self, capacity: int) -> None:
        """Move the held keys into fresh buffers with room for `capacity` keys."""
        n = self.length

        def room(tensor: torch.Tensor, axis: int) -> torch.Tensor:
            shape = list(tensor.shape)
            shape[axis] = capacity
            buffer = tensor.new_empty(shape)
            buffer.narrow(axis, 0, n).copy_(tensor)
            return buffer

        self._buffers = (room(self.keys, 2), room(self.values, 2), {k: room(v, 1) for k, v in self.meta.items()})


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
        layer.append(keys, values, meta)
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
