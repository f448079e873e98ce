"""ProactiveLLM on any tokenizer: random-mask + SPSD training on a user's corpus, self-labelled probe rows, and
head decoding where a source word or a target word may be several subword tokens.

Decision granularity (our choice): a head decides READ or WRITE only at a row whose greedy token would *start*
a target word (or end the target); a token that continues the open word is always written, with no head call
and no read. A word's delay (source words read when its first token was written) is the read count the head
approved, and entropy is measured once per word, at its first token, where the choice of the next word is
made (the later tokens of a word are mostly determined by its first one and would read as spuriously certain).

This matches the training mask (GPE's one-row shift on token rows): the rows that predict a word's continuation
tokens see what its first token saw, and the row that predicts the first token of word j sees the schedule's
g(j). One corner differs: when a READ at a word start is followed by a token that continues the open word (the
new source changed the model's mind), the rest of that word sees the new source; its delay stays that of its
first token. The header's rows see one source word (the decoder's first write comes after min_lag = 1 read).
Tests check: on a word-level model the decoder equals `heads.adaptive_decode` word for word; on subword
fixtures the incremental logits equal one full masked pass of the visibility the decoder used.
"""

from __future__ import annotations

import copy
import math
import random
from dataclasses import dataclass, field
from typing import Callable, Iterable, Iterator, Sequence

import torch

from brisklm.core import MatrixVisibility, Plan, execute
from brisklm.core.device import model_device, to_device
from brisklm.core.text import TextLayer
from brisklm.errors import BriskError
from brisklm.streaming.engine import StreamingSession, StreamOutput
from brisklm.streaming.gpe import StreamLayout, build_layout, stream_frame
from brisklm.streaming.policies import MAX_TOKENS_PER_WORD, target_limit
from brisklm.streaming.proactive.heads import Head, SufficiencyData, entropy_of, newest_mass
from brisklm.streaming.proactive.train import ProactiveTrainer, ScheduleOptions, collate_views, sample_schedule
from brisklm.streaming.train import stream_features
from brisklm.tasks.base import Example
from brisklm.zoo.textlm import TrainOptions, training_arguments

HEADER_SEES = 1  # source words the header's rows see: the decoder writes first after min_lag = 1 read


# ------------------------------------------------------------------------------------------------ training
class TextProactiveCollator:
    """Random monotone schedules over text-layer layouts (any tokenizer, chat frame and instruction)."""

    def __init__(self, text: TextLayer, schedule: ScheduleOptions = ScheduleOptions(), phi: int = 0, seed: int = 0,
                 instruction: str | None = None) -> None:
        self.text, self.schedule, self.phi, self.instruction = text, schedule, phi, instruction
        self.pad = stream_frame(text, instruction).pad
        self.rng = random.Random(seed)

    def layouts(self, features: Sequence[dict]) -> list[StreamLayout]:
        return [build_layout(self.text, f["source_words"], f["target_words"], instruction=self.instruction)
                for f in features]

    def schedules(self, layouts: Sequence[StreamLayout]) -> list[list[int]]:
        out = []
        for x in layouts:
            sees = sample_schedule(self.rng, x.num_source_words, len(x.target) - 2, self.schedule)
            out.append([min(sees[0], HEADER_SEES)] + sees[1:])
        return out

    def __call__(self, features: Sequence[dict]) -> dict[str, torch.Tensor]:
        layouts = self.layouts(features)
        return collate_views(layouts, self.schedules(layouts), self.pad, self.phi)


def train_proactive_text(model, text: TextLayer, examples: Sequence[Example], options: TrainOptions, output_dir: str,
                         spsd_lambda: float = 0.0, spsd_tau: float = 1.0,
                         schedule: ScheduleOptions = ScheduleOptions(), phi: int = 0,
                         instruction: str | None = None) -> dict[str, float]:
    """Random monotone masks (+ SPSD when spsd_lambda > 0) on any tokenizer; returns loss and seconds."""
    if spsd_lambda < 0:
        raise BriskError(f"--spsd must be >= 0 (the KL weight lambda), got {spsd_lambda}")
    trainer = ProactiveTrainer(
        model=model, args=training_arguments(options, output_dir), train_dataset=stream_features(examples),
        data_collator=TextProactiveCollator(text, schedule, phi, options.seed, instruction),
        spsd_lambda=spsd_lambda, spsd_tau=spsd_tau)
    result = trainer.train()
    model.eval()
    return {"train_loss": float(result.training_loss), "train_seconds": float(result.metrics.get("train_runtime", 0.0))}


