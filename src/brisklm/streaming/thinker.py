"""StreamingThinker: reason while reading. One short unit per incoming fact, then a final segment at depth D1/D2/D3.

Data (on the streaming-arithmetic task, question first and naming the chain's start, so relevance is decidable
the moment a fact arrives):

    source segments  s_0 = <bos> Q: C from A ?   s_1..s_N = facts 'B = A + 4 .'   s_N+1 = <eos> (input ended)
    target segments  u_0 = <sep> find C ;        u_j = 'B = 7 ;' or 'skip ;'      u_N+1 = depth token + deep part + <eos>

Depth: D1 = 'D1 answer 4'; D2 = 'D2 combine A = 3 B = 7 C = 4 ; answer 4' (integration of the kept units);
D3 = D2 + 'check C = 7 * 2 = 4 ;' (re-derive the target from its fact) before the answer. The depth token is
fed, never predicted, so one model serves all three depths.

Training uses GPE's layout at the sentence level with k = 1 (streaming/gpe.py): target segment j sees source
segments 0..j, the final segment sees everything, with the one-row shift, and group positions (source 0..,
target 0..). The batch-CoT baseline trains on the same units with a plain causal mask and contiguous positions.
Inference (`ThinkerSession`) keeps an input cache and a reasoning cache: facts are encoded once into the input
cache and never re-encoded; the reasoning for fact j starts as soon as fact j is read.
"""

from __future__ import annotations

import random
import time
from dataclasses import dataclass, field
from typing import Literal, Sequence

import torch

from brisklm.core import KVCache, MatrixVisibility, Plan, execute
from brisklm.core.adapter import ModelAdapter
from brisklm.core.text import word_ids
from brisklm.errors import BriskError
from brisklm.streaming.engine import SOURCE, TARGET, GroupVisibility
from brisklm.streaming.gpe import IGNORE, StreamLayout, collate, word_segments
from brisklm.tasks.base import Example
from brisklm.tasks.streaming_arithmetic import ANSWER, SKIP, UNIT_END, StreamingArithmeticTask
from brisklm.tasks.tokenizer import build_word_tokenizer

Depth = Literal["D1", "D2", "D3"]
Mode = Literal["streaming", "batch"]
DEPTHS: tuple[str, ...] = ("D1", "D2", "D3")
MODES: tuple[str, ...] = ("streaming", "batch")
FIND, COMBINE, CHECK = "find", "combine", "check"
THINKER_WORDS: tuple[str, ...] = (FIND, COMBINE, CHECK, *DEPTHS)


def check_depth(depth: str) -> str:
    """Validate a reasoning depth name."""
    if depth not in DEPTHS:
        raise BriskError(f"unknown depth {depth!r}: choose one of {', '.join(DEPTHS)}")
    return depth


def check_mode(mode: str) -> str:
    """Validate a thinking mode ('streaming' = think while reading, 'batch' = read everything, then think)."""
    if mode not in MODES:
        raise BriskError(f"unknown thinking mode {mode!r}: choose one of {', '.join(MODES)}")
    return mode


def thinker_task(modulus: int = 10, max_steps: int = 3, max_distractors: int = 2, **options) -> StreamingArithmeticTask:
    """The streaming-arithmetic task as the thinker uses it: the question names the chain's first variable.

    Defaults (mod 10, chains of 2-3 facts, 1-2 distractors) are what a tiny model can learn on a CPU budget.
    """
    return StreamingArithmeticTask(modulus=modulus, max_steps=max_steps, max_distractors=max_distractors,
                                   name_start=True, **options)


def thinker_tokenizer(task: StreamingArithmeticTask):
    """Word tokenizer of the task's words plus the thinker's reasoning words (find, combine, check, D1..D3)."""
    return build_word_tokenizer([*task.vocabulary(), *THINKER_WORDS])


# ------------------------------------------------------------------------------------------ streaming CoT data
@dataclass
class ThinkerTrace:
    """One streaming chain of thought: question, facts, the question unit, one unit per fact, the final segment."""

    question: list[str]
    facts: list[list[str]]
    question_unit: list[str]
    units: list[list[str]]
    final: list[str]
    answer: str
    depth: str

    @property
    def streaming_text(self) -> str:
        return " ".join(w for u in [self.question_unit, *self.units] for w in u)


def _deep_segment(meta: dict, depth: str) -> list[str]:
    """Words of the final segment after reading ends (depth token first, answer last)."""
    answer, target = meta["answer"], meta["target"]
    body: list[str] = [depth]
    if depth in ("D2", "D3"):
        kept = [u.split() for u in meta["units"] if u != SKIP]
        body += [COMBINE, *[w for u in kept for w in u], UNIT_END]
    if depth == "D3":
        fact = next(f.split() for f in meta["facts"] if f.split()[0] == target)
        rhs = [str(meta["values"][w]) if w in meta["values"] else w for w in fact[2:-1]]
        body += [CHECK, target, "=", *rhs, "=", answer, UNIT_END]
    return body + [ANSWER, answer]


def _unit_words(fact: list[str], values: dict[str, int], is_distractor: bool) -> list[str]:
    """A fact's reasoning unit: 'skip ;', 'A = 3 ;', or 'B = 3 + 4 = 7 ;' (substitute, then one operation)."""
    if is_distractor:
        return [SKIP, UNIT_END]
    name, rhs = fact[0], fact[2:-1]
    if len(rhs) == 1:
        return [name, "=", str(values[name]), UNIT_END]
    return [name, "=", str(values[rhs[0]]) if rhs[0] in values else rhs[0], *rhs[1:], "=", str(values[name]), UNIT_END]


