"""Read/write policies and the decoders that share them: GPE wait-k, re-encoding wait-k, offline, interleaved.

All decoders take word lists, run several streams as one batch, and return `StreamOutput`s (words + delays in
source words read) together with the number of token rows they pushed through the model (`forward_tokens`).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import torch

from brisklm.core import KVCache, Plan, execute
from brisklm.core.device import model_device, to_device
from brisklm.core.text import TextLayer
from brisklm.errors import BriskError
from brisklm.streaming.engine import StreamingSession, StreamOutput, TargetWords
from brisklm.streaming.gpe import IGNORE, check_k, stream_frame, word_segments

OFFLINE_K = 10**6  # a lag longer than any source: read everything, then write


def reads_before(k: int, j: int, n: int) -> int:
    """Wait-k: source segments (words, then the end marker as n+1) read before target word j (1-based)."""
    return min(k + j - 1, n + 1)


@dataclass
class DecodeResult:
    """Outputs of one decoder over a list of sources, with its cost in token rows through the model."""

    outputs: list[StreamOutput]
    forward_tokens: int

    @property
    def hypotheses(self) -> list[str]:
        return [o.text for o in self.outputs]


def _check_sources(sources: Sequence[Sequence[str]]) -> None:
    if not sources:
        raise BriskError("no source streams given: pass at least one source sentence")
    for i, s in enumerate(sources):
        if not s:
            raise BriskError(f"source stream {i} is empty: pass at least one word per stream")


def target_limit(n: int) -> int:
    """A target-length cap that a sane translation of n source words never reaches (stops runaway generation)."""
    return 2 * n + 8


MAX_TOKENS_PER_WORD = 16  # subword tokenizers: a word of more tokens than this is runaway generation


def token_limit(n: int) -> int:
    """A cap on written target tokens for n source words (a word that never completes still stops)."""
    return MAX_TOKENS_PER_WORD * target_limit(n)


def gpe_wait_k(model, tokenizer, sources: Sequence[Sequence[str]], k: int, *, batch_size: int = 32, phi: int = 0,
               positions: str = "group", forced: Sequence[Sequence[int]] | None = None,
               keep_logits: bool = False, instruction: str | None = None) -> DecodeResult:
    """Wait-k with the two-cache engine: every source and target token is encoded once (forced = teacher ids).

    Works on any tokenizer: k counts source words, a target word's delay is taken at its first token, and
    keep_logits gives one row per written token (then the end marker)."""
    check_k(k)
    _check_sources(sources)
    outputs: list[StreamOutput] = []
    total = 0
    for start in range(0, len(sources), batch_size):
        chunk = [list(s) for s in sources[start:start + batch_size]]
        chunk_forced = None if forced is None else [list(f) for f in forced[start:start + batch_size]]
        session = StreamingSession(model, tokenizer, len(chunk), phi=phi, positions=positions, instruction=instruction)
        logits: list[list[torch.Tensor]] = [[] for _ in chunk]
        extra = [0] * len(chunk)  # words read beyond wait-k because the model wanted to end early
        while not all(session.done):
            reads, close = [], []
            for b, src in enumerate(chunk):
                if session.done[b]:
                    reads.append([])
                    continue
                extra[b] += int(session.wants_read[b])
                j = session.words_started(b) + 1  # the word the next token may start
                need = min(reads_before(k, j, len(src)) + extra[b], len(src) + 1)
                have = session.words_read(b)
                reads.append(src[have:min(need, len(src))])
                if need > len(src) and not session.closed[b]:
                    close.append(b)
            if any(reads):
                session.read(reads)
            if close:
                session.close(close)
            step_forced = None
            if chunk_forced is not None:
                step_forced = [f[len(w)] if len(w) < len(f) else session.frame.target_end
                               for f, w in zip(chunk_forced, session.written)]
            active = [b for b in range(len(chunk)) if not session.done[b]]
            session.write(forced=step_forced)
            if keep_logits:
                for b in active:
                    if not session.wants_read[b]:
                        logits[b].append(session.last_logits[b])
            for b in range(len(chunk)):
                if not session.done[b] and (session.words_started(b) >= target_limit(len(chunk[b]))
                                            or len(session.written[b]) >= token_limit(len(chunk[b]))):
                    session.stop(b)
        for b, src in enumerate(chunk):
            session.outputs[b].source_words = len(src)
            if keep_logits:
                session.outputs[b].logits = torch.stack(logits[b])  # (writes, V)
        outputs += session.outputs
        total += session.forward_tokens
    return DecodeResult(outputs, total)


def _text(model, tokenizer) -> TextLayer:
    return tokenizer if isinstance(tokenizer, TextLayer) else TextLayer.for_model(model, tokenizer)


def _ids(text: TextLayer, words: Sequence[str], at_start: bool = True) -> list[int]:
    """Ids of source words (the text layer's segments, concatenated)."""
    return [t for seg in word_segments(text, list(words), at_start) for t in seg] if words else []


def _batch_prefix_ids(text: TextLayer, source: Sequence[str], target: Sequence[int]) -> list[int]:
    frame = stream_frame(text)
    return [*frame.prompt, *_ids(text, source, frame.first_at_start), *frame.batch_separator, *target]


@torch.no_grad()
def reencode_wait_k(model, tokenizer, sources: Sequence[Sequence[str]], k: int, *, batch_size: int = 32,
                    strict: bool = False) -> DecodeResult:
    """Batch-LLM streaming: before each target word, re-encode `<bos> source-prefix <sep> target-so-far` in full.

    An end predicted before the source is complete means "read one more word" (adaptive); strict=True instead
    forbids the end there, so the schedule is exactly wait-k. Any tokenizer: the next token sees the source the
    next word needs (as the GPE engine), and a word's delay is taken at its first token.
    """
    check_k(k)
    _check_sources(sources)
    outputs: list[StreamOutput] = []
    total = 0
    text = _text(model, tokenizer)
    frame = stream_frame(text)
    ends, pad = sorted(frame.ends), frame.pad
    for start in range(0, len(sources), batch_size):
        chunk = [list(s) for s in sources[start:start + batch_size]]
        outs = [StreamOutput(source_words=len(s)) for s in chunk]
        targets: list[list[int]] = [[] for _ in chunk]
        words = [TargetWords(text) for _ in chunk]
        done = [False] * len(chunk)
        extra = [0] * len(chunk)  # words read beyond wait-k because the model wanted to end early

        def prefix(b: int) -> int:
            started = len(outs[b].words) + int(words[b].open)
            return min(k + started + extra[b], len(chunk[b]))

        def stop(b: int, truncated: bool) -> None:
            done[b], outs[b].truncated = True, truncated
            for word, delay in words[b].finish():
                outs[b].words.append(word)
                outs[b].delays.append(delay)

        while not all(done):
            active = [b for b in range(len(chunk)) if not done[b]]
            seqs = [_batch_prefix_ids(text, chunk[b][:prefix(b)], targets[b]) for b in active]
            width = max(len(s) for s in seqs)
            ids = torch.full((len(seqs), width), pad, dtype=torch.long)
            mask = torch.zeros_like(ids)
            for i, s in enumerate(seqs):
                ids[i, :len(s)], mask[i, :len(s)] = torch.tensor(s), 1
            device = model_device(model)  # the batch is filled on the host, then moved once
            logits = model(input_ids=ids.to(device), attention_mask=mask.to(device)).logits  # (A, W, V)
            total += sum(len(s) for s in seqs)
            for i, b in enumerate(active):
                row = logits[i, len(seqs[i]) - 1].clone()  # (V,)
                if strict and prefix(b) < len(chunk[b]):
                    row[ends] = float("-inf")
                token = int(row.argmax())
                if token in frame.ends and prefix(b) < len(chunk[b]):  # cannot end before the source: read more
                    extra[b] += 1
                    continue
                started = len(outs[b].words) + int(words[b].open)
                if (token in frame.ends or started >= target_limit(len(chunk[b]))
                        or len(targets[b]) >= token_limit(len(chunk[b]))):
                    stop(b, truncated=token not in frame.ends)
                    continue
                delay = prefix(b)
                targets[b].append(token)
                for word, word_delay in words[b].feed(token, delay):
                    outs[b].words.append(word)
                    outs[b].delays.append(word_delay)
        outputs += outs
    return DecodeResult(outputs, total)


def offline(model, tokenizer, sources: Sequence[Sequence[str]], *, batch_size: int = 32) -> DecodeResult:
    """Read the whole source, then write (delays = |X| for every word), with the batch layout."""
    return reencode_wait_k(model, tokenizer, sources, OFFLINE_K, batch_size=batch_size)


# ---------------------------------------------------------------------------------------------- interleaved
def interleaved_events(n: int, m: int, k: int) -> list[tuple[str, int]]:
    """Arrival order of wait-k: ('read', i) for source word i (n = end marker) and ('write', j) for target j."""
    events: list[tuple[str, int]] = []
    read = 0
    for j in range(m + 1):  # m words then the end of the target
        need = reads_before(k, j + 1, n)
        while read < need:
            events.append(("read", read))
            read += 1
        events.append(("write", j))
    return events


def interleaved_sequence(tokenizer, source: Sequence[str], target: Sequence[str], k: int) -> dict[str, list[int]]:
    """Training sequence in arrival order: prompt (`<bos>`), source words, the header (`<sep>`: end of source),
    target tokens, the end. Before each target token come the source words the next word needs (k + words
    started), so a multi-token word is trained as the decoder writes it."""
    check_k(k)
    frame = stream_frame(tokenizer)
    src = [*word_segments(tokenizer, list(source), frame.first_at_start), list(frame.batch_separator)]
    tgt_words = word_segments(tokenizer, list(target)) if len(target) else []
    ids, labels = list(frame.prompt), [IGNORE] * len(frame.prompt)
    read = started = 0
    for token, first in [*((t, i == 0) for seg in tgt_words for i, t in enumerate(seg)), (frame.target_end, True)]:
        need = reads_before(k, started + 1, len(source))
        while read < need:
            ids += src[read]
            labels += [IGNORE] * len(src[read])
            read += 1
        ids.append(token)
        labels.append(token)
        started += int(first)
    return {"input_ids": ids, "labels": labels}


@torch.no_grad()
def interleaved_wait_k(model, tokenizer, sources: Sequence[Sequence[str]], k: int, *, batch_size: int = 32) -> DecodeResult:
    """Interleaved streaming: one causal sequence in arrival order, contiguous positions, one cache (source sees target)."""
    check_k(k)
    _check_sources(sources)
    from brisklm.core.adapter import ModelAdapter

    layers = ModelAdapter.from_model(model).num_layers
    text = _text(model, tokenizer)
    frame = stream_frame(text)
    outputs: list[StreamOutput] = []
    total = 0
    pad = frame.pad
    for start in range(0, len(sources), batch_size):
        chunk = [list(s) for s in sources[start:start + batch_size]]
        src_segs = [[*word_segments(text, s, frame.first_at_start), list(frame.batch_separator)] for s in chunk]
        outs = [StreamOutput(source_words=len(s)) for s in chunk]
        words = [TargetWords(text) for _ in chunk]
        written = [0] * len(chunk)
        cache = KVCache(layers)
        fed = [0] * len(chunk)  # real tokens in the cache per stream
        read = [0] * len(chunk)
        feed: list[list[int]] = [list(frame.prompt) for _ in chunk]
        done = [False] * len(chunk)
        extra = [0] * len(chunk)  # reads beyond wait-k because the model wanted to end early

        def stop(b: int, truncated: bool) -> None:
            done[b], outs[b].truncated = True, truncated
            for word, delay in words[b].finish():
                outs[b].words.append(word)
                outs[b].delays.append(delay)

        while not all(done):
            for b, src in enumerate(chunk):
                if done[b]:
                    feed[b] = []
                    continue
                started = len(outs[b].words) + int(words[b].open)
                need = min(reads_before(k, started + 1, len(src)) + extra[b], len(src) + 1)
                for seg in src_segs[b][read[b]:need]:
                    feed[b] += seg
                read[b] = max(read[b], need)
            width = max(len(f) for f in feed)
            ids = torch.full((len(chunk), width), pad, dtype=torch.long)
            valid = torch.zeros(len(chunk), width, dtype=torch.bool)
            order = torch.zeros(len(chunk), width, dtype=torch.long)
            for b, f in enumerate(feed):
                ids[b, :len(f)], valid[b, :len(f)] = torch.tensor(f, dtype=torch.long), True
                order[b] = fed[b] + torch.arange(width).clamp(max=max(len(f) - 1, 0))
            ids, valid, order = to_device((ids, valid, order), model_device(model))  # filled on the host, moved once
            out = execute(model, ids, plan=Plan(position_ids=order, order=order), cache=cache, attention_mask=valid)
            total += int(valid.sum())
            for b, f in enumerate(feed):
                if done[b]:
                    continue
                fed[b] += len(f)
                token = int(out.logits[b, len(f) - 1].argmax())
                if token in frame.ends and read[b] <= len(chunk[b]):  # end marker not read yet
                    extra[b] += 1
                    feed[b] = []
                    continue
                started = len(outs[b].words) + int(words[b].open)
                if (token in frame.ends or started >= target_limit(len(chunk[b]))
                        or written[b] >= token_limit(len(chunk[b]))):
                    stop(b, truncated=token not in frame.ends)
                    continue
                written[b] += 1
                for word, delay in words[b].feed(token, min(read[b], len(chunk[b]))):
                    outs[b].words.append(word)
                    outs[b].delays.append(delay)
                feed[b] = [token]
        outputs += outs
    return DecodeResult(outputs, total)
