"""Persistent batch slots: one batched engine whose rows are taken and given back by server sessions.

The server keeps one `StreamingSession` per (phi, framing) whose batch rows are *slots*. A new session takes a
free slot: its row's old keys are marked invalid (no query ever sees them) and the prompt keys, computed once
per engine, are appended to that row, so it starts exactly as a fresh one-stream session would. Reads, closes
and writes of many sessions are then one engine call each, on caches that stay batched between steps: nothing
is re-padded or concatenated per step (the old server stacked every session's cache at every step).

The caches only grow at the end (KVCache appends; idle rows get invalid padding keys), so two cheap
maintenance steps keep them small, both amortised by doubling rules:
- `compact`: when a cache is more than twice as wide as its fullest row, every row's valid keys are packed to
  the left (one gather per layer; each key keeps its order/position/segment metadata, so attention is unchanged);
- growth and shrinking of the slot count: full -> double the rows; at most a quarter live -> move live rows
  to the front and halve.
`compact_cache`, `grow_cache`, `reset_row` and `select_rows` work on any `KVCache`, so other batched engines
(e.g. a batched thinker) can use the same slots.
"""

from __future__ import annotations

import copy
from typing import Callable, Sequence

import torch

from brisklm.core.cache import KVCache
from brisklm.core.executor import pack_rows
from brisklm.core.text import TextLayer
from brisklm.errors import BriskError
from brisklm.streaming.engine import StreamingSession

KNOWN_PER_STREAM = ("src_tokens", "src_segments", "tgt_tokens", "pending", "written", "target_words", "new_words",
                    "closed", "done", "wants_read", "outputs")
MIN_COMPACT_WIDTH = 32  # narrower caches are never compacted (the gather costs more than it saves)


# ---------------------------------------------------------------------------------------------- cache operations
def reset_row(cache: KVCache, row: int) -> None:
    """Mark every key of one batch row invalid (in place): the row's next session never sees them."""
    for layer in cache.layers:
        if layer.keys is not None:
            layer.meta["valid"][row] = False


def grow_cache(cache: KVCache, rows: int) -> None:
    """Add `rows` batch rows of invalid keys to every layer (one copy; callers double to amortise it)."""
    for layer in cache.layers:
        if layer.keys is None:
            continue
        pad = lambda t: torch.cat([t, t.new_zeros((rows, *t.shape[1:]))])  # noqa: E731 - zeros: valid=False
        layer.keys, layer.values = pad(layer.keys), pad(layer.values)
        layer.meta = {name: pad(tensor) for name, tensor in layer.meta.items()}


def select_rows(cache: KVCache, index: torch.Tensor) -> None:
    """Keep (and reorder) batch rows of every layer."""
    cache.select_batch(index)


def compact_cache(cache: KVCache, force: bool = False) -> bool:
    """Pack each row's valid keys to the left when the cache is over twice as wide as its fullest row."""
    changed = False
    for layer in cache.layers:
        if layer.keys is None:
            continue
        width = layer.length
        valid = layer.meta["valid"]
        fullest = int(valid.sum(1).max()) if valid.numel() else 0
        if not force and (width < MIN_COMPACT_WIDTH or width <= 2 * fullest):
            continue
        index, keep = pack_rows(valid)  # (B, n): each row's valid keys first, in order
        batch, heads, _, dim = layer.keys.shape
        at = index[:, None, :, None].expand(batch, heads, index.shape[1], dim)
        layer.keys, layer.values = layer.keys.gather(2, at), layer.values.gather(2, at)
        meta = {name: tensor.gather(1, index) for name, tensor in layer.meta.items()}
        meta["valid"] = meta["valid"] & keep
        layer.meta = meta
        changed = True
    return changed


def cache_width(cache: KVCache) -> int:
    return max((layer.length for layer in cache.layers), default=0)


# ---------------------------------------------------------------------------------------------- slots
class Slot:
    """A session's handle on one engine row; `index` may change when the engine shrinks (never mid-step)."""

    def __init__(self, engine: "SlotEngine", index: int) -> None:
        self.engine, self.index, self.released = engine, index, False

    def release(self) -> None:
        if not self.released:
            self.released = True
            self.engine.release(self)


