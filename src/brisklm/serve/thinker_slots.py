"""StreamingThinker on any (subword) checkpoint, batched across server sessions on persistent slots.

`ThinkerEngine` is a `TextThinkerSession` whose batch rows are slots (as serve/slots.py does for the GPE
engine): a new session takes a free row (its old keys in the input and reasoning caches are marked invalid and
its per-row state is reset, so it starts exactly as a fresh one-stream session), and the questions, sentences
and ends of many sessions run as one engine call each: one input forward for every row that read a segment,
then the unit writes of all rows that read a sentence as one batched decode loop; an end reads the end-of-input
segments together and writes the final segments together. Rows grow by doubling up to max_rows (then another
engine is made); caches are compacted by `slots.compact_cache`.

`TextThinkerPolicy` is the session side (a SlotPolicy, so the scheduler batches it): the client sends text;
the question is the words up to the first word ending with '?', each later sentence ends at a word ending with
'.', '!' or '?'. A `reason` frame carries each sentence's unit as soon as it is written; after 'end', a
`reason` frame with the final segment (final=true, answer) and, when the model wrote an answer ('Answer: ...'),
the answer as the session's one target word. Outputs equal `TextThinkerSession` run alone on the same text.
"""

from __future__ import annotations

import copy
from typing import Sequence

from brisklm.core.text import TextLayer
from brisklm.errors import BriskError
from brisklm.serve.policy import CLOSE, FINISH, JOIN, READ, Item, SlotPolicy, Step
from brisklm.serve.slots import Slot, compact_cache, grow_cache, reset_row
from brisklm.streaming.thinker.text import TextThinkerSession, _ids, parse_answer, thinker_frame

QUESTION_END = ("?",)
SENTENCE_END = (".", "!", "?")
PER_ROW = {"src_tokens": 0, "tgt_tokens": 0, "segments": -1, "pending": [], "units": [], "finals": None,
           "ended": False, "truncated": False, "frames": None, "logits": []}


class ThinkerEngine:
    """A batched TextThinkerSession whose rows are taken and given back by server sessions."""

    per_row = PER_ROW  # the session's per-row lists and their fresh values

    def __init__(self, model, text: TextLayer, marker: Sequence[int], *, max_unit_tokens: int = 48,
                 max_final_tokens: int = 128, max_rows: int = 64, session: TextThinkerSession | None = None) -> None:
        self.session = session if session is not None else TextThinkerSession(
            model, text, 1, marker=marker, max_unit_tokens=max_unit_tokens, max_final_tokens=max_final_tokens)
        self.text, self.max_rows = text, max_rows
        self.slots: list[Slot | None] = [None]
        self.calls = 0

    @property
    def size(self) -> int:
        return self.session.batch_size

    @property
    def full(self) -> bool:
        return None not in self.slots and self.size >= self.max_rows

    def acquire(self) -> Slot:
        """A free row (doubling the rows when full), reset to a fresh stream."""
        if self.full:
            raise BriskError(f"the thinker engine is full ({self.max_rows} rows): take a slot from another engine")
        if None not in self.slots:
            self._grow(min(self.size, self.max_rows - self.size))
        row = self.slots.index(None)
        slot = Slot(self, row)  # type: ignore[arg-type] - Slot only needs release()
        self.slots[row] = slot
        s = self.session
        for name, fresh in self.per_row.items():
            getattr(s, name)[row] = copy.copy(fresh)
        reset_row(s.input_cache, row)
        reset_row(s.reasoning_cache, row)
        return slot

    def release(self, slot: Slot) -> None:
        if self.slots[slot.index] is slot:
            self.slots[slot.index] = None

    def _grow(self, rows: int) -> None:
        s = self.session
        grow_cache(s.input_cache, rows)
        grow_cache(s.reasoning_cache, rows)
        for name, fresh in self.per_row.items():
            getattr(s, name).extend(copy.copy(fresh) for _ in range(rows))
        s.batch_size += rows
        self.slots += [None] * rows

    def compact(self) -> None:
        compact_cache(self.session.input_cache)
        compact_cache(self.session.reasoning_cache)

    def memory_bytes(self, slot: Slot) -> int:
        s, row = self.session, slot.index
        layer = next((l for l in s.input_cache.layers if l.keys is not None), None)
        if layer is None:
            return 0
        per_token = 2 * layer.keys.shape[1] * layer.keys.shape[3] * layer.keys.element_size() * len(s.input_cache)
        return per_token * (s.src_tokens[row] + s.tgt_tokens[row])

    # ------------------------------------------------------------------------------------------ engine calls
    def read(self, words: dict[Slot, list[str]]) -> None:
        """One segment per slot: a row not started reads it as its question (and feeds the reasoning header), a
        started row reads it as the next sentence and writes its unit; all rows in one input forward."""
        s, b_size = self.session, self.size
        segments: list[list[int] | None] = [None] * b_size
        starts, facts = [], []
        for slot, w in words.items():
            row, line = slot.index, " ".join(w)
            if s.segments[row] < 0:
                s.frames[row] = thinker_frame(self.text, line)
                segments[row] = list(s.frames[row].prompt)
                starts.append(row)
            else:
                segments[row] = _ids(self.text, line, "the sentence", at_start=False)
                facts.append(row)
        s._read(segments)
        if starts:  # header rows see the question only (as TextThinkerSession.start)
            s._feed([list(s.frames[b].header[:-1]) if b in starts else [] for b in range(b_size)], logits=False)
            for b in starts:
                s.pending[b] = [s.frames[b].header[-1]]
        if facts:
            for b, ids in s._write(facts, final=False).items():
                s.units[b].append(s._unit_text(ids))
        self.calls += 1

    def close(self, slots: Sequence[Slot]) -> None:
        """End the input of several slots and write their final segments, batched."""
        s = self.session
        rows = [slot.index for slot in slots]
        s.end(rows)
        for b, ids in s._write(rows, final=True).items():
            s.finals[b] = s.text.decode(ids).strip()
        self.calls += 1


