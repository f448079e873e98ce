"""KV policies for tokens that skip attention, and byte accounting.

FULL:  the skipping token's K/V are computed from its unchanged residual and stored (SkipGPT semantics).
EVICT: not computed, not stored; later queries at that layer do not see the token (D-LLM style).
REUSE: not computed; at that layer the token's K/V are the ones of the last layer where it executed
       attention (SkipOPU's "cross-layer KV invariance" as a rule); stored as a pointer, not a new entry.
       A token that has not executed attention at any earlier layer has nothing to carry and is evicted.
"""

from __future__ import annotations

import torch

from brisklm.core.cache import KVCache, RowMeta, cat_meta
from brisklm.core.executor import gather_meta, pack_rows
from brisklm.errors import BriskError

KV_POLICIES = ("full", "evict", "reuse")
POINTER_BYTES = 4  # an int32 layer index per carried entry


def check_policy(policy: str) -> str:
    """Return the policy name or raise a user error listing the valid ones."""
    if policy not in KV_POLICIES:
        raise BriskError(f"unknown KV policy {policy!r}; choose one of {', '.join(KV_POLICIES)}")
    return policy


def entry_bytes(cache: KVCache) -> int:
    """Bytes of one stored key+value entry (all KV heads) in this cache."""
    for layer in cache.layers:
        if layer.keys is not None:
            return 2 * layer.keys.shape[1] * layer.keys.shape[3] * layer.keys.element_size()
    return 0


def stored_entries(cache: KVCache) -> int:
    """Valid key/value entries really stored (carried REUSE pointers and batch padding excluded)."""
    total = 0
    for layer in cache.layers:
        if layer.keys is None:
            continue
        valid = layer.meta["valid"]
        if "carried" in layer.meta:
            valid = valid & ~layer.meta["carried"]
        total += int(valid.sum())
    return total


def carried_entries(cache: KVCache) -> int:
    """Valid entries that are REUSE pointers to an earlier layer's K/V."""
    return sum(int((l.meta["valid"] & l.meta["carried"]).sum()) for l in cache.layers
               if l.keys is not None and "carried" in l.meta)


def kv_bytes(cache: KVCache) -> dict[str, int]:
    """Stored K/V bytes, pointer bytes and entry counts of a cache filled by the sparse executor."""
    size = entry_bytes(cache)
    stored, carried = stored_entries(cache), carried_entries(cache)
    return {"kv_bytes": stored * size, "pointer_bytes": carried * POINTER_BYTES,
            "stored_entries": stored, "carried_entries": carried}


class ReuseKVCache(KVCache):
    """A KVCache that, at each layer, adds carried K/V for tokens that skip attention there (REUSE).

    The sparse executor announces each layer's store mask with `begin_layer` before the executor writes,
    and calls `finish` after the forward (the next forward's layer 0 does it too, so a decoding loop only needs
    `finish` at the end). Carried entries are marked meta["carried"] = True.
    """

    def __init__(self, num_layers: int) -> None:
        super().__init__(num_layers)
        self._pending: tuple[int, torch.Tensor, RowMeta] | None = None
        self._last_k: torch.Tensor | None = None  # (B, H_kv, T + 1, hd): last executed K per row (+ a junk slot)
        self._last_v: torch.Tensor | None = None
        self._have: torch.Tensor | None = None  # (B, T) bool: row has executed attention at some layer

    def begin_layer(self, layer_idx: int, kv_mask: torch.Tensor, meta: RowMeta) -> None:
        """Announce that at `layer_idx` the rows kv_mask (B, T) compute K/V; meta is the rows' metadata."""
        if layer_idx == 0:
            self._flush()  # the previous forward's last layer, when `finish` was not called in between
            self._last_k = self._last_v = None
            self._have = torch.zeros_like(kv_mask)
        self._flush()
        self._pending = (layer_idx, kv_mask, {**meta, "carried": torch.zeros_like(kv_mask)})

    def finish(self) -> None:
        """Write the carried entries of a last layer where no row executed attention."""
        self._flush()

    def _flush(self) -> None:
        if self._pending is None:
            return
        layer_idx, kv_mask, meta = self._pending
        self._pending = None
        carried = self._carried(kv_mask, meta)
        if carried is not None:
            super().update(*carried, layer_idx)

    def _carried(self, kv_mask: torch.Tensor, meta: RowMeta):
        """Keys, values (B, H_kv, n, hd) and metadata of rows that carry an earlier layer's K/V here."""
        if self._last_k is None:
            return None
        rows = self._have & ~kv_mask & meta["valid"]
        if not bool(rows.any()):
            return None
        index, valid = pack_rows(rows)
        keys = self._last_k.gather(2, index[:, None, :, None].expand(-1, self._last_k.shape[1], -1, self._last_k.shape[3]))
        values = self._last_v.gather(2, index[:, None, :, None].expand(-1, self._last_v.shape[1], -1, self._last_v.shape[3]))
        cmeta = gather_meta(meta, index, valid)
        cmeta["carried"] = torch.ones_like(cmeta["carried"])
        return keys, values, cmeta

    def update(self, keys: torch.Tensor, values: torch.Tensor, meta: RowMeta, layer_idx: int):
        """Store the new rows' K/V, remember them as each row's latest, add carried rows, return all."""
        if self._pending is None or self._pending[0] != layer_idx:
            raise BriskError("ReuseKVCache must be driven by brisklm.pruning.sparse (begin_layer before each layer)")
        _, kv_mask, full_meta = self._pending
        self._pending = None
        batch, heads, _, hd = keys.shape
        length = kv_mask.shape[1]
        if self._last_k is None:
            self._last_k = keys.new_zeros(batch, heads, length + 1, hd)
            self._last_v = values.new_zeros(batch, heads, length + 1, hd)
        slot = torch.where(meta["valid"], meta["row"], torch.full_like(meta["row"], length))  # (B, n)
        where = slot[:, None, :, None].expand(-1, heads, -1, hd)
        self._last_k = self._last_k.scatter(2, where, keys)
        self._last_v = self._last_v.scatter(2, where, values)
        new_meta = {**{k: v for k, v in meta.items()}, "carried": torch.zeros_like(meta["valid"])}
        carried = self._carried(kv_mask, full_meta)
        self._have = self._have | (kv_mask & full_meta["valid"])
        parts_k, parts_v, parts_m = [keys], [values], [new_meta]
        if carried is not None:
            parts_k.append(carried[0])
            parts_v.append(carried[1])
            parts_m.append(carried[2])
        return super().update(torch.cat(parts_k, 2), torch.cat(parts_v, 2), cat_meta(parts_m), layer_idx)

