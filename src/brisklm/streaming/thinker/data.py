"""StreamingThinker data: traces (a unit per fact, then a final segment at depth D1/D2/D3), layouts and batches.

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
Inference (`ThinkerSession`, thinker/session.py) keeps an input cache and a reasoning cache: facts are encoded once into the input
cache and never re-encoded; the reasoning for fact j starts as soon as fact j is read.
"""

from __future__ import annotations

import random
from dataclasses import dataclass
from typing import Literal, Sequence

import torch

from brisklm.core.text import word_ids
from brisklm.errors import BriskError
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