@torch.no_grad()
def sufficiency_data_text(model, text: TextLayer, examples: Sequence[Example], schedule: ScheduleOptions | None = None,
                          *, seed: int = 0, batch_size: int = 32, instruction: str | None = None) -> SufficiencyData:
    """Self-labelled rows for the probe from a corpus, on any tokenizer: one row per target word's first token
    predicted with the source still open; label 1 = the partial view's argmax equals the full view's."""
    schedule = schedule or ScheduleOptions(k_min=1, k_max=4, p_extra=0.3, p_full=0.0)
    collator = TextProactiveCollator(text, schedule, seed=seed, instruction=instruction)
    ends = sorted(stream_frame(text, instruction).ends)
    parts: dict[str, list[torch.Tensor]] = {k: [] for k in ("hidden", "entropy", "attention", "label", "lag")}
    features = stream_features(examples)
    for start in range(0, len(features), batch_size):
        layouts = collator.layouts(features[start:start + batch_size])
        batch = to_device(collate_views(layouts, collator.schedules(layouts), collator.pad), model_device(model))
        plan = Plan(position_ids=batch["position_ids"], visibility=MatrixVisibility(batch["visibility"]))
        student = execute(model, batch["input_ids"], plan=plan, attention_mask=batch["attention_mask"],
                          record_attention=True)
        plan_t = Plan(position_ids=batch["position_ids"], visibility=MatrixVisibility(batch["teacher_visibility"]))
        teacher = execute(model, batch["input_ids"], plan=plan_t, attention_mask=batch["attention_mask"]).logits
        width = batch["input_ids"].shape[1]
        key_segment = torch.full((len(layouts), width), -1, dtype=torch.long)
        is_source = torch.zeros(len(layouts), width, dtype=torch.bool)
        word_of_row = torch.zeros(len(layouts), width, dtype=torch.long)  # j: the row predicts word j's first token
        n_words = torch.zeros(len(layouts), 1, dtype=torch.long)
        for b, x in enumerate(layouts):
            segs = x.source_segment_of_tokens()
            key_segment[b, :len(segs)] = torch.tensor(segs)
            is_source[b, :len(segs)] = True
            n_words[b] = x.num_source_words
            row = len(x.source_ids) - 1
            for j, seg in enumerate(x.target[:-1]):
                row += len(seg)  # the last row of segment j predicts the first token of segment j+1
                if 1 <= j + 1 <= len(x.target) - 2:
                    word_of_row[b, row] = j + 1
        key_segment, is_source, word_of_row, n_words = to_device((key_segment, is_source, word_of_row, n_words),
                                                                 batch["input_ids"].device)
        sees = batch["row_sees"]
        keep = (word_of_row >= 1) & (sees >= 1) & (sees <= n_words)
        logits = student.logits.float()
        masked = logits.clone()
        closed_end = (sees < n_words)[..., None] & torch.isin(torch.arange(logits.shape[-1], device=logits.device),
                                                              torch.tensor(ends, device=logits.device))
        masked[closed_end.expand_as(masked)] = float("-inf")  # as the decoder does: no end while words remain
        mass = newest_mass([r.probs for r in student.attentions], sees, key_segment, is_source)
        parts["hidden"].append(student.last_hidden[keep].float())
        parts["entropy"].append(entropy_of(masked)[keep])
        parts["attention"].append(mass[keep])
        parts["label"].append((masked.argmax(-1) == teacher.float().argmax(-1))[keep].float())
        parts["lag"].append((sees - (word_of_row - 1))[keep].float())
    return SufficiencyData(**{k: torch.cat(v).cpu() for k, v in parts.items()})


# ------------------------------------------------------------------------------------------------ decoding
class _Source:
    """A stream's source words with one word of lookahead (to know whether the source has ended)."""

    def __init__(self, words: Iterable[str]) -> None:
        self.total = len(words) if isinstance(words, Sequence) and not isinstance(words, str) else None
        self.words: Iterator[str] = iter(words)
        self.ahead: list[str] = []

    def more(self) -> bool:
        if not self.ahead:
            word = next(self.words, None)
            if word is not None:
                self.ahead.append(word)
        return bool(self.ahead)

    def pop(self) -> str:
        self.more()
        return self.ahead.pop(0)


@dataclass
class HeadDecodeResult:
    """Outputs, action traces ('R' read, 'W' a word started), cost, and for each word the source segments its
    first token saw, and per accepted write the segments its row saw (what a full masked pass needs)."""

    outputs: list[StreamOutput]
    forward_tokens: int
    actions: list[str]
    segments_seen: list[list[int]] = field(default_factory=list)
    written: list[list[int]] = field(default_factory=list)
    row_segments_seen: list[list[int]] = field(default_factory=list)  # per accepted write: source segments its row saw

    @property
    def hypotheses(self) -> list[str]:
        return [o.text for o in self.outputs]


