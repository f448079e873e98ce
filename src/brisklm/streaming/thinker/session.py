"""StreamingThinker inference: ThinkerSession keeps an input cache and a reasoning cache and writes a unit
per fact as it arrives; reference_logits is the full masked pass it must equal (data layout in data.py).
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Sequence

import torch

from brisklm.core import KVCache, MatrixVisibility, Plan, execute
from brisklm.core.adapter import ModelAdapter
from brisklm.core.text import word_ids
from brisklm.errors import BriskError
from brisklm.streaming.engine import SOURCE, TARGET, GroupVisibility
from brisklm.streaming.thinker.data import (DEPTHS, THINKER_WORDS, ThinkerTrace, check_depth, check_mode, thinker_batch,
                                            thinker_layout)
from brisklm.tasks.base import Example
from brisklm.tasks.streaming_arithmetic import ANSWER, SKIP, UNIT_END


def reference_logits(model, tokenizer, trace: ThinkerTrace, mode: str = "streaming") -> torch.Tensor:
    """(T-1, V) logits of every fed reasoning row (header .. last word before <eos>) from one full masked pass."""
    layout = thinker_layout(tokenizer, trace)
    batch = thinker_batch([layout], tokenizer.pad_token_id, mode)
    device = next(model.parameters()).device
    plan = Plan(position_ids=batch["position_ids"].to(device), visibility=MatrixVisibility(batch["visibility"].to(device)))
    with torch.no_grad():
        logits = execute(model, batch["input_ids"].to(device), plan=plan,
                         attention_mask=batch["attention_mask"].to(device)).logits[0]
    s_len, t_len = len(layout.source_ids), len(layout.target_ids)
    return logits[s_len:s_len + t_len - 1].float().cpu()


# ------------------------------------------------------------------------------------------ inference
@dataclass
class ThinkerEvent:
    """One forward of the session: 'read' (input segment) or 'write' (one reasoning token), its cost and result."""

    kind: str
    tokens: int
    seconds: float
    segment: int  # input segments read so far (0 = question only)
    predicts: str | None = None  # the word this write's logits chose (None for reads)
    answer: bool = False  # this write produced the answer value


@dataclass
class ThinkerResult:
    """What a finished session produced: units (question unit first), final segment, answer, and its events."""

    units: list[str]
    final: str
    answer: str
    events: list[ThinkerEvent] = field(default_factory=list)
    input_tokens_forwarded: int = 0
    reasoning_tokens_forwarded: int = 0
    truncated: bool = False


class ThinkerSession:
    """Think while reading: `read_question(q)`, then `read_fact(f) -> [unit]` per fact, then `finish()`.

    mode="streaming": group positions and the sentence-level mask; a unit is generated right after each fact.
    mode="batch": the batch-CoT baseline; read_* only encode input, and `finish()` writes every unit, then the end.
    Input tokens go to `input_cache` once; reasoning tokens go to `reasoning_cache` once (nothing is re-encoded).
    """

    def __init__(self, model, tokenizer, depth: str = "D2", *, mode: str = "streaming", max_unit_tokens: int = 12,
                 max_final_tokens: int = 64, keep_logits: bool = False, forced: ThinkerTrace | None = None) -> None:
        self.model, self.tokenizer = model, tokenizer
        self.depth, self.mode = check_depth(depth), check_mode(mode)
        self.max_unit_tokens, self.max_final_tokens = max_unit_tokens, max_final_tokens
        vocab = tokenizer.get_vocab()
        missing = [w for w in (*THINKER_WORDS, UNIT_END, ANSWER, SKIP) if w not in vocab]
        if missing:
            raise BriskError(f"the tokenizer lacks the thinker words {missing}: use a model trained by the thinker "
                             "zoo recipes (streaming-thinker, thinker-batch-cot)")
        self.unit_end, self.answer_id, self.depth_id = vocab[UNIT_END], vocab[ANSWER], vocab[depth]
        banned = {tokenizer.pad_token_id, tokenizer.bos_token_id, tokenizer.sep_token_id, tokenizer.unk_token_id,
                  *(vocab[d] for d in DEPTHS)}
        self._unit_ban = torch.tensor(sorted(banned | {tokenizer.eos_token_id}))
        self._final_ban = torch.tensor(sorted(banned))
        layers = ModelAdapter.from_model(model).num_layers
        self.input_cache, self.reasoning_cache = KVCache(layers), KVCache(layers)
        self.device = next(model.parameters()).device
        self.keep_logits, self.logits = keep_logits, []  # (V,) per reasoning row when keep_logits
        self.forced = forced
        self.src_tokens = self.tgt_tokens = 0
        self.segments_read = -1  # index of the last input segment read (0 = question, then facts, then the end)
        self.facts_read = 0
        self.pending: int | None = None  # predicted, not yet fed (its row must see the next input)
        self.started = self.input_ended = self.finished = self.truncated = False
        self.units: list[str] = []
        self.events: list[ThinkerEvent] = []
        self.input_tokens_forwarded = self.reasoning_tokens_forwarded = 0
        self._last_logits: torch.Tensor | None = None

    # ------------------------------------------------------------------ forwards
    @torch.no_grad()
    def _read(self, ids: list[int]) -> None:
        """Encode one input segment into the input cache (input rows never see reasoning rows)."""
        start = time.perf_counter()
        self.segments_read += 1
        n = len(ids)
        order = (self.src_tokens + torch.arange(n))[None]
        meta = {"group": torch.full((1, n), SOURCE), "segment": torch.full((1, n), self.segments_read),
                "sees": torch.zeros(1, n, dtype=torch.long)}
        plan = Plan(position_ids=order.to(self.device), order=order.to(self.device), visibility=GroupVisibility(),
                    row_meta={k: v.to(self.device) for k, v in meta.items()})
        execute(self.model, torch.tensor([ids], device=self.device), plan=plan, cache=self.input_cache,
                logits_rows="none")
        self.src_tokens += n
        self.input_tokens_forwarded += n
        self.events.append(ThinkerEvent("read", n, time.perf_counter() - start, self.segments_read))

    @torch.no_grad()
    def _feed(self, token: int) -> torch.Tensor:
        """Feed one reasoning token (sees the input read so far); return the (V,) logits of its row."""
        start = time.perf_counter()
        order = torch.tensor([[self.tgt_tokens]])
        position = order if self.mode == "streaming" else order + self.src_tokens
        meta = {"group": torch.full((1, 1), TARGET), "segment": torch.zeros(1, 1, dtype=torch.long),
                "sees": torch.tensor([[self.segments_read]])}
        plan = Plan(position_ids=position.to(self.device), order=order.to(self.device), visibility=GroupVisibility(),
                    row_meta={k: v.to(self.device) for k, v in meta.items()})
        out = execute(self.model, torch.tensor([[token]], device=self.device), plan=plan, cache=self.reasoning_cache,
                      context=[self.input_cache], logits_rows="last")
        logits = out.logits[0, -1].float().cpu()
        self.tgt_tokens += 1
        self.reasoning_tokens_forwarded += 1
        if self.keep_logits:
            self.logits.append(logits)
        self.events.append(ThinkerEvent("write", 1, time.perf_counter() - start, self.segments_read))
        self._last_logits = logits
        return logits

    def _choose(self, logits: torch.Tensor, ban: torch.Tensor, forced: str | None) -> int:
        if forced is not None:
            return word_ids(self.tokenizer, [forced])[0]
        masked = logits.clone()
        masked[ban] = float("-inf")
        return int(masked.argmax())

    def _word(self, token: int) -> str:
        return self.tokenizer.convert_ids_to_tokens(token)

    def _unit(self, forced: Sequence[str] | None = None) -> str:
        """Write one reasoning unit up to and including ';' (the ';' is fed only after the next input arrives)."""
        logits = self._feed(self.pending) if self.pending is not None else self._feed(self.tokenizer.sep_token_id)
        words: list[str] = []
        while True:
            token = self._choose(logits, self._unit_ban, forced[len(words)] if forced else None)
            words.append(self._word(token))
            self.events[-1].predicts = words[-1]
            if token == self.unit_end:
                break
            if len(words) >= self.max_unit_tokens:  # a unit that never closes: close it and say so
                self.truncated = True
                words.append(UNIT_END)
                token = self.unit_end
                break
            logits = self._feed(token)
        self.pending = token
        unit = " ".join(words)
        self.units.append(unit)
        return unit

    def _forced_unit(self, index: int) -> list[str] | None:
        if self.forced is None:
            return None
        return self.forced.question_unit if index == 0 else self.forced.units[index - 1]

    # ------------------------------------------------------------------ public API
    def read_question(self, question: str | Sequence[str]) -> list[str]:
        """Read the question (first input segment); streaming mode answers with the question unit."""
        if self.started:
            raise BriskError("the question was already read: start a new ThinkerSession for a new question")
        words = question.split() if isinstance(question, str) else list(question)
        if not words:
            raise BriskError("the question is empty: pass e.g. 'Q: C from A ?'")
        self.started = True
        self._read([self.tokenizer.bos_token_id, *word_ids(self.tokenizer, words)])
        return [self._unit(self._forced_unit(0))] if self.mode == "streaming" else []

    def read_fact(self, fact: str | Sequence[str]) -> list[str]:
        """Read one fact sentence; streaming mode writes its reasoning unit at once and returns it."""
        if not self.started:
            raise BriskError("read the question first: call read_question before read_fact")
        if self.input_ended:
            raise BriskError("the session is finished: start a new ThinkerSession to read more facts")
        words = fact.split() if isinstance(fact, str) else list(fact)
        if not words:
            raise BriskError("the fact is empty: pass a sentence such as 'B = A + 4 .'")
        self._read(word_ids(self.tokenizer, words))
        self.facts_read += 1
        return [self._unit(self._forced_unit(self.facts_read))] if self.mode == "streaming" else []

    def end_input(self) -> None:
        """Input ended: read the end marker (batch mode now writes every unit). `finish` calls it when needed."""
        if not self.started:
            raise BriskError("nothing was read: call read_question (and read_fact) before finish")
        if self.input_ended:
            raise BriskError("the input already ended: end_input and finish may be called once")
        self.input_ended = True
        self._read([self.tokenizer.eos_token_id])
        if self.mode == "batch":  # the baseline thinks only now: question unit, then one unit per fact
            for index in range(self.facts_read + 1):
                self._unit(self._forced_unit(index))

    def fork(self, depth: str | None = None) -> "ThinkerSession":
        """A copy that shares the model but owns its caches and state (e.g. one final segment per depth)."""
        import copy

        shared = {"model": self.model, "tokenizer": self.tokenizer}
        clone = copy.deepcopy(self, memo={id(v): v for v in shared.values()})
        if depth is not None:
            clone.depth, clone.depth_id = check_depth(depth), self.tokenizer.get_vocab()[depth]
        return clone

    def finish(self) -> tuple[str, str]:
        """Input ended: read the end marker, write the final segment at the session's depth; (final text, answer)."""
        if self.finished:
            raise BriskError("finish was already called on this session")
        if not self.input_ended:
            self.end_input()
        self._feed(self.pending)
        logits = self._feed(self.depth_id)
        forced = self.forced.final[1:] if self.forced is not None else None
        words: list[str] = [self.depth]
        while len(words) < self.max_final_tokens:
            if forced is not None:
                step = len(words) - 1
                token = word_ids(self.tokenizer, [forced[step]])[0] if step < len(forced) else self.tokenizer.eos_token_id
            else:
                token = self._choose(logits, self._final_ban, None)
            self.events[-1].predicts = self._word(token)
            self.events[-1].answer = words[-1] == ANSWER
            if token == self.tokenizer.eos_token_id:
                break
            words.append(self._word(token))
            logits = self._feed(token)
        else:
            self.truncated = True
        self.finished = True
        self.final = " ".join(words)
        return self.final, parse_answer(words)

    def result(self) -> ThinkerResult:
        """Units, final segment, answer and events of a finished session."""
        if not self.finished:
            raise BriskError("call finish() before result()")
        return ThinkerResult(self.units, self.final, parse_answer(self.final.split()), self.events,
                             self.input_tokens_forwarded, self.reasoning_tokens_forwarded, self.truncated)


def parse_answer(words: Sequence[str]) -> str:
    """The word after the last 'answer' marker ('' when the model never wrote one)."""
    words = list(words)
    for i in range(len(words) - 2, -1, -1):
        if words[i] == ANSWER:
            return words[i + 1]
    return ""


def think(model, tokenizer, example: Example, depth: str = "D2", mode: str = "streaming", **kwargs) -> ThinkerResult:
    """Run one example through a session: question, every fact in order, finish."""
    return think_depths(model, tokenizer, example, (depth,), mode, **kwargs)[depth]


def think_depths(model, tokenizer, example: Example, depths: Sequence[str] = DEPTHS, mode: str = "streaming",
                 **kwargs) -> dict[str, ThinkerResult]:
    """One example at several depths: the units are written once (they do not depend on depth), then forked."""
    session = ThinkerSession(model, tokenizer, depths[0], mode=mode, **kwargs)
    session.read_question(example.meta["question"])
    for fact in example.meta["facts"]:
        session.read_fact(fact)
    session.end_input()
    results = {}
    for depth in depths:
        branch = session.fork(depth) if len(depths) > 1 else session
        branch.finish()
        results[depth] = branch.result()
    return results
