"""The word-level thinker zoo models (streaming-thinker, thinker-batch-cot) batched across server sessions on
persistent slots: the steps of `streaming.thinker.session.ThinkerSession` (question + question unit, a unit per
fact, end marker, final segment at the session's depth) for many rows at once, on the slot engine of
serve/thinker_slots.py. Tests check the units, delays, final segment and answer equal a ThinkerSession run
alone at D1/D2/D3 (tests/test_serve_policies.py).
"""

from __future__ import annotations

from typing import Sequence

import torch

from brisklm.core.text import TextLayer, word_ids
from brisklm.errors import BriskError
from brisklm.serve.slots import Slot
from brisklm.serve.thinker_slots import PER_ROW, ThinkerEngine, TextThinkerPolicy
from brisklm.streaming.thinker.data import DEPTHS, THINKER_WORDS, check_depth, check_mode
from brisklm.streaming.thinker.session import parse_answer
from brisklm.streaming.thinker.text import TextThinkerSession
from brisklm.tasks.streaming_arithmetic import ANSWER, SKIP, UNIT_END

QUESTION_END, FACT_END = "?", "."
ZOO_ROW = {**PER_ROW, "zoo_pending": None, "depth": None, "facts": 0, "final": None, "answer": None}


class _Rows(TextThinkerSession):
    """TextThinkerSession's batched input/reasoning forwards with the zoo thinker's positions: group positions
    in streaming mode, reasoning after the input (order + input tokens) in the batch-CoT mode."""

    def __init__(self, model, text: TextLayer, mode: str) -> None:
        super().__init__(model, text, 1, marker=[0])
        self.mode = mode
        for name, fresh in ZOO_ROW.items():
            if name not in PER_ROW:
                setattr(self, name, [fresh])

    def _reasoning_positions(self, order: torch.Tensor) -> torch.Tensor:
        if self.mode == "streaming":
            return order
        return order + torch.tensor(self.src_tokens)[:, None]  # batch CoT: reasoning after the whole input


class ZooThinkerEngine(ThinkerEngine):
    """Rows of ThinkerSession streams (one mode and caps per engine; the depth per row)."""

    per_row = ZOO_ROW

    def __init__(self, model, text: TextLayer, mode: str, *, max_unit_tokens: int = 12, max_final_tokens: int = 64,
                 max_rows: int = 64) -> None:
        super().__init__(model, text, [0], max_rows=max_rows, session=_Rows(model, text, mode))
        tok = text.tokenizer
        vocab = tok.get_vocab()
        self.tok, self.vocab, self.mode = tok, vocab, mode
        self.max_unit_tokens, self.max_final_tokens = max_unit_tokens, max_final_tokens
        banned = {tok.pad_token_id, tok.bos_token_id, tok.sep_token_id, tok.unk_token_id, *(vocab[d] for d in DEPTHS)}
        self.unit_ban = torch.tensor(sorted(i for i in banned | {tok.eos_token_id} if i is not None))
        self.final_ban = torch.tensor(sorted(i for i in banned if i is not None))
        self.unit_end = vocab[UNIT_END]

    def _rows(self, table: dict[int, list[int]]) -> list[list[int]]:
        return [table.get(b, []) for b in range(self.size)]

    def _choose(self, logits: torch.Tensor, ban: torch.Tensor) -> int:
        masked = logits.clone()
        masked[ban] = float("-inf")
        return int(masked.argmax())

    def _units(self, rows: Sequence[int]) -> None:
        """One reasoning unit in each row, batched (ThinkerSession._unit: up to and including ';', whose feed
        waits for the next input)."""
        s = self.session
        if not rows:
            return
        outs = s._feed(self._rows({b: [s.zoo_pending[b] if s.zoo_pending[b] is not None else self.tok.sep_token_id]
                                   for b in rows}))
        words: dict[int, list[str]] = {b: [] for b in rows}
        active = list(rows)
        while active:
            feed: dict[int, list[int]] = {}
            for b in active:
                token = self._choose(outs[b], self.unit_ban)
                words[b].append(self.tok.convert_ids_to_tokens(token))
                if token == self.unit_end:
                    s.zoo_pending[b] = token
                elif len(words[b]) >= self.max_unit_tokens:  # a unit that never closes: close it and say so
                    s.truncated[b] = True
                    words[b].append(UNIT_END)
                    s.zoo_pending[b] = self.unit_end
                else:
                    feed[b] = [token]
            if feed:
                outs = s._feed(self._rows(feed))
            active = list(feed)
        for b in rows:
            s.units[b].append(" ".join(words[b]))

    def read(self, words: dict[Slot, list[str]]) -> None:
        """A question (row not started) or a fact per slot in one input forward; streaming rows then write a unit."""
        s = self.session
        segments: list[list[int] | None] = [None] * self.size
        for slot, w in words.items():
            row = slot.index
            if s.segments[row] < 0:
                segments[row] = [self.tok.bos_token_id, *word_ids(self.tok, w)]
            else:
                segments[row] = word_ids(self.tok, w)
                s.facts[row] += 1
        s._read(segments)
        if self.mode == "streaming":
            self._units([slot.index for slot in words])
        self.calls += 1

    def close(self, slots: Sequence[Slot]) -> None:
        """End marker, (batch mode: every unit now), then the final segment at each row's depth, batched."""
        s = self.session
        rows = [slot.index for slot in slots]
        s._read([[self.tok.eos_token_id] if b in rows else None for b in range(self.size)])
        if self.mode == "batch":
            for index in range(max(s.facts[b] for b in rows) + 1):
                self._units([b for b in rows if s.facts[b] >= index])
        s._feed(self._rows({b: [s.zoo_pending[b]] for b in rows}), logits=False)
        outs = s._feed(self._rows({b: [self.vocab[s.depth[b]]] for b in rows}))
        words = {b: [s.depth[b]] for b in rows}
        active = list(rows)
        while active:
            feed: dict[int, list[int]] = {}
            for b in active:
                if len(words[b]) >= self.max_final_tokens:
                    s.truncated[b] = True
                    continue
                token = self._choose(outs[b], self.final_ban)
                if token == self.tok.eos_token_id:
                    continue
                words[b].append(self.tok.convert_ids_to_tokens(token))
                feed[b] = [token]
            if feed:
                outs = s._feed(self._rows(feed))
            active = list(feed)
        for b in rows:
            s.final[b], s.answer[b] = " ".join(words[b]), parse_answer(words[b])
            s.finals[b] = s.final[b]
        self.calls += 1