def starts_word(session: StreamingSession, stream: int, token: int) -> bool:
    """Would writing `token` start a new target word (or end the target)? Asks a copy of the stream's WordDecoder."""
    words = session.target_words[stream]
    if session.text.word_level or not words.open:
        return True
    probe = copy.copy(words.decoder)
    probe.pending = list(words.decoder.pending)
    return bool(probe.feed(token))


def head_decode(model, text: TextLayer, sources: Sequence[Iterable[str]], head: Head, threshold: float, *,
                min_lag: int = 1, phi: int = 0, max_words: int = 256, instruction: str | None = None,
                keep_logits: bool = False,
                on_write: Callable[[int, str, int], None] = lambda stream, word, delay: None) -> HeadDecodeResult:
    """Simultaneous decoding of a batch of streams on any tokenizer; `head` decides at word starts only.

    Rules as `heads.adaptive_decode`: word j is never started before min(j + min_lag - 1, n) words are read, the
    end is masked while source words remain, a predicted end once every word is read means "read the end
    marker", and after the source is closed the model always writes. A READ retracts the row and re-feeds it.
    """
    if min_lag < 1:
        raise BriskError(f"min_lag must be >= 1 (read a word before the first write), got {min_lag}")
    if math.isnan(threshold):
        raise BriskError("the threshold is NaN: pass a number")
    if not sources:
        raise BriskError("no source streams given: pass at least one source sentence")
    streams = [_Source(s) for s in sources]
    for i, s in enumerate(streams):
        if not s.more():
            raise BriskError("the source stream is empty: type at least one word on stdin (or pass --text)"
                             if len(streams) == 1 else f"source stream {i} is empty: pass at least one word per stream")
    batch = len(streams)
    session = StreamingSession(model, text, batch, phi=phi, record_attention=head.needs_attention,
                               instruction=instruction)
    traces: list[list[str]] = [[] for _ in streams]
    seen: list[list[int]] = [[] for _ in streams]
    row_seen: list[list[int]] = [[] for _ in streams]
    if keep_logits:
        for out in session.outputs:
            out.logits = []  # type: ignore[assignment]

    def read(words: list[list[str]]) -> None:
        if any(words):
            session.read(words)
            for b, w in enumerate(words):
                traces[b] += ["R"] * len(w)

    read([[s.pop() for _ in range(min_lag) if s.more()] for s in streams])

    def gate(s: StreamingSession, logits: torch.Tensor) -> list[bool]:
        decision = head.writes(head.signal(s, logits), threshold)
        allow = []
        for b in range(batch):
            token = int(logits[b].argmax())
            if s.closed[b] or not starts_word(s, b, token):
                allow.append(True)  # after the source ends, or inside a word: always write
            elif streams[b].more() and s.words_read(b) < s.words_started(b) + min_lag:
                allow.append(False)  # the floor: the next word needs more source first
            else:
                allow.append(bool(decision[b]))
        return allow

    while not all(session.done):
        started = [session.words_started(b) for b in range(batch)]
        segments = list(session.src_segments)
        tokens, done = [len(w) for w in session.written], list(session.done)
        session.write(gate=gate, forbid_early_end=[s.more() for s in streams])
        wanted: list[list[str]] = [[] for _ in streams]
        close = []
        for b, src in enumerate(streams):
            for word, delay in session.new_words[b]:
                on_write(b, word, delay)
            if session.words_started(b) > started[b]:
                traces[b].append("W")
                seen[b].append(segments[b])
            if len(session.written[b]) > tokens[b] or (session.done[b] and not done[b]):  # an accepted write
                row_seen[b].append(segments[b])
                if keep_logits:
                    session.outputs[b].logits.append(session.last_logits[b].clone())
            if session.done[b]:
                continue
            if session.wants_read[b]:
                if src.more():
                    wanted[b].append(src.pop())
                elif not session.closed[b]:
                    close.append(b)
            n = src.total if src.total is not None else session.words_read(b)
            if session.words_started(b) >= min(max_words, target_limit(n)) or \
                    len(session.written[b]) >= MAX_TOKENS_PER_WORD * target_limit(n):
                before = len(session.outputs[b].words)
                session.stop(b)
                for word, delay in zip(session.outputs[b].words[before:], session.outputs[b].delays[before:]):
                    on_write(b, word, delay)
        read(wanted)
        if close:
            session.close(close)
            for b in close:
                traces[b].append("R")
    for b, src in enumerate(streams):
        session.outputs[b].source_words = session.words_read(b)
    return HeadDecodeResult(session.outputs, session.forward_tokens, ["".join(t) for t in traces], seen,
                            [list(w) for w in session.written], row_seen)