class SlotEngine:
    """A batched StreamingSession whose rows are slots; `acquire()` gives a slot that behaves as a fresh
    one-stream session (exactly: same keys, same metadata), `read` / `close` / `write` run many slots at once."""

    def __init__(self, model, text: TextLayer, *, phi: int = 0, instruction: str | None = None,
                 max_rows: int = 64) -> None:
        self.model, self.text, self.phi, self.instruction = model, text, phi, instruction
        self.max_rows = max_rows  # rows never exceed this: each call computes every row, live or not
        # a one-stream session holds the fresh per-stream state and the prompt keys, computed once
        self.template = StreamingSession(model, text, 1, phi=phi, instruction=instruction)
        self.per_stream = self._per_stream_names(self.template)
        self.session = StreamingSession(model, text, 1, phi=phi, instruction=instruction)
        self.session.done[0] = True  # row 0 is idle until a session takes it
        self.slots: list[Slot | None] = [None]
        self.calls = 0
        self.joined = 0

    # --------------------------------------------------------------------------------------------- bookkeeping
    @staticmethod
    def _per_stream_names(session: StreamingSession) -> list[str]:
        """The per-stream list attributes: the known ones plus any other one-entry list a newer engine adds."""
        extra = [k for k, v in vars(session).items() if isinstance(v, list) and len(v) == 1
                 and k not in KNOWN_PER_STREAM and not k.startswith("last_")]
        return [*KNOWN_PER_STREAM, *extra]

    @property
    def size(self) -> int:
        return self.session.batch_size

    @property
    def live(self) -> int:
        return sum(slot is not None for slot in self.slots)

    @property
    def full(self) -> bool:
        return None not in self.slots and self.size >= self.max_rows

    def _fresh(self, name: str):
        return copy.deepcopy(getattr(self.template, name)[0])

    def acquire(self) -> Slot:
        """A free row (the engine doubles when full), reset to a fresh stream with the prompt read."""
        if self.full:
            raise BriskError(f"the slot engine is full ({self.max_rows} rows): take a slot from another engine")
        if None not in self.slots:
            self._grow(min(self.size, self.max_rows - self.size))
        row = self.slots.index(None)
        slot = Slot(self, row)
        self.slots[row] = slot
        e = self.session
        for name in self.per_stream:
            getattr(e, name)[row] = self._fresh(name)
        reset_row(e.source_cache, row)
        reset_row(e.target_cache, row)
        self._copy_prompt(row)
        self.joined += 1
        return slot

    def _copy_prompt(self, row: int) -> None:
        """Append the template's prompt keys to one row (other rows get invalid padding): no forward needed."""
        src = self.template.source_cache
        for idx, layer in enumerate(src.layers):
            if layer.keys is None:
                continue
            n = layer.length
            keys = layer.keys.new_zeros((self.size, *layer.keys.shape[1:]))
            values = layer.values.new_zeros((self.size, *layer.values.shape[1:]))
            keys[row], values[row] = layer.keys[0], layer.values[0]
            meta = {}
            for name, tensor in layer.meta.items():
                full = tensor.new_zeros((self.size, n))
                full[row] = tensor[0]
                meta[name] = full
            held = self.session.source_cache.layers[idx]
            if held.keys is not None and set(held.meta) != set(meta):
                raise BriskError("the engine's cache metadata changed shape; cannot add a slot")
            self.session.source_cache.update(keys, values, meta, idx)

    def release(self, slot: Slot) -> None:
        """Give a row back: it idles (done) until the next `acquire`; shrink when at most a quarter is live."""
        if self.slots[slot.index] is not slot:
            return
        self.slots[slot.index] = None
        self.session.done[slot.index] = True
        if self.size >= 8 and self.live <= self.size // 4:
            self._shrink()

    def _grow(self, rows: int) -> None:
        e = self.session
        grow_cache(e.source_cache, rows)
        grow_cache(e.target_cache, rows)
        for name in self.per_stream:
            getattr(e, name).extend(self._fresh(name) for _ in range(rows))
        e.done[-rows:] = [True] * rows
        e.batch_size += rows
        self.slots += [None] * rows

    def _shrink(self) -> None:
        """Move live rows to the front and drop half the rows (one copy of the caches)."""
        e = self.session
        keep = self.size // 2
        order = [i for i, s in enumerate(self.slots) if s is not None]
        order += [i for i, s in enumerate(self.slots) if s is None][:keep - len(order)]
        index = torch.tensor(order, device=e.device)
        select_rows(e.source_cache, index)
        select_rows(e.target_cache, index)
        for name in self.per_stream:
            values = getattr(e, name)
            setattr(e, name, [values[i] for i in order])
        self.slots = [self.slots[i] for i in order]
        for row, slot in enumerate(self.slots):
            if slot is not None:
                slot.index = row
        e.batch_size = keep
        for name in ("last_logits", "last_hidden"):
            setattr(e, name, None)

    def compact(self) -> None:
        compact_cache(self.session.source_cache)
        compact_cache(self.session.target_cache)

    def memory_bytes(self, slot: Slot) -> int:
        """Model state held for one slot: its cached source and target tokens over every layer (K and V)."""
        e, row = self.session, slot.index
        layer = next((l for l in e.source_cache.layers if l.keys is not None), None)
        if layer is None:
            return 0
        per_token = 2 * layer.keys.shape[1] * layer.keys.shape[3] * layer.keys.element_size() * len(e.source_cache)
        return per_token * (e.src_tokens[row] + e.tgt_tokens[row])

    # --------------------------------------------------------------------------------------------- engine steps
    def read(self, words: dict[Slot, list[str]]) -> None:
        """Read source words into several slots at once (words must be checked against the vocabulary first)."""
        rows = [[] for _ in range(self.size)]
        for slot, w in words.items():
            rows[slot.index] = list(w)
        self.session.read(rows)
        self.calls += 1

    def close(self, slots: Sequence[Slot]) -> None:
        """End the source of several slots at once."""
        self.session.close([s.index for s in slots])
        self.calls += 1

    def write(self, slots: Sequence[Slot], gate: Callable | None = None,
              forbid_early_end: dict[Slot, bool] | None = None, record_attention: bool = False) -> None:
        """One target token in each of `slots` (results in the engine's per-row state)."""
        e = self.session
        forbid = [False] * self.size
        for slot, value in (forbid_early_end or {}).items():
            forbid[slot.index] = bool(value)
        e.record_attention = record_attention
        e.write(streams=[s.index for s in slots], gate=gate, forbid_early_end=forbid)
        self.calls += 1


