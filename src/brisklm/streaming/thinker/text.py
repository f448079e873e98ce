"""StreamingThinker on any checkpoint and on your data: JSONL examples, text layouts, training batches and a
batched session with an input cache and a reasoning cache.

Data (one JSON object a line):

    {"question": "...", "context": ["sentence 1", "sentence 2", ...], "answer": "...",
     "units": ["reasoning after sentence 1", ...],   # optional for `brisk think`, required to train
     "final": "reasoning once the input has ended"}   # optional

Layout (through the text layer and the GPE stream frame, with the question as the frame's instruction):

    source  s_0 = chat user-turn opening (or [bos]) + question   s_1..s_N = the sentences   s_N+1 = turn closing / eos
    target  u_0 = assistant header (or the plain separator)   u_j = unit_j + UNIT_END   u_N+1 = final + answer + end

`final + answer` is the text `"{final}\\nAnswer: {answer}"` (just `"Answer: {answer}"` without a final).
UNIT_END is "\\n", or ";" for a tokenizer that cannot encode a newline (SentencePiece without byte fallback);
training saves the choice in `thinker.json` beside the checkpoint and `brisk think` reads it back.

Mask: GPE's layout at the sentence level with k = 1 and the one-row shift (unit j sees sentences 1..j, the row
that predicts unit j+1 sees sentence j+1, the final segment sees everything) and group positions. The session
feeds every row with exactly that visibility, so it equals one full masked pass per example (tests: < 1e-4),
batched or not.

Units absent: `brisk think` needs none (the model writes them); training refuses such an example with a
one-line error that names the line and the fix: write them, or let a teacher checkpoint write them with
`brisk think make-units --teacher T` (thinker/units.py: kept only when the teacher's answer is correct).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import torch

from brisklm.core import KVCache, MatrixVisibility, Plan, execute
from brisklm.core.adapter import ModelAdapter
from brisklm.core.text import TextLayer
from brisklm.errors import BriskError
from brisklm.streaming.engine import SOURCE, TARGET, GroupVisibility
from brisklm.streaming.gpe import StreamFrame, StreamLayout, collate, stream_frame

ANSWER_PREFIX = "Answer:"
UNIT_END_CHOICES = ("\n", ";")
SETTINGS_FILE = "thinker.json"


# ------------------------------------------------------------------------------------------ data
@dataclass
class ThinkerExample:
    """One user example: question, context sentences (arriving one by one), answer, optional units and final."""

    question: str
    context: list[str]
    answer: str
    units: list[str] | None = None
    final: str | None = None
    where: str = "example"  # e.g. "data.jsonl line 3", for error messages


def _string(item: dict, key: str, where: str) -> str:
    value = item[key]
    if not isinstance(value, str) or not value.strip():
        raise BriskError(f"{where}: field {key!r} must be a non-empty string")
    return value.strip()


def _sentences(item: dict, key: str, where: str) -> list[str]:
    value = item[key]
    if not isinstance(value, list) or not all(isinstance(s, str) and s.strip() for s in value):
        raise BriskError(f"{where}: field {key!r} must be a list of non-empty strings (one per context sentence)")
    return [s.strip() for s in value]


def thinker_example(item: object, where: str) -> ThinkerExample:
    """Validate one parsed JSON object (one-line BriskErrors that name `where`)."""
    if not isinstance(item, dict) or "question" not in item or "answer" not in item:
        raise BriskError(f"{where}: needs an object with fields 'question', 'context' (a list of sentences) and "
                         "'answer'")
    question, answer = _string(item, "question", where), _string(item, "answer", where)
    if "context" not in item or item["context"] in ([], None, ""):
        raise BriskError(f"{where}: the example has no context: add 'context', a non-empty list of the sentences "
                         "that arrive one by one")
    context = _sentences(item, "context", where)
    units = None
    if item.get("units") is not None:
        units = _sentences(item, "units", where)
        if len(units) != len(context):
            raise BriskError(f"{where}: {len(units)} units for {len(context)} context sentences: write one unit per "
                             "sentence")
    final = _string(item, "final", where) if item.get("final") is not None else None
    return ThinkerExample(question, context, answer, units, final, where)


def read_thinker_data(path: str | Path) -> list[ThinkerExample]:
    """Examples of a JSONL file (blank lines skipped); a bad line is a one-line error with its line number."""
    path = Path(path).expanduser()
    if not path.is_file():
        raise BriskError(f"--data {path} does not exist; pass a .jsonl file of question/context/answer examples")
    examples = []
    with path.open(encoding="utf-8") as handle:
        for number, line in enumerate(handle, start=1):
            if not line.strip():
                continue
            where = f"{path.name} line {number}"
            try:
                item = json.loads(line)
            except json.JSONDecodeError as error:
                raise BriskError(f"{where}: not valid JSON ({error.msg})") from None
            examples.append(thinker_example(item, where))
    if not examples:
        raise BriskError(f"--data {path} has no examples")
    return examples


def require_units(examples: Sequence[ThinkerExample]) -> None:
    """Training needs a reasoning unit per sentence: refuse the first example without them, naming the fix."""
    for e in examples:
        if e.units is None:
            raise BriskError(f"{e.where}: no 'units': training needs one reasoning unit per context sentence; add "
                             "'units', or generate them with `brisk think make-units --teacher T --data ...`")


def final_text(example: ThinkerExample) -> str:
    """What the final segment says: the final reasoning (if any), then 'Answer: <answer>'."""
    tail = f"{ANSWER_PREFIX} {example.answer}"
    return f"{example.final}\n{tail}" if example.final else tail


def parse_answer(final: str) -> str:
    """The text after the last 'Answer:' (first line of it), '' when the model wrote none."""
    at = final.rfind(ANSWER_PREFIX)
    return final[at + len(ANSWER_PREFIX):].strip().split("\n")[0].strip() if at >= 0 else ""


# ------------------------------------------------------------------------------------------ layout
def _encodes(text: TextLayer, piece: str) -> list[int] | None:
    ids = text.encode(piece) if not text.word_level else None
    if not ids or (text.roles.unk_id is not None and text.roles.unk_id in ids):
        return None
    return ids


def unit_end(text: TextLayer, choice: str | None = None) -> tuple[str, list[int]]:
    """The unit end marker and its ids: `choice` (from thinker.json) or the first of UNIT_END_CHOICES it encodes."""
    for piece in ([choice] if choice is not None else UNIT_END_CHOICES):
        ids = _encodes(text, piece)
        if ids:
            return piece, ids
    raise BriskError(f"the tokenizer cannot encode a unit end marker ({', '.join(map(repr, UNIT_END_CHOICES))}): "
                     "StreamingThinker on your data needs a subword tokenizer that encodes a newline or ';'")


def _ids(text: TextLayer, piece: str, what: str, at_start: bool = True) -> list[int]:
    ids = text.encode(piece, at_start=at_start)
    if not ids:
        raise BriskError(f"{what} {piece!r} encodes to no tokens")
    unk = text.roles.unk_id
    if unk is not None and unk in ids:
        raise BriskError(f"the tokenizer cannot encode {what} {piece!r} (part becomes its unknown token): "
                         "remove or transliterate those characters")
    return ids


def thinker_frame(text: TextLayer, question: str) -> StreamFrame:
    """The stream frame with the question opening the source group (inside the chat user turn when templating)."""
    if not question.strip():
        raise BriskError("the question is empty: the first line (or 'question') must hold the question")
    return stream_frame(text, question)


def text_thinker_layout(text: TextLayer, example: ThinkerExample, marker: Sequence[int]) -> StreamLayout:
    """Segments of one example with units (see the module docstring); next_segment_rows off: the one-row shift."""
    if example.units is None:
        require_units([example])
    frame = thinker_frame(text, example.question)
    source = [list(frame.prompt), *[_ids(text, s, "the context sentence", at_start=False) for s in example.context],
              list(frame.source_end)]
    target = [list(frame.header), *[_ids(text, u, "the unit") + list(marker) for u in example.units],
              _ids(text, final_text(example), "the final segment") + [frame.target_end]]
    return StreamLayout(source, target)


def text_thinker_batch(layouts: Sequence[StreamLayout], pad_id: int) -> dict[str, torch.Tensor]:
    """Sentence-level k = 1 streaming mask with the one-row shift and group positions (labels: after the header)."""
    return collate(layouts, [1] * len(layouts), pad_id, mode="group")


class TextThinkerCollator:
    """Trainer collator: validated examples -> text layouts -> a streaming batch."""

    def __init__(self, text: TextLayer, marker: Sequence[int]) -> None:
        self.text, self.marker, self.pad = text, list(marker), text.roles.pad_id

    def __call__(self, features: Sequence[dict]) -> dict[str, torch.Tensor]:
        return text_thinker_batch([text_thinker_layout(self.text, f["example"], self.marker) for f in features],
                                  self.pad)


def train_thinker_text(model, text: TextLayer, examples: Sequence[ThinkerExample], options, output_dir: str,
                       marker: Sequence[int]) -> dict[str, float]:
    """Fit `model` on your streaming CoT through the sentence-level streaming mask (GPE's StreamingTrainer)."""
    from brisklm.streaming.train import StreamingTrainer
    from brisklm.zoo.textlm import training_arguments

    require_units(examples)
    for e in examples:  # every example's layout once, so a bad one names its line before training starts
        try:
            text_thinker_layout(text, e, marker)
        except BriskError as error:
            raise BriskError(f"{e.where}: {error}") from None
    trainer = StreamingTrainer(model=model, args=training_arguments(options, output_dir),
                               train_dataset=[{"example": e} for e in examples],
                               data_collator=TextThinkerCollator(text, marker))
    result = trainer.train()
    model.eval()
    return {"train_loss": float(result.training_loss), "train_seconds": float(result.metrics.get("train_runtime", 0.0))}


def reference_logits(model, text: TextLayer, example: ThinkerExample, marker: Sequence[int]) -> torch.Tensor:
    """(T, V) logits of the rows predicting every target token after the header, from one full masked pass."""
    layout = text_thinker_layout(text, example, marker)
    batch = text_thinker_batch([layout], text.roles.pad_id)
    device = next(model.parameters()).device
    plan = Plan(position_ids=batch["position_ids"].to(device),
                visibility=MatrixVisibility(batch["visibility"].to(device)))
    with torch.no_grad():
        logits = execute(model, batch["input_ids"].to(device), plan=plan,
                         attention_mask=batch["attention_mask"].to(device)).logits[0]
    start = len(layout.source_ids) + len(layout.target[0]) - 1
    return logits[start:len(layout.input_ids) - 1].float().cpu()


# ------------------------------------------------------------------------------------------ inference
class TextThinkerSession:
    """A batch of think-while-reading streams on any checkpoint: `start(questions)`, `read(sentences)` (one per
    stream or None) -> the unit each stream wrote, `finish()` -> final texts; `answers` after finish.

    Input goes to `input_cache` once; reasoning goes to `reasoning_cache` once. Every row sees the input segments
    that the training mask gives it, so the logits equal one full masked pass per example.
    `forced` (per stream: the target ids after the header) teacher-forces the writes (tests, scoring).
    """

    def __init__(self, model, text: TextLayer, batch_size: int = 1, *, marker: Sequence[int] | None = None,
                 max_unit_tokens: int = 48, max_final_tokens: int = 128, keep_logits: bool = False,
                 forced: Sequence[Sequence[int]] | None = None) -> None:
        if batch_size < 1:
            raise BriskError(f"batch_size must be >= 1, got {batch_size}")
        if forced is not None and len(forced) != batch_size:
            raise BriskError(f"forced has {len(forced)} streams for batch_size={batch_size}")
        self.model, self.text, self.batch_size = model, text, batch_size
        self.marker = list(marker) if marker is not None else unit_end(text)[1]
        self.max_unit_tokens, self.max_final_tokens = max_unit_tokens, max_final_tokens
        layers = ModelAdapter.from_model(model).num_layers
        self.input_cache, self.reasoning_cache = KVCache(layers), KVCache(layers)
        self.device = next(model.parameters()).device
        self.src_tokens, self.tgt_tokens = [0] * batch_size, [0] * batch_size
        self.segments = [-1] * batch_size  # input segments read after the prompt (-1: not started)
        self.pending: list[list[int]] = [[] for _ in range(batch_size)]  # ids to feed before the next prediction
        self.units: list[list[str]] = [[] for _ in range(batch_size)]
        self.finals: list[str | None] = [None] * batch_size
        self.ended = [False] * batch_size
        self.truncated = [False] * batch_size
        self.frames: list[StreamFrame | None] = [None] * batch_size
        self.keep_logits, self.logits = keep_logits, [[] for _ in range(batch_size)]
        self.forced = [list(f) for f in forced] if forced is not None else None
        self.input_tokens_forwarded = self.reasoning_tokens_forwarded = 0
        self._end_ids = sorted(text.stop_ids)

    # ------------------------------------------------------------------ forwards
    def _batch(self, rows: list[list[int]], start: list[int], pad: int):
        width = max(len(r) for r in rows)
        ids = torch.full((self.batch_size, width), pad, dtype=torch.long)
        valid = torch.zeros(self.batch_size, width, dtype=torch.bool)
        order = torch.zeros(self.batch_size, width, dtype=torch.long)
        for b, r in enumerate(rows):
            ids[b, :len(r)] = torch.tensor(r, dtype=torch.long)
            valid[b, :len(r)] = True
            order[b] = start[b] + torch.arange(width).clamp(max=max(len(r) - 1, 0))  # pads repeat the last order
        return ids, valid, order

    @torch.no_grad()
    def _read(self, segments: list[list[int] | None]) -> None:
        """Encode one new input segment per stream (None: nothing) into the input cache."""
        rows = [seg or [] for seg in segments]
        for b, seg in enumerate(segments):
            if seg is not None:
                self.segments[b] += 1
        if max(len(r) for r in rows) == 0:
            return
        ids, valid, order = self._batch(rows, self.src_tokens, self.text.roles.pad_id)
        segment = torch.tensor(self.segments)[:, None].expand_as(ids).clone()
        meta = {"group": torch.full_like(ids, SOURCE), "segment": segment, "sees": torch.zeros_like(ids)}
        plan = Plan(position_ids=order.to(self.device), order=order.to(self.device), visibility=GroupVisibility(),
                    row_meta={k: v.to(self.device) for k, v in meta.items()})
        execute(self.model, ids.to(self.device), plan=plan, cache=self.input_cache,
                attention_mask=valid.to(self.device), logits_rows="none")
        for b, r in enumerate(rows):
            self.src_tokens[b] += len(r)
        self.input_tokens_forwarded += int(valid.sum())

    def _reasoning_positions(self, order: torch.Tensor) -> torch.Tensor:
        """Position ids of reasoning rows: their own group, from 0 (streaming); a subclass may place them after
        the input instead (the batch-CoT baseline)."""
        return order

    @torch.no_grad()
    def _feed(self, rows: list[list[int]], logits: bool = True) -> list[torch.Tensor | None]:
        """Feed reasoning rows per stream (each sees the input read so far); (V,) logits of each stream's last row."""
        if max(len(r) for r in rows) == 0:
            return [None] * self.batch_size
        ids, valid, order = self._batch(rows, self.tgt_tokens, self.text.roles.pad_id)
        sees = torch.tensor(self.segments)[:, None].expand_as(ids).clone()
        meta = {"group": torch.full_like(ids, TARGET), "segment": torch.zeros_like(ids), "sees": sees}
        position = self._reasoning_positions(order)
        plan = Plan(position_ids=position.to(self.device), order=order.to(self.device), visibility=GroupVisibility(),
                    row_meta={k: v.to(self.device) for k, v in meta.items()})
        out = execute(self.model, ids.to(self.device), plan=plan, cache=self.reasoning_cache,
                      context=[self.input_cache], attention_mask=valid.to(self.device),
                      logits_rows="all" if logits else "none")
        for b, r in enumerate(rows):
            self.tgt_tokens[b] += len(r)
        self.reasoning_tokens_forwarded += int(valid.sum())
        if not logits:
            return [None] * self.batch_size
        return [out.logits[b, len(r) - 1].float().cpu() if r else None for b, r in enumerate(rows)]

    def _choose(self, stream: int, logits: torch.Tensor, allow_end: bool) -> int:
        if self.keep_logits:
            self.logits[stream].append(logits.clone())
        if self.forced is not None:
            if not self.forced[stream]:
                raise BriskError(f"stream {stream}: the forced target ran out before the stream ended")
            return self.forced[stream].pop(0)
        if not allow_end:
            logits = logits.clone()
            logits[[i for i in self._end_ids if i < logits.shape[0]]] = float("-inf")
        return int(logits.argmax())

    def _write(self, streams: list[int], final: bool) -> dict[int, list[int]]:
        """Write a unit (or the final segment) in every given stream, batched; returns the ids each wrote."""
        written: dict[int, list[int]] = {b: [] for b in streams}
        active = list(streams)
        cap = self.max_final_tokens if final else self.max_unit_tokens
        ends = set(self._end_ids)
        while active:
            outs = self._feed([self.pending[b] if b in active else [] for b in range(self.batch_size)])
            for b in active:
                self.pending[b] = []
            still = []
            for b in active:
                token = self._choose(b, outs[b], allow_end=final)
                if final and token in ends:
                    continue  # the end marker is not fed
                written[b].append(token)
                if not final and written[b][-len(self.marker):] == self.marker:
                    self.pending[b] = [token]  # fed once the next input is read (the one-row shift)
                    continue
                if self.forced is None and len(written[b]) >= cap:
                    self.truncated[b] = True
                    if not final:  # close the unit: the marker as if written; its last id waits for the next input
                        self._feed([[token, *self.marker[:-1]] if i == b else [] for i in range(self.batch_size)],
                                   logits=False)
                        written[b] += self.marker
                        self.pending[b] = [self.marker[-1]]
                    continue
                self.pending[b] = [token]
                still.append(b)
            active = still
        return written

    def _unit_text(self, ids: list[int]) -> str:
        if ids[-len(self.marker):] == self.marker:
            ids = ids[:-len(self.marker)]
        return self.text.decode(ids).strip()

    # ------------------------------------------------------------------ public API
    def start(self, questions: Sequence[str]) -> None:
        """Read each stream's question (the first input segment) and feed the reasoning header."""
        if isinstance(questions, str):
            questions = [questions]
        if len(questions) != self.batch_size:
            raise BriskError(f"start got {len(questions)} questions for batch_size={self.batch_size}")
        if any(s >= 0 for s in self.segments):
            raise BriskError("the questions were already read: start a new session for new questions")
        self.frames = [thinker_frame(self.text, q) for q in questions]
        self._read([list(f.prompt) for f in self.frames])
        self._feed([list(f.header[:-1]) for f in self.frames], logits=False)  # header rows see the question only
        self.pending = [[f.header[-1]] for f in self.frames]

    def read(self, sentences: Sequence[str | None]) -> list[str | None]:
        """Read one sentence per stream (None: none for that stream now); each stream that read one writes its unit."""
        if isinstance(sentences, str) or sentences is None:
            sentences = [sentences]
        if len(sentences) != self.batch_size:
            raise BriskError(f"read got {len(sentences)} sentences for batch_size={self.batch_size}")
        if self.frames[0] is None:
            raise BriskError("read the questions first: call start(questions)")
        segments: list[list[int] | None] = []
        for b, s in enumerate(sentences):
            if s is not None and self.ended[b]:
                raise BriskError(f"stream {b}'s input has ended: it cannot read more sentences")
            if s is not None and not s.strip():
                raise BriskError(f"stream {b}: the sentence is empty; send text or None")
            segments.append(None if s is None else _ids(self.text, s.strip(), "the sentence", at_start=False))
        self._read(segments)
        chosen = [b for b, s in enumerate(segments) if s is not None]
        units: list[str | None] = [None] * self.batch_size
        for b, ids in self._write(chosen, final=False).items():
            units[b] = self._unit_text(ids)
            self.units[b].append(units[b])
        return units

    def end(self, streams: Sequence[int] | None = None) -> None:
        """The input of the given streams (default: all not yet ended) has ended: read the end-of-input segment."""
        chosen = [b for b in range(self.batch_size) if not self.ended[b]] if streams is None else list(streams)
        for b in chosen:
            if self.ended[b]:
                raise BriskError(f"stream {b}'s input already ended")
            if self.segments[b] < 1:
                raise BriskError(f"stream {b} has no context: read at least one sentence after the question")
        self._read([list(self.frames[b].source_end) if b in chosen else None for b in range(self.batch_size)])
        for b in chosen:
            self.ended[b] = True

    def finish(self) -> list[str]:
        """End every input, write each stream's final segment (batched); returns the final texts."""
        if any(not e for e in self.ended):
            self.end()
        todo = [b for b in range(self.batch_size) if self.finals[b] is None]
        for b, ids in self._write(todo, final=True).items():
            self.finals[b] = self.text.decode(ids).strip()
        return [f or "" for f in self.finals]

    @property
    def answers(self) -> list[str]:
        """Each stream's answer parsed from its final segment ('' when none was written)."""
        return [parse_answer(f or "") for f in self.finals]


def forced_targets(text: TextLayer, examples: Sequence[ThinkerExample], marker: Sequence[int]) -> list[list[int]]:
    """Per example, the target ids after the header (units with markers, final segment, end): teacher forcing."""
    out = []
    for e in examples:
        layout = text_thinker_layout(text, e, marker)
        out.append(layout.target_ids[len(layout.target[0]):])
    return out


def save_settings(folder: str | Path, marker_text: str, chat_template: bool) -> None:
    """Write thinker.json beside a trained checkpoint (the unit end marker and the framing it was trained with)."""
    Path(folder, SETTINGS_FILE).write_text(json.dumps({"unit_end": marker_text, "chat_template": chat_template}))


def load_settings(folder: str | Path) -> dict:
    """thinker.json of a checkpoint folder ({} when absent: an untrained or foreign checkpoint)."""
    path = Path(folder, SETTINGS_FILE)
    return json.loads(path.read_text()) if path.is_file() else {}


def think_batched(model, text: TextLayer, examples: Sequence[ThinkerExample], batch_size: int = 8,
                  marker: Sequence[int] | None = None, **kwargs) -> list[TextThinkerSession]:
    """Run examples through batched sessions (sentences arrive round by round; a stream ends after its last)."""
    if batch_size < 1:
        raise BriskError(f"--batch-size must be >= 1, got {batch_size}")
    sessions = []
    for start in range(0, len(examples), batch_size):
        chunk = list(examples[start:start + batch_size])
        session = TextThinkerSession(model, text, len(chunk), marker=marker, **kwargs)
        session.start([e.question for e in chunk])
        for r in range(max(len(e.context) for e in chunk)):
            session.read([e.context[r] if r < len(e.context) else None for e in chunk])
            session.end([b for b, e in enumerate(chunk) if len(e.context) == r + 1])
        session.finish()
        sessions.append(session)
    return sessions


def answer_matches(predicted: str, reference: str) -> bool:
    """Answers compared after normalization (case, inner spaces, surrounding punctuation)."""
    import re

    def norm(a: str) -> str:
        return re.sub(r"\s+", " ", a.lower()).strip().strip(".,;:!?\"'()[]{} ")

    return bool(predicted) and norm(predicted) == norm(reference)

