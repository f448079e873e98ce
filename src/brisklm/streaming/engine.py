"""Incremental streaming sessions: a source cache and a target cache, so every token is encoded exactly once.

Source tokens attend only to earlier source tokens; target tokens attend to the target so far and to the
source segments that were read when they were fed. Both facts are fixed at write time, so the cached keys
never need re-encoding and the logits equal the full masked pass of the same schedule (tests check < 1e-4).
Several streams run as one batch; streams that read fewer tokens in a step get padding rows (never visible).

Any tokenizer: a source word is a segment of one or more tokens (through the text layer); the target side
writes one token per `write()`, and the text layer's WordDecoder says when a word is complete. A word's delay
is the number of source words read when its first token was written. Every row a target token feeds sees the
source that the *next* word needs (it cannot know whether the next token starts one), as gpe.build_layout's
`next_segment_rows` mask does in training, so the engine equals the full masked pass on subword models too.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable, Sequence

import torch

from brisklm.core import KVCache, Plan, execute
from brisklm.core.adapter import ModelAdapter
from brisklm.core.cache import RowMeta
from brisklm.core.text import TextLayer
from brisklm.errors import BriskError
from brisklm.streaming.gpe import POSITION_MODES, stream_frame, token_words, word_segments

SOURCE, TARGET = 0, 1


@dataclass
class GroupVisibility:
    """Visibility from row metadata: same-group causal, and target rows see source segments <= their `sees`."""

    def __call__(self, query: RowMeta, key: RowMeta, layer_idx: int) -> torch.Tensor:
        q_group, k_group = query["group"][:, :, None], key["group"][:, None, :]  # (B, Tq, 1), (B, 1, Tk)
        causal = key["order"][:, None, :] <= query["order"][:, :, None]
        cross = (q_group == TARGET) & (k_group == SOURCE) & (key["segment"][:, None, :] <= query["sees"][:, :, None])
        return ((q_group == k_group) & causal) | cross  # (B, Tq, Tk)


class TargetWords:
    """Written target ids -> completed (word, delay) pairs, a word's delay being the source words read when its
    first token was written. Word-level tokenizers: every id is a word. Subword: the text layer's WordDecoder."""

    def __init__(self, text: TextLayer) -> None:
        self.text, self.decoder, self.open_delay = text, text.decoder(), 0

    @property
    def open(self) -> bool:
        """A word has started and is not complete yet."""
        return bool(self.decoder.pending)

    def feed(self, token: int, words_read: int) -> list[tuple[str, int]]:
        """The words this written token completes; a token that starts a word opens it at `words_read`."""
        if self.text.word_level:
            return [(self.text.tokenizer.convert_ids_to_tokens(token), words_read)]
        words = self.decoder.feed(token)
        if self.text.is_special(token):  # a special token is its own word, written now
            return [(w, self.open_delay) for w in words[:-1]] + [(words[-1], words_read)]
        done = [(w, self.open_delay) for w in words]
        if self.decoder.pending == [token]:
            self.open_delay = words_read
        return done

    def finish(self) -> list[tuple[str, int]]:
        """End of the target: the open word, if any."""
        return [(w, self.open_delay) for w in self.decoder.finish()]


@dataclass
class StreamOutput:
    """One stream's written words, the source words read before each (delays), and the source length."""

    words: list[str] = field(default_factory=list)
    delays: list[int] = field(default_factory=list)
    source_words: int = 0
    truncated: bool = False
    logits: torch.Tensor | None = None  # (writes, V) when a decoder is asked to keep them

    @property
    def text(self) -> str:
        return " ".join(self.words)