def split_segments(words: Sequence[str], question_read: bool) -> tuple[list[list[str]], list[str]]:
    """Complete segments of `words` (the question first unless already read) and the unfinished rest."""
    segments, current, question = [], [], not question_read
    for word in words:
        current.append(word)
        if word.endswith(QUESTION_END if question else SENTENCE_END):
            segments.append(current)
            current, question = [], False
    return segments, current


class TextThinkerPolicy(SlotPolicy):
    """One thinker stream on a slot of a shared ThinkerEngine (see the module docstring)."""

    name = "thinker"
    answer_always = False  # the answer is a target word only when the model wrote one

    def __init__(self, model, text: TextLayer, marker: Sequence[int], *, max_unit_tokens: int = 48,
                 max_final_tokens: int = 128, engines=None) -> None:
        super().__init__(model, text, engines=engines)
        self.model, self.marker = model, list(marker)
        self.max_unit_tokens, self.max_final_tokens = max_unit_tokens, max_final_tokens
        self.key = ("text-thinker", tuple(self.marker), max_unit_tokens, max_final_tokens, self.text.chat_template)
        self.segments_read = 0  # the question included
        self.consumed = 0  # source words handed to the engine
        self.sent_units = 0

    # ----------------------------------------------------------------------------------- the slot
    def _make_engine(self, max_rows: int) -> ThinkerEngine:
        return ThinkerEngine(self.model, self.text, self.marker, max_unit_tokens=self.max_unit_tokens,
                             max_final_tokens=self.max_final_tokens, max_rows=max_rows)

    @property
    def engine(self):
        return self._engine if self._engine is not None else self.pool.other_engine(self.key, self._make_engine)

    def join(self) -> None:
        if self.slot is None:
            self._engine = self.pool.other_engine(self.key, self._make_engine)
            self.slot = self._engine.acquire()

    # ----------------------------------------------------------------------------------- input
    def _split(self) -> tuple[list[list[str]], list[str]]:
        """Complete segments in the buffer (the question first while unread) and the unfinished rest."""
        return split_segments(self.buffer, self.segments_read > 0)

    def push_end(self, at: float | None = None) -> None:
        self._check_end()
        super().push_end(at)

    def _check_end(self) -> None:
        """Check the source's shape before accepting its end: a question, complete sentences, one at least."""
        segments, rest = self._split()
        if self.segments_read == 0 and not segments:
            raise BriskError("the source has no question: the question must end with a word ending in '?' "
                             "(e.g. 'Who owns the cat?'), then the context sentences")
        if rest:
            raise BriskError(f"the last sentence {' '.join(rest)!r} does not end with '.', '!' or '?': finish it "
                             "before 'end'")
        if self.segments_read + len(segments) < 2:
            raise BriskError("the source has no context: send at least one sentence after the question")

    # ----------------------------------------------------------------------------------- steps
    def next_step(self) -> Step | None:
        if self.finished:
            return None
        segments, _ = self._split()
        if self.slot is None:
            return Step(JOIN) if (segments or self.ended) else None
        state = self.engine.session
        if state.finals[self.row] is not None:
            return Step(FINISH)
        if segments:
            return Step(READ, segments[0])
        if self.ended and not self.buffer:
            return Step(CLOSE)
        return None

    def apply_step(self, step: Step) -> list[Item]:
        state, row = self.engine.session, self.row
        if step.kind == READ:
            n = len(step.words)
            self.unlocked_at = max(self.unlocked_at, self.arrivals[n - 1])
            del self.buffer[:n], self.arrivals[:n]
            self.consumed += n
            self.segments_read += 1
            return self._new_units()
        if step.kind == CLOSE:
            self.unlocked_at = max(self.unlocked_at, self.end_at)
            return []
        if step.kind == FINISH:
            self.finished = True
            final, answer = self._final()
            items = self._new_units()
            items.append(Item("reason", final, self.consumed, self.sent_units + 1, self.unlocked_at,
                              {"final": True, "answer": answer}))
            if answer or self.answer_always:
                items.append(Item("word", answer, self.consumed, 1, self.unlocked_at))
            items.append(Item("end", answer, self.consumed, int(bool(answer) or self.answer_always), self.unlocked_at,
                              {"truncated": bool(state.truncated[row])}))
            return items
        return []

    def _final(self) -> tuple[str, str]:
        """The row's final segment and the answer parsed from it."""
        final = self.engine.session.finals[self.row] or ""
        return final, parse_answer(final)

    def _new_units(self) -> list[Item]:
        items = []
        for unit in self.engine.session.units[self.row][self.sent_units:]:
            self.sent_units += 1
            items.append(Item("reason", unit, self.consumed, self.sent_units, self.unlocked_at,
                              {"unit": self.sent_units - 1}))
        return items