class ZooThinkerPolicy(TextThinkerPolicy):
    """The thinker zoo protocol: the question ends with the word '?', each fact with the word '.'; the question
    unit comes with the question (streaming mode); the answer is always the session's one target word."""

    answer_always = True

    def __init__(self, model, text: TextLayer, depth: str = "D2", mode: str = "streaming", *,
                 max_unit_tokens: int = 12, max_final_tokens: int = 64, engines=None) -> None:
        vocab = text.tokenizer.get_vocab()
        missing = [w for w in (*THINKER_WORDS, UNIT_END, ANSWER, SKIP) if w not in vocab]
        if missing:
            raise BriskError(f"the tokenizer lacks the thinker words {missing}: use a model trained by the thinker "
                             "zoo recipes (streaming-thinker, thinker-batch-cot)")
        super().__init__(model, text, [0], max_unit_tokens=max_unit_tokens, max_final_tokens=max_final_tokens,
                         engines=engines)
        self.depth, self.mode = check_depth(depth), check_mode(mode)
        self.key = ("zoo-thinker", self.mode, max_unit_tokens, max_final_tokens)

    def _make_engine(self, max_rows: int) -> ZooThinkerEngine:
        return ZooThinkerEngine(self.model, self.text, self.mode, max_unit_tokens=self.max_unit_tokens,
                                max_final_tokens=self.max_final_tokens, max_rows=max_rows)

    def join(self) -> None:
        super().join()
        self.engine.session.depth[self.row] = self.depth

    def check_words(self, words: Sequence[str]) -> None:
        word_ids(self.tokenizer, list(words))  # raises naming unknown words

    def _split(self) -> tuple[list[list[str]], list[str]]:
        segments, current, asked = [], [], self.segments_read > 0
        for word in self.buffer:
            current.append(word)
            if word == (FACT_END if asked else QUESTION_END):
                segments.append(current)
                current, asked = [], True
        return segments, current

    def push(self, words: Sequence[str], at: float | None = None) -> None:
        asked = self.segments_read > 0 or QUESTION_END in self.buffer
        for word in words:
            if word == QUESTION_END and asked:
                raise BriskError("a second '?': send the question once, then facts that each end with '.'")
            if word == FACT_END and not asked:
                raise BriskError("a fact came before the question: send the question first, ending with '?' "
                                 "(e.g. 'Q: C from A ?'), then facts such as 'B = A + 4 .'")
            asked = asked or word == QUESTION_END
        super().push(words, at)

    def _check_end(self) -> None:
        segments, rest = self._split()
        if self.segments_read == 0 and not segments:
            raise BriskError("the source has no question: send the question ending with '?' before 'end'")
        if rest:
            raise BriskError(f"the last fact {' '.join(rest)!r} does not end with '.': finish it before 'end'")

    def _final(self) -> tuple[str, str]:
        state = self.engine.session
        return state.final[self.row] or "", state.answer[self.row] or ""