class StreamingSession:
    """A batch of streams: `read(words)`, `close()`, `write()` one token per open stream, `finish()`.

    With a word-level tokenizer a token is a word. With a subword tokenizer `outputs[b].words` holds the
    completed words (a word completes when the next word starts or the stream ends); `new_words[b]` holds the
    (word, delay) pairs the latest write completed, and `words_started(b)` counts the open word too.

    positions="group" (GPE: source 0.., target phi+0..) is exact; "contiguous" gives target rows the position
    right after the source read so far, which is what a batch layout would need without re-encoding (a
    negative control: it does not equal any full pass once more source arrives).
    """

    def __init__(self, model, tokenizer, batch_size: int = 1, *, phi: int = 0, positions: str = "group",
                 max_target_words: int | None = None, record_attention: bool = False,
                 instruction: str | None = None) -> None:
        if batch_size < 1:
            raise BriskError(f"batch_size must be >= 1, got {batch_size}")
        if positions not in ("group", "contiguous"):
            raise BriskError(f"the engine supports positions 'group' or 'contiguous' (of {POSITION_MODES}), got {positions!r}")
        self.text = tokenizer if isinstance(tokenizer, TextLayer) else TextLayer.for_model(model, tokenizer)
        self.model, self.tokenizer, self.batch_size = model, self.text.tokenizer, batch_size
        self.frame = stream_frame(self.text, instruction)
        self.phi, self.positions, self.max_target_words = phi, positions, max_target_words
        layers = ModelAdapter.from_model(model).num_layers
        self.source_cache, self.target_cache = KVCache(layers), KVCache(layers)
        self.device = next(model.parameters()).device
        self.src_tokens = [0] * batch_size  # real source tokens cached per stream
        self.src_segments = [0] * batch_size  # source segments read after the prompt (end marker included)
        self.tgt_tokens = [0] * batch_size  # target tokens fed per stream
        self.pending = [list(self.frame.header) for _ in range(batch_size)]  # target ids to feed next (header first)
        self.written = [[] for _ in range(batch_size)]  # target ids written per stream (the end marker excluded)
        self.target_words = [TargetWords(self.text) for _ in range(batch_size)]  # written ids -> words, delays
        self.new_words: list[list[tuple[str, int]]] = [[] for _ in range(batch_size)]  # completed by the last write
        self.closed = [False] * batch_size
        self.done = [False] * batch_size
        self.wants_read = [False] * batch_size  # the stream predicted its end before its source ended
        self.outputs = [StreamOutput() for _ in range(batch_size)]
        self.forward_tokens = 0
        self.last_logits: torch.Tensor | None = None  # (B, V) logits of the latest write
        self.last_hidden: torch.Tensor | None = None  # (B, D) final-layer hidden state of the latest write row
        self.record_attention = record_attention  # keep each layer's attention of the latest write row
        self.last_attention: list = []  # per layer: AttentionRecord (probs (B, H, 1, Tk) + key metadata) or None
        self._append_source([[list(self.frame.prompt)] for _ in range(batch_size)], first_segment=[0] * batch_size)

    # ------------------------------------------------------------------------------------------ reading
    def _streams(self, per_stream: Sequence, what: str) -> list:
        if self.batch_size == 1 and (not per_stream or isinstance(per_stream[0], str)):
            per_stream = [per_stream]
        if len(per_stream) != self.batch_size:
            raise BriskError(f"{what} got {len(per_stream)} streams; this session has batch_size={self.batch_size}")
        return list(per_stream)

    @torch.no_grad()
    def _append_source(self, segments: list[list[list[int]]], first_segment: list[int]) -> None:
        """Encode new source segments of every stream (B lists of token-id lists) into the source cache."""
        rows = [[(tok, first_segment[b] + i) for i, seg in enumerate(segs) for tok in seg] for b, segs in enumerate(segments)]
        width = max(len(r) for r in rows)
        if width == 0:
            return
        batch, host = self.batch_size, torch.device("cpu")  # filled element-wise on the host, moved once below
        ids = torch.full((batch, width), self.frame.pad, dtype=torch.long, device=host)
        valid = torch.zeros(batch, width, dtype=torch.bool, device=host)
        order = torch.zeros(batch, width, dtype=torch.long, device=host)
        segment = torch.full((batch, width), 1 << 30, dtype=torch.long, device=host)
        for b, r in enumerate(rows):
            for j, (tok, seg) in enumerate(r):
                ids[b, j], valid[b, j], segment[b, j] = tok, True, seg
            order[b] = self.src_tokens[b] + torch.arange(width, device=host).clamp(max=max(len(r) - 1, 0))  # pads repeat
            self.src_tokens[b] += len(r)
        meta = {"group": torch.full_like(ids, SOURCE), "segment": segment, "sees": torch.zeros_like(ids)}
        plan = Plan(position_ids=order.to(self.device), order=order.to(self.device), visibility=GroupVisibility(),
                    row_meta={k: v.to(self.device) for k, v in meta.items()})
        execute(self.model, ids.to(self.device), plan=plan, cache=self.source_cache,
                attention_mask=valid.to(self.device), logits_rows="none")
        self.forward_tokens += int(valid.sum())

    def read(self, words: Sequence[str] | Sequence[Sequence[str]]) -> None:
        """Append source words (a list per stream; a flat list when batch_size is 1)."""
        per_stream = self._streams(words, "read")
        for b, w in enumerate(per_stream):
            if w and self.closed[b]:
                raise BriskError(f"stream {b} is closed: it cannot read more source words")
        segments = [word_segments(self.text, list(w), self.src_segments[b] == 0 and self.frame.first_at_start)
                    if w else []
                    for b, w in enumerate(per_stream)]  # unknown words raise here
        first = [self.src_segments[b] + 1 for b in range(self.batch_size)]
        self._append_source(segments, first)
        for b, segs in enumerate(segments):
            self.src_segments[b] += len(segs)

    def close(self, streams: Sequence[int] | None = None) -> None:
        """End the source of the given streams (default all): appends the end-of-source marker."""
        chosen = list(range(self.batch_size)) if streams is None else list(streams)
        for b in chosen:
            if not 0 <= b < self.batch_size:
                raise BriskError(f"no stream {b}: this session has streams 0..{self.batch_size - 1}")
            if self.closed[b]:
                raise BriskError(f"stream {b} is already closed: close each stream once")
            if self.src_segments[b] == 0:
                raise BriskError(f"stream {b} is empty: read at least one source word before closing it")
        segments = [[list(self.frame.source_end)] if b in chosen else [] for b in range(self.batch_size)]
        first = [self.src_segments[b] + 1 for b in range(self.batch_size)]
        self._append_source(segments, first)
        for b in chosen:
            self.closed[b] = True
            self.src_segments[b] += 1
            self.outputs[b].source_words = self.src_segments[b] - 1

    # ------------------------------------------------------------------------------------------ writing
    def words_read(self, stream: int) -> int:
        """Source words read so far by a stream (the end marker is not a word)."""
        return self.src_segments[stream] - int(self.closed[stream])

    def words_started(self, stream: int) -> int:
        """Target words written so far, the one still open (subword tokenizers) included."""
        return len(self.outputs[stream].words) + int(self.target_words[stream].open)

    def _feed_prefix(self, streams: Sequence[int]) -> None:
        """Feed all but the last pending id of the given streams (a multi-token header) without logits."""
        rows = [self.pending[b][:-1] if b in streams else [] for b in range(self.batch_size)]
        width = max(len(r) for r in rows)
        if width == 0:
            return
        host = torch.device("cpu")
        ids = torch.full((self.batch_size, width), self.frame.pad, dtype=torch.long, device=host)
        valid = torch.zeros(self.batch_size, width, dtype=torch.bool, device=host)
        order = torch.zeros(self.batch_size, width, dtype=torch.long, device=host)
        for b, r in enumerate(rows):
            ids[b, :len(r)] = torch.tensor(r, dtype=torch.long)
            valid[b, :len(r)] = True
            order[b] = self.tgt_tokens[b] + torch.arange(width, device=host).clamp(max=max(len(r) - 1, 0))
        self._target_forward(ids, order, valid, logits_rows="none")
        for b, r in enumerate(rows):
            self.tgt_tokens[b] += len(r)
            self.pending[b] = self.pending[b][len(r):]
        self.forward_tokens += int(valid.sum())

    def _target_forward(self, ids: torch.Tensor, order: torch.Tensor, valid: torch.Tensor, **kwargs):
        """Feed target rows (B, W) that see the source segments read so far; positions per `self.positions`."""
        host = torch.device("cpu")
        if self.positions == "group":
            position = self.phi + order
        else:
            position = order + torch.tensor([[self.src_tokens[b]] for b in range(self.batch_size)], device=host)
        sees = torch.tensor([[self.src_segments[b]] for b in range(self.batch_size)], device=host).expand_as(ids).clone()
        meta = {"group": torch.full_like(ids, TARGET), "segment": torch.zeros_like(ids), "sees": sees}
        plan = Plan(position_ids=position.to(self.device), order=order.to(self.device), visibility=GroupVisibility(),
                    row_meta={k: v.to(self.device) for k, v in meta.items()})
        return execute(self.model, ids.to(self.device), plan=plan, cache=self.target_cache, context=[self.source_cache],
                       attention_mask=valid.to(self.device), **kwargs)

    @torch.no_grad()
    def write(self, forced: Sequence[int | None] | None = None, streams: Sequence[int] | None = None, *,
              gate: Callable[["StreamingSession", torch.Tensor], Sequence[bool]] | None = None,
              forbid_early_end: bool | Sequence[bool] = False) -> list[str | None]:
        """Write one target token in each chosen open stream (greedy, or `forced` ids); returns each written
        token's string (a whole word on a word-level tokenizer), None where nothing is written.

        gate(session, logits (B, V)) -> per-stream bool, called after the forward (last_hidden/last_attention set):
        False means READ instead: the row is retracted and `wants_read` is set, as for an early end.
        forbid_early_end (one bool, or one per stream) masks the end markers in open streams (logits exclude them).
        """
        chosen = [b for b in (range(self.batch_size) if streams is None else streams) if not self.done[b]]
        for b in chosen:
            if self.src_segments[b] == 0:
                raise BriskError(f"stream {b} has read no source word: read before writing (empty stream)")
        self.new_words = [[] for _ in range(self.batch_size)]
        if any(len(self.pending[b]) > 1 for b in chosen):
            self._feed_prefix([b for b in chosen if len(self.pending[b]) > 1])
        host = torch.device("cpu")  # small per-step inputs built on the host, moved once below
        active = torch.zeros(self.batch_size, dtype=torch.bool, device=host)
        active[chosen] = True
        ids = torch.tensor([[self.pending[b][-1] if active[b] else self.frame.pad] for b in range(self.batch_size)],
                           device=host)
        order = torch.tensor([[self.tgt_tokens[b]] for b in range(self.batch_size)], device=host)
        out = self._target_forward(ids, order, active[:, None], logits_rows="last",
                                   record_attention=self.record_attention)
        logits = out.logits[:, -1].float().cpu()  # (B, V)
        forbid = [forbid_early_end] * self.batch_size if isinstance(forbid_early_end, bool) else list(forbid_early_end)
        still_open = torch.tensor([f and not c for f, c in zip(forbid, self.closed)], dtype=torch.bool, device=host)
        if bool(still_open.any()):
            logits[still_open[:, None] & self._end_columns(logits.shape[1])] = float("-inf")
        self.last_logits = logits
        self.last_hidden = out.last_hidden[:, -1].float().cpu()
        self.last_attention = list(out.attentions) if self.record_attention else []
        allow = [True] * self.batch_size if gate is None else list(gate(self, logits))
        self.forward_tokens += len(chosen)
        written: list[str | None] = [None] * self.batch_size
        for b in chosen:
            self.wants_read[b] = False
            if not allow[b]:  # the gate chose READ: retract the row, it is re-fed after the next read
                self._retract_last_target(b)
                self.wants_read[b] = True
                continue
            token = int(forced[b]) if forced is not None and forced[b] is not None else int(logits[b].argmax())
            if token in self.frame.ends:
                if not self.closed[b]:  # the target cannot end before the source: retract the row, read more
                    self._retract_last_target(b)
                    self.wants_read[b] = True
                    continue
                self.stop(b, truncated=False)
                continue
            self.tgt_tokens[b] += 1
            self.pending[b] = [token]
            self.written[b].append(token)
            written[b] = self.tokenizer.convert_ids_to_tokens(token)
            self._add_words(b, self.target_words[b].feed(token, self.words_read(b)))
            if self.max_target_words is not None and self.words_started(b) >= self.max_target_words:
                self.stop(b)
        return written

    def _end_columns(self, vocab: int) -> torch.Tensor:
        columns = torch.zeros(1, vocab, dtype=torch.bool)
        columns[0, [i for i in self.frame.ends if i < vocab]] = True
        return columns

    def _add_words(self, stream: int, words: list[tuple[str, int]]) -> None:
        output = self.outputs[stream]
        for word, delay in words:
            output.words.append(word)
            output.delays.append(delay)
        self.new_words[stream] += words

    def stop(self, stream: int, truncated: bool = True) -> None:
        """End a stream's target now (its open word is completed); truncated=True marks a length cap."""
        if self.done[stream]:
            return
        self.done[stream] = True
        self.outputs[stream].truncated = self.outputs[stream].truncated or truncated
        self._add_words(stream, self.target_words[stream].finish())

    def _retract_last_target(self, stream: int) -> None:
        """Mark the stream's newest target key invalid in every layer (a per-stream rollback inside a batch)."""
        for layer in self.target_cache.layers:
            valid = layer.meta["valid"].clone()
            valid[stream, -1] = False
            layer.meta["valid"] = valid

    def finish(self, max_target_words: int = 256) -> list[StreamOutput]:
        """Close open sources and write until every stream ends; returns each stream's output."""
        open_streams = [b for b in range(self.batch_size) if not self.closed[b]]
        if open_streams:
            self.close(open_streams)
        while not all(self.done):
            self.write()
            for b in range(self.batch_size):
                if not self.done[b] and self.words_started(b) >= max_target_words:
                    self.stop(b)
        return self.outputs


def reference_logits(model, tokenizer, source_words: Sequence[str], target_ids: Sequence[int], k: int,
                     mode: str = "group", phi: int = 0, instruction: str | None = None) -> torch.Tensor:
    """(m+1, V) logits of the rows that predict target token 1 .. the end marker, from one full masked pass
    (target ids are grouped into words as the engine's WordDecoder groups them)."""
    from brisklm.core import MatrixVisibility
    from brisklm.streaming.gpe import build_layout, collate

    layout = build_layout(tokenizer, source_words, target_segments=token_words(tokenizer, target_ids),
                          instruction=instruction)
    batch = collate([layout], [k], stream_frame(tokenizer, instruction).pad, mode=mode, phi=phi)
    plan = Plan(position_ids=batch["position_ids"].to(model.device), visibility=MatrixVisibility(batch["visibility"].to(model.device)))
    with torch.no_grad():
        logits = execute(model, batch["input_ids"].to(model.device), plan=plan,
                         attention_mask=batch["attention_mask"].to(model.device)).logits[0]
    start = len(layout.source_ids) + len(layout.target[0]) - 1  # the header's last row predicts token 1
    return logits[start:start + len(target_ids) + 1].float().cpu()