class EnginePool:
    """The slot engines of one served model: per phi (the target's first position is engine-wide), as many
    engines of at most `max_rows` rows as the live sessions need."""

    def __init__(self, model, text: TextLayer, instruction: str | None = None, max_rows: int = 64) -> None:
        self.model, self.text, self.instruction, self.max_rows = model, text, instruction, max_rows
        self.engines: dict[int, list[SlotEngine]] = {}
        self.others: dict[tuple, list] = {}  # engines of other kinds (e.g. the batched thinker), per key

    def engine(self, phi: int = 0) -> SlotEngine:
        """An engine of this phi with a free row (a new one when every engine is full)."""
        group = self.engines.setdefault(phi, [])
        for engine in group:
            if not engine.full:
                return engine
        group.append(SlotEngine(self.model, self.text, phi=phi, instruction=self.instruction, max_rows=self.max_rows))
        return group[-1]

    def other_engine(self, key: tuple, make: Callable[[int], object]):
        """An engine of another kind with a free row: one of `key`'s, or `make(max_rows)` when all are full.
        Such an engine has `full`, `acquire()`, `release(slot)`, `compact()` and the batched calls it serves."""
        group = self.others.setdefault(key, [])
        for engine in group:
            if not engine.full:
                return engine
        group.append(make(self.max_rows))
        return group[-1]

    def compact(self) -> None:
        for group in [*self.engines.values(), *self.others.values()]:
            for engine in group:
                engine.compact()
