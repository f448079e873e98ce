"""Batch the engine steps of many independent one-stream sessions into one call per step kind.

Each server session owns a one-stream `StreamingSession`. To run the pending writes (or reads, or closes) of
many sessions at once, `run_batched` stacks their caches along the batch axis (right-padding shorter ones
with keys marked invalid, which no query can see), runs the engine's own `read` / `close` / `write` on that
merged session, and hands each session back exactly the keys a one-stream call would have appended. The
engine is not modified; tests check that outputs equal one-session runs.
"""

from __future__ import annotations

from typing import Sequence

import torch

from brisklm.core.cache import KVCache, LayerKV
from brisklm.errors import BriskError
from brisklm.streaming.engine import StreamingSession

_PER_STREAM = ("src_tokens", "src_segments", "tgt_tokens", "pending", "closed", "done", "wants_read", "outputs")


def _stack_layer(layers: Sequence[LayerKV]) -> tuple[LayerKV, list[int]]:
    """One batched layer from one-stream layers, right-padded with invalid keys; and each stream's length."""
    lengths = [layer.length for layer in layers]
    ref = next((layer for layer in layers if layer.keys is not None), None)
    if ref is None:
        return LayerKV(), lengths
    width = max(lengths)
    _, heads, _, dim = ref.keys.shape
    keys, values = [], []
    meta: dict[str, list[torch.Tensor]] = {name: [] for name in ref.meta}
    for layer, n in zip(layers, lengths):
        pad = width - n
        if layer.keys is None:
            keys.append(ref.keys.new_zeros(1, heads, width, dim))
            values.append(ref.values.new_zeros(1, heads, width, dim))
            for name, tensor in ref.meta.items():
                meta[name].append(tensor.new_zeros(1, width))
            continue
        if set(layer.meta) != set(ref.meta):
            raise BriskError("cannot batch sessions whose caches carry different row metadata")
        keys.append(torch.nn.functional.pad(layer.keys, (0, 0, 0, pad)) if pad else layer.keys)
        values.append(torch.nn.functional.pad(layer.values, (0, 0, 0, pad)) if pad else layer.values)
        for name, tensor in layer.meta.items():
            meta[name].append(torch.nn.functional.pad(tensor, (0, pad)) if pad else tensor)  # pads: valid=False
    return LayerKV(torch.cat(keys), torch.cat(values), {k: torch.cat(v) for k, v in meta.items()}), lengths


def _stack_cache(caches: Sequence[KVCache]) -> tuple[KVCache, list[list[int]]]:
    merged = KVCache(len(caches[0]))
    lengths = []
    for idx in range(len(merged)):
        merged.layers[idx], layer_lengths = _stack_layer([c.layers[idx] for c in caches])
        lengths.append(layer_lengths)
    return merged, lengths


def _split_cache(merged: KVCache, before: list[list[int]], caches: Sequence[KVCache], keep: Sequence[int]) -> None:
    """Append to each one-stream cache the first keep[b] keys its row gained in the merged cache."""
    for idx, layer in enumerate(merged.layers):
        start = max(before[idx]) if before[idx] else 0
        for b, cache in enumerate(caches):
            if keep[b] == 0:
                continue
            sl = slice(start, start + keep[b])
            meta = {name: t[b:b + 1, sl] for name, t in layer.meta.items()}
            cache.update(layer.keys[b:b + 1, :, sl], layer.values[b:b + 1, :, sl], meta, idx)


def merge_sessions(sessions: Sequence[StreamingSession]) -> tuple[StreamingSession, list[list[int]], list[list[int]]]:
    """A batch-of-B StreamingSession that shares the sessions' outputs; plus the pre-step cache lengths."""
    first = sessions[0]
    for s in sessions:
        if s.batch_size != 1:
            raise BriskError("only one-stream sessions can be batched by the server")
        if (s.model is not first.model) or s.phi != first.phi or s.positions != first.positions:
            raise BriskError("sessions batched together must share model, phi and positions")
    merged = StreamingSession.__new__(StreamingSession)
    merged.__dict__.update(first.__dict__)  # settings (model, phi, positions, ...) shared by all sessions
    merged.batch_size, merged.max_target_words, merged.forward_tokens = len(sessions), None, 0
    for name in _per_stream(first):
        setattr(merged, name, [getattr(s, name)[0] for s in sessions])
    merged.source_cache, src_before = _stack_cache([s.source_cache for s in sessions])
    merged.target_cache, tgt_before = _stack_cache([s.target_cache for s in sessions])
    return merged, src_before, tgt_before


def _per_stream(session: StreamingSession) -> list[str]:
    """Per-stream state: the known lists, plus any other one-entry list attribute a newer engine adds."""
    extra = [k for k, v in vars(session).items() if isinstance(v, list) and len(v) == 1 and k not in _PER_STREAM
             and not k.startswith("last_")]
    return [*_PER_STREAM, *extra]


def _write_back(merged: StreamingSession, sessions: Sequence[StreamingSession]) -> None:
    for b, s in enumerate(sessions):
        for name in _per_stream(s):
            getattr(s, name)[0] = getattr(merged, name)[b]


def run_batched(kind: str, sessions: Sequence[StreamingSession],
                words: Sequence[Sequence[str]] | None = None) -> list[str | None]:
    """Run one step kind ('read', 'close', 'write') for every session as one engine call; returns written words.

    One session runs on its own engine directly. Words must already be checked against the vocabulary.
    """
    if not sessions:
        return []
    if len(sessions) == 1:
        s = sessions[0]
        if kind == "read":
            s.read(list(words[0]))
            return [None]
        if kind == "close":
            s.close()
            return [None]
        return s.write()
    merged, src_before, tgt_before = merge_sessions(sessions)
    written: list[str | None] = [None] * len(sessions)
    if kind in ("read", "close"):
        src_tokens = list(merged.src_tokens)
        if kind == "read":
            merged.read([list(w) for w in words])
        else:
            merged.close()
        keep = [merged.src_tokens[b] - src_tokens[b] for b in range(len(sessions))]
        _split_cache(merged.source_cache, src_before, [s.source_cache for s in sessions], keep)
    elif kind == "write":
        active = [not d for d in merged.done]
        written = merged.write()
        _split_cache(merged.target_cache, tgt_before, [s.target_cache for s in sessions], [int(a) for a in active])
        for b, s in enumerate(sessions):
            for name in ("last_logits", "last_hidden"):
                if getattr(merged, name, None) is not None:
                    setattr(s, name, getattr(merged, name)[b:b + 1])
    else:
        raise BriskError(f"unknown engine step {kind!r}: use read, close or write")
    _write_back(merged, sessions)
    per = merged.forward_tokens / len(sessions)
    for s in sessions:
        s.forward_tokens += per
    return written