def streaming_cot(example: Example, depth: str = "D2") -> ThinkerTrace:
    """The streaming CoT of a streaming-arithmetic example: a unit per fact ('skip' for distractors), then depth.

    A kept unit restates its fact with the earlier value substituted, then does the one operation, so each
    unit needs one look-up and one single-digit operation (what a tiny model can learn in two minutes).
    """
    check_depth(depth)
    meta = example.meta
    if "facts" not in meta or "units" not in meta:
        raise BriskError("streaming_cot needs a streaming_arithmetic example (meta with facts and units)")
    question = meta["question"].split()
    if len(question) < 4 or question[2] != "from":
        raise BriskError("the thinker needs questions that name the chain's start ('Q: C from A ?'): "
                         "build the task with name_start=True (thinker_task())")
    trace = ThinkerTrace(
        question=question,
        facts=[f.split() for f in meta["facts"]],
        question_unit=[FIND, meta["target"], UNIT_END],
        units=[_unit_words(fact.split(), meta["values"], is_distractor)
               for fact, is_distractor in zip(meta["facts"], meta["distractors"])],
        final=_deep_segment(meta, depth),
        answer=meta["answer"],
        depth=depth,
    )
    check_trace(trace)
    return trace


def check_trace(trace: ThinkerTrace) -> None:
    """Quality control: one unit per fact, kept units name their fact's variable and use only kept variables."""
    if len(trace.units) != len(trace.facts):
        raise BriskError(f"{len(trace.units)} units for {len(trace.facts)} facts: write one unit per fact")
    kept: set[str] = set()
    for fact, unit in zip(trace.facts, trace.units):
        if unit[0] == SKIP:
            continue
        rhs_vars = [w for w in fact[2:-1] if w.isalpha() and w.isupper()]
        if unit[0] != fact[0] or any(v not in kept for v in rhs_vars):
            raise BriskError(f"unit {' '.join(unit)} does not follow from fact {' '.join(fact)} and the kept units")
        kept.add(fact[0])
    if trace.final[-2:] != [ANSWER, trace.answer]:
        raise BriskError("the final segment does not end with 'answer <value>'")


def thinker_layout(tokenizer, trace: ThinkerTrace) -> StreamLayout:
    """GPE segments of a trace: source = question, facts, end marker; target = question unit, units, final."""
    source = [[tokenizer.bos_token_id, *word_ids(tokenizer, trace.question)],
              *word_segments_of(tokenizer, trace.facts), [tokenizer.eos_token_id]]
    target = [[tokenizer.sep_token_id, *word_ids(tokenizer, trace.question_unit)],
              *word_segments_of(tokenizer, trace.units), [*word_ids(tokenizer, trace.final), tokenizer.eos_token_id]]
    return StreamLayout(source, target)


def word_segments_of(tokenizer, segments: Sequence[Sequence[str]]) -> list[list[int]]:
    """One id list per multi-word segment (each word tokenized on its own, as gpe.word_segments does)."""
    return [[t for ids in word_segments(tokenizer, list(seg)) for t in ids] for seg in segments]


def thinker_labels(layout: StreamLayout) -> list[int]:
    """Labels over input_ids: every target token except the header <sep> and the fed depth token."""
    s_len = len(layout.source_ids)
    final_start = s_len + sum(len(seg) for seg in layout.target[:-1])
    labels = [IGNORE] * (s_len + 1) + layout.input_ids[s_len + 1:]
    labels[final_start] = IGNORE  # the depth token is chosen by the user, not predicted
    return labels


def thinker_batch(layouts: Sequence[StreamLayout], pad_id: int, mode: str = "streaming") -> dict[str, torch.Tensor]:
    """Padded training batch: streaming = sentence-level k=1 mask + group positions; batch = causal + contiguous."""
    check_mode(mode)
    batch = collate(layouts, [1] * len(layouts), pad_id, mode="group" if mode == "streaming" else "contiguous")
    for b, layout in enumerate(layouts):
        n = len(layout.input_ids)
        batch["labels"][b, :n] = torch.tensor(thinker_labels(layout))
        if mode == "batch":
            batch["visibility"][b, :n, :n] = torch.ones(n, n).tril().bool()
    return batch


class ThinkerCollator:
    """Trainer collator: examples' meta -> traces at a depth drawn per example -> a thinker batch."""

    def __init__(self, tokenizer, mode: str = "streaming", depths: Sequence[str] = DEPTHS, seed: int = 0) -> None:
        self.tokenizer, self.mode, self.depths = tokenizer, check_mode(mode), [check_depth(d) for d in depths]
        self.rng = random.Random(seed)

    def __call__(self, features: Sequence[dict]) -> dict[str, torch.Tensor]:
        traces = [streaming_cot(Example("", "", f["answer"], f), self.rng.choice(self.depths)) for f in features]
        return thinker_batch([thinker_layout(self.tokenizer, t) for t in traces], self.tokenizer.pad_token_id, self.mode)


def train_thinker(model, tokenizer, examples: Sequence[Example], options, output_dir: str, mode: str = "streaming",
                  depths: Sequence[str] = DEPTHS) -> dict[str, float]:
    """Fit `model` on streaming CoT with transformers.Trainer (GPE's StreamingTrainer loss); returns loss, seconds."""
    from brisklm.streaming.train import StreamingTrainer
    from brisklm.zoo.textlm import training_arguments

    trainer = StreamingTrainer(
        model=model,
        args=training_arguments(options, output_dir),
        train_dataset=[dict(e.meta) for e in examples],
        data_collator=ThinkerCollator(tokenizer, mode, depths, options.seed),
    )
    result = trainer.train()
    model.eval()
    return {"train_loss": float(result.training_loss), "train_seconds": float(result.metrics.get("train_runtime", 0.0))}


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
