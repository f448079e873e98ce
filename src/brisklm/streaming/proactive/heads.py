"""Plug-and-play READ/WRITE decision heads on the GPE engine, the self-labelled probe, and the adaptive decoder.

A head turns the model's state at the current frontier (the row that would predict the next target word) into
a signal, and WRITEs when the signal passes a threshold; sweeping the threshold traces a quality/latency curve.
Our choices (ProactiveLLM's code is not public):

* entropy: WRITE if the predictive entropy H(p) <= T (nats).
* attention: WRITE if the attention mass on the newest source word (mean over all layers and heads) <= T
  (AlignAtt-like: heavy attention on the newest input means "needs more input").
* probe: WRITE if sigmoid(w . standardized final-layer hidden + b) >= T; trained by logistic regression
  (with transformers.Trainer) on self-generated labels z = 1[argmax partial-view = argmax full-view].
* lag: WRITE if words read - words written >= T, i.e. wait-k with k = T in the same loop (the baseline).

Decoder rules: word j is never written before min(j + min_lag - 1, n) source words are read (a cap on runs of
WRITEs; min_lag = 1 by default), the end marker is masked while source words remain unread, a predicted end
once every word is read means "read the end marker", and after the source is closed the model always writes.
READ decisions retract the row and re-feed it after the read (GPE's pop-and-re-feed), so decoding stays exact.
"""

from __future__ import annotations

import math
import random
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterable, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from brisklm.core import MatrixVisibility, Plan, execute
from brisklm.core.device import model_device, to_device
from brisklm.core.text import as_text_layer
from brisklm.errors import BriskError
from brisklm.streaming.engine import SOURCE, StreamingSession, StreamOutput
from brisklm.streaming.gpe import IGNORE, build_layout
from brisklm.streaming.policies import DecodeResult, _check_sources, target_limit
from brisklm.streaming.proactive.train import ScheduleOptions, collate_views, sample_schedule

HEADS = ("entropy", "attention", "probe", "lag")
PROBE_FILE = "proactive_probe.pt"


# ------------------------------------------------------------------------------------------------ signals
def entropy_of(logits: torch.Tensor) -> torch.Tensor:
    """Predictive entropy in nats of each row of logits (-inf entries count as probability 0)."""
    return torch.special.entr(torch.softmax(logits.float(), dim=-1)).sum(-1)


def newest_mass(records: Sequence, query_sees: torch.Tensor, key_segment: torch.Tensor,
                key_is_source: torch.Tensor) -> torch.Tensor:
    """Mean over layers and heads of the attention each query row puts on the newest visible source segment.

    records: per-layer attention probabilities (B, H, Tq, Tk); query_sees (B, Tq): newest visible segment;
    key_segment / key_is_source (B, Tk): segment of each key and whether it is a source key.
    """
    newest = (key_segment[:, None, :] == query_sees[:, :, None]) & key_is_source[:, None, :]  # (B, Tq, Tk)
    total = None
    for probs in records:
        mass = (probs.float() * newest[:, None]).sum(-1).mean(1)  # (B, Tq)
        total = mass if total is None else total + mass
    return total / len(records)


class LinearProbe(nn.Module):
    """Logistic regression on standardized hidden states: P(the partial view already predicts the full-view word)."""

    def __init__(self, dim: int) -> None:
        super().__init__()
        self.linear = nn.Linear(dim, 1)
        self.register_buffer("mean", torch.zeros(dim))
        self.register_buffer("std", torch.ones(dim))

    @torch.no_grad()
    def score(self, hidden: torch.Tensor) -> torch.Tensor:
        """(N,) sigmoid probabilities for (N, D) hidden states (on the probe's device; returned on theirs)."""
        return torch.sigmoid(self.forward(hidden.float().to(self.mean.device))["logits"]).to(hidden.device)

    def forward(self, features: torch.Tensor, labels: torch.Tensor | None = None) -> dict[str, torch.Tensor]:
        logits = self.linear((features - self.mean) / self.std).squeeze(-1)
        out = {"logits": logits}
        if labels is not None:
            out["loss"] = F.binary_cross_entropy_with_logits(logits, labels.float())
        return out


def save_probe(probe: LinearProbe, folder: str | Path) -> Path:
    """Store the probe beside a checkpoint (PROBE_FILE)."""
    path = Path(folder) / PROBE_FILE
    torch.save({"dim": probe.linear.in_features, "state": probe.state_dict()}, path)
    return path


def load_probe(folder: str | Path) -> LinearProbe:
    """The probe stored beside a checkpoint, or a BriskError saying how to train one."""
    path = Path(folder) / PROBE_FILE
    if not path.exists():
        raise BriskError(f"{Path(folder)} has no decision probe ({PROBE_FILE}): train the model with "
                         "`brisk stream train --objective proactive`, or use --policy entropy|attention")
    blob = torch.load(path, map_location="cpu", weights_only=True)
    probe = LinearProbe(int(blob["dim"]))
    probe.load_state_dict(blob["state"])
    return probe.eval()


# ------------------------------------------------------------------------------------------------ heads
@dataclass
class Head:
    """A READ/WRITE rule: a signal of the session state per stream and the direction that means WRITE."""

    name: str
    probe: LinearProbe | None = None

    def __post_init__(self) -> None:
        if self.name not in HEADS:
            raise BriskError(f"unknown decision head {self.name!r}: choose one of {', '.join(HEADS)}")
        if self.name == "probe" and self.probe is None:
            raise BriskError("the probe head needs a trained probe: load one with heads.load_probe(checkpoint)")

    @property
    def needs_attention(self) -> bool:
        return self.name == "attention"

    @property
    def writes_above(self) -> bool:
        """True if large signals mean WRITE (probe, lag); False if small ones do (entropy, attention)."""
        return self.name in ("probe", "lag")

    def signal(self, session: StreamingSession, logits: torch.Tensor) -> torch.Tensor:
        """(B,) signal of the latest write row of each stream."""
        if self.name == "entropy":
            return entropy_of(logits)
        if self.name == "probe":
            with torch.no_grad():
                return self.probe.score(session.last_hidden)
        if self.name == "lag":
            return torch.tensor([float(session.words_read(b) - session.words_started(b))  # (= words written, word-level)
                                 for b in range(session.batch_size)])
        records = [r for r in session.last_attention if r is not None]
        if not records:
            raise BriskError("the attention head needs a session built with record_attention=True")
        key_meta = records[0].key_meta
        device = key_meta["group"].device
        sees = torch.tensor([[session.src_segments[b]] for b in range(session.batch_size)], device=device)
        mass = newest_mass([r.probs[:, :, -1:] for r in records], sees, key_meta["segment"],
                           (key_meta["group"] == SOURCE) & key_meta["valid"])
        return mass[:, 0].float().cpu()

    def writes(self, signal: torch.Tensor, threshold: float) -> list[bool]:
        """Per stream: True = WRITE at this threshold."""
        return (signal >= threshold if self.writes_above else signal <= threshold).tolist()


def make_head(name: str, checkpoint: str | Path | None = None) -> Head:
    """A head by name; the probe head loads its probe from the checkpoint folder."""
    if name not in HEADS:
        raise BriskError(f"unknown decision head {name!r}: choose one of {', '.join(HEADS)}")
    if name == "probe":
        if checkpoint is None:
            raise BriskError("the probe head needs the checkpoint folder that holds its probe")
        return Head(name, load_probe(checkpoint))
    return Head(name)


def always_write(head: Head) -> float:
    """A threshold at which the head always WRITEs (the write-asap extreme)."""
    return -math.inf if head.writes_above else math.inf


def never_write(head: Head) -> float:
    """A threshold at which the head never WRITEs while source remains (the wait-everything extreme)."""
    return math.inf if head.writes_above else -math.inf


# ------------------------------------------------------------------------------------------------ decoding
@dataclass
class AdaptiveResult(DecodeResult):
    """Decode outputs plus each stream's action trace ('R' = a source word or the end marker read, 'W' = write)."""

    actions: list[str] | None = None


def adaptive_decode(model, tokenizer, sources: Sequence[Sequence[str]], head: Head, threshold: float, *,
                    batch_size: int = 32, min_lag: int = 1, phi: int = 0) -> AdaptiveResult:
    """Simultaneous decoding where `head` decides READ or WRITE at every step (streams batched).
    A subword tokenizer (or a TextLayer with one) runs `subword.head_decode` (decisions at word starts)."""
    text = as_text_layer(tokenizer)
    if not text.word_level:
        return _subword_adaptive(model, text, sources, head, threshold, batch_size, min_lag, phi)
    _check_sources(sources)
    if min_lag < 1:
        raise BriskError(f"min_lag must be >= 1 (read a word before the first write), got {min_lag}")
    if math.isnan(threshold):
        raise BriskError("the threshold is NaN: pass a number")
    outputs: list[StreamOutput] = []
    traces: list[str] = []
    total = 0
    for start in range(0, len(sources), batch_size):
        chunk = [list(s) for s in sources[start:start + batch_size]]
        session = StreamingSession(model, tokenizer, len(chunk), phi=phi, record_attention=head.needs_attention)
        trace = [[] for _ in chunk]

        def read_upto(wanted: list[int]) -> None:
            words = [src[session.words_read(b):max(wanted[b], session.words_read(b))] if not session.closed[b] else []
                     for b, src in enumerate(chunk)]
            for b, w in enumerate(words):
                trace[b] += ["R"] * len(w)
            if any(words):
                session.read(words)

        def gate(s: StreamingSession, logits: torch.Tensor) -> list[bool]:
            decision = head.writes(head.signal(s, logits), threshold)
            return [s.closed[b] or decision[b] for b in range(len(chunk))]

        while not all(session.done):
            read_upto([min(len(o.words) + min_lag, len(src)) for o, src in zip(session.outputs, chunk)])
            before = [len(o.words) for o in session.outputs]
            forbid = [session.words_read(b) < len(src) for b, src in enumerate(chunk)]
            session.write(gate=gate, forbid_early_end=forbid)
            wanted, close = [session.words_read(b) for b in range(len(chunk))], []
            for b, src in enumerate(chunk):
                if session.done[b]:
                    continue
                if len(session.outputs[b].words) > before[b]:
                    trace[b].append("W")
                elif session.wants_read[b]:
                    if session.words_read(b) < len(src):
                        wanted[b] += 1
                    elif not session.closed[b]:
                        close.append(b)
                if len(session.outputs[b].words) >= target_limit(len(src)):
                    session.done[b], session.outputs[b].truncated = True, True
            read_upto(wanted)
            if close:
                session.close(close)
                for b in close:
                    trace[b].append("R")
        for b, src in enumerate(chunk):
            session.outputs[b].source_words = len(src)
        outputs += session.outputs
        traces += ["".join(t) for t in trace]
        total += session.forward_tokens
    return AdaptiveResult(outputs, total, traces)


def _subword_adaptive(model, text, sources, head, threshold, batch_size, min_lag, phi) -> AdaptiveResult:
    from brisklm.streaming.proactive.subword import head_decode

    _check_sources(sources)
    outputs, traces, total = [], [], 0
    for start in range(0, len(sources), batch_size):
        result = head_decode(model, text, [list(s) for s in sources[start:start + batch_size]], head, threshold,
                             min_lag=min_lag, phi=phi)
        outputs += result.outputs
        traces += result.actions
        total += result.forward_tokens
    return AdaptiveResult(outputs, total, traces)


# ------------------------------------------------------------------------------------------------ signal data
@dataclass
class SufficiencyData:
    """Per target row decided with the source still open: signals, hidden state and the self-generated label."""

    hidden: torch.Tensor  # (N, D) final-layer hidden state of the partial view
    entropy: torch.Tensor  # (N,)
    attention: torch.Tensor  # (N,) mass on the newest visible source word
    label: torch.Tensor  # (N,) 1 = partial-view argmax equals full-view argmax
    lag: torch.Tensor  # (N,) visible source words minus target words already written

    def scores(self, probe: LinearProbe | None = None) -> dict[str, torch.Tensor]:
        """Sufficiency scores (higher = more likely sufficient) of each signal, for AUROC."""
        out = {"entropy": -self.entropy, "attention": -self.attention, "lag": self.lag.float()}
        if probe is not None:
            with torch.no_grad():
                out["probe"] = probe.score(self.hidden)
        return out


@torch.no_grad()
def sufficiency_data(model, tokenizer, examples: Sequence, schedule: ScheduleOptions | None = None, *,
                     seed: int = 0, batch_size: int = 32) -> SufficiencyData:
    """Teacher-forced masked passes under random monotone schedules, labelled against the full-context pass.
    A subword tokenizer runs `subword.sufficiency_data_text` (one row per target word's first token)."""
    if not as_text_layer(tokenizer).word_level:
        from brisklm.streaming.proactive.subword import sufficiency_data_text

        return sufficiency_data_text(model, as_text_layer(tokenizer), examples, schedule, seed=seed,
                                     batch_size=batch_size)
    schedule = schedule or ScheduleOptions(k_min=1, k_max=4, p_extra=0.3, p_full=0.0)
    rng = random.Random(seed)
    parts: dict[str, list[torch.Tensor]] = {k: [] for k in ("hidden", "entropy", "attention", "label", "lag")}
    eos = tokenizer.eos_token_id
    for start in range(0, len(examples), batch_size):
        chunk = examples[start:start + batch_size]
        layouts = [build_layout(tokenizer, e.meta["source_words"], e.meta["target_words"]) for e in chunk]
        schedules = [sample_schedule(rng, x.num_source_words, len(x.target) - 2, schedule) for x in layouts]
        batch = to_device(collate_views(layouts, schedules, tokenizer.pad_token_id), model_device(model))
        plan = Plan(position_ids=batch["position_ids"], visibility=MatrixVisibility(batch["visibility"]))
        student = execute(model, batch["input_ids"], plan=plan, attention_mask=batch["attention_mask"],
                          record_attention=True)
        plan_t = Plan(position_ids=batch["position_ids"], visibility=MatrixVisibility(batch["teacher_visibility"]))
        teacher = execute(model, batch["input_ids"], plan=plan_t, attention_mask=batch["attention_mask"]).logits
        width, host = batch["input_ids"].shape[1], torch.device("cpu")  # filled on the host, moved below
        key_segment = torch.full((len(chunk), width), -1, dtype=torch.long, device=host)
        is_source = torch.zeros(len(chunk), width, dtype=torch.bool, device=host)
        row_index = torch.full((len(chunk), width), -1, dtype=torch.long, device=host)  # target word index predicted by row
        n_words = torch.zeros(len(chunk), 1, dtype=torch.long, device=host)
        for b, x in enumerate(layouts):
            segs = x.source_segment_of_tokens()
            key_segment[b, :len(segs)] = torch.tensor(segs, device=host)
            is_source[b, :len(segs)] = True
            n_words[b] = x.num_source_words
            # row r predicts token r+1; target word j (1-based) counts the words written before it as j-1
            s_len = len(x.source_ids)
            offsets = [j for j, seg in enumerate(x.target) for _ in seg]  # segment of each target token
            for t in range(len(offsets) - 1):
                row_index[b, s_len + t] = offsets[t + 1]
        key_segment, is_source, row_index, n_words = to_device((key_segment, is_source, row_index, n_words),
                                                               batch["input_ids"].device)
        sees = batch["row_sees"]
        labels = batch["labels"]
        nxt = torch.cat([labels[:, 1:], torch.full_like(labels[:, :1], IGNORE)], 1)  # token each row predicts
        keep = (nxt != IGNORE) & (nxt != eos) & (sees >= 1) & (sees <= n_words)
        logits = student.logits.float()
        masked = logits.clone()
        masked[..., eos] = torch.where(sees < n_words, float("-inf"), logits[..., eos])  # as the decoder does
        mass = newest_mass([r.probs for r in student.attentions], sees, key_segment, is_source)
        parts["hidden"].append(student.last_hidden[keep].float())
        parts["entropy"].append(entropy_of(masked)[keep])
        parts["attention"].append(mass[keep])
        parts["label"].append((masked.argmax(-1) == teacher.float().argmax(-1))[keep].float())
        parts["lag"].append((sees - (row_index - 1))[keep].float())
    return SufficiencyData(**{k: torch.cat(v).cpu() for k, v in parts.items()})  # a host dataset for the probe


def auroc(scores: torch.Tensor, labels: torch.Tensor) -> float:
    """Area under the ROC curve of scores for binary labels (ties count half); NaN if one class is missing."""
    scores, labels = scores.double().flatten(), labels.bool().flatten()
    pos, neg = int(labels.sum()), int((~labels).sum())
    if pos == 0 or neg == 0:
        return float("nan")
    order = scores.argsort()
    ranks = torch.empty_like(scores)
    _, inverse, counts = torch.unique(scores[order], return_inverse=True, return_counts=True)
    mean_rank = counts.cumsum(0).double() - (counts.double() - 1) / 2  # 1-based ranks averaged over ties
    ranks[order] = mean_rank[inverse]
    return float((ranks[labels].sum() - pos * (pos + 1) / 2) / (pos * neg))


# ------------------------------------------------------------------------------------------------ probe training
class _ProbeCollator:
    def __call__(self, features: Sequence[dict]) -> dict[str, torch.Tensor]:
        return {"features": torch.stack([f["features"] for f in features]),
                "labels": torch.tensor([f["labels"] for f in features])}


def train_probe(data: SufficiencyData, *, steps: int = 1500, batch_size: int = 256, learning_rate: float = 1e-2,
                seed: int = 0) -> LinearProbe:
    """Fit the linear probe on self-labelled rows with transformers.Trainer (standardization fitted first)."""
    import tempfile

    from transformers import Trainer

    from brisklm.zoo.textlm import TrainOptions, training_arguments

    if len(data.label) < 2 or data.label.min() == data.label.max():
        raise BriskError(f"probe training needs rows of both labels, got {int(data.label.sum())} sufficient and "
                         f"{int((1 - data.label).sum())} insufficient rows: use more examples (--n-probe) or a "
                         "wider schedule")
    torch.manual_seed(seed)
    probe = LinearProbe(data.hidden.shape[1])
    probe.mean.copy_(data.hidden.mean(0))
    probe.std.copy_(data.hidden.std(0).clamp_min(1e-6))
    features = [{"features": h, "labels": float(y)} for h, y in zip(data.hidden, data.label)]
    options = TrainOptions(steps=steps, batch_size=batch_size, learning_rate=learning_rate, seed=seed,
                           weight_decay=0.0, log_every=max(steps, 1))
    with tempfile.TemporaryDirectory() as tmp:
        Trainer(model=probe, args=training_arguments(options, tmp), train_dataset=features,
                data_collator=_ProbeCollator()).train()
    return probe.eval()


# ------------------------------------------------------------------------------------------------ live decoding
def live_decode(model, tokenizer, words: Iterable[str], head: Head, threshold: float, *, min_lag: int = 1,
                phi: int = 0, max_words: int = 256,
                on_write: Callable[[str, int], None] = lambda word, delay: None) -> StreamOutput:
    """One stream from an iterator of source words, with the rules of `adaptive_decode` (same outputs).

    The iterator is peeked one word ahead only to know whether the source has ended (adaptive_decode knows n);
    delays count the words actually read by the model.
    """
    if not as_text_layer(tokenizer).word_level:
        from brisklm.streaming.proactive.subword import head_decode

        return head_decode(model, as_text_layer(tokenizer), [words], head, threshold, min_lag=min_lag, phi=phi,
                           max_words=max_words, on_write=lambda stream, word, delay: on_write(word, delay)).outputs[0]
    if min_lag < 1:
        raise BriskError(f"min_lag must be >= 1 (read a word before the first write), got {min_lag}")
    source = iter(words)
    ahead: list[str] = []

    def more() -> bool:
        if not ahead:
            word = next(source, None)
            if word is not None:
                ahead.append(word)
        return bool(ahead)

    session = StreamingSession(model, tokenizer, 1, phi=phi, record_attention=head.needs_attention)
    if not more():
        raise BriskError("the source stream is empty: type at least one word on stdin (or pass --text)")

    def read_one() -> None:
        if more():
            session.read([ahead.pop(0)])
        else:
            session.close()

    def gate(s: StreamingSession, logits: torch.Tensor) -> list[bool]:
        return [s.closed[0] or head.writes(head.signal(s, logits), threshold)[0]]

    out = session.outputs[0]
    while not session.done[0]:
        while not session.closed[0] and session.words_read(0) < len(out.words) + min_lag and more():
            read_one()
        before = len(out.words)
        session.write(gate=gate, forbid_early_end=[more()])
        if len(out.words) > before:
            on_write(out.words[-1], out.delays[-1])
        elif session.wants_read[0] and not session.closed[0]:
            read_one()
        if not session.done[0] and len(out.words) >= min(max_words, target_limit(session.words_read(0))):
            session.done[0], out.truncated = True, True
    out.source_words = session.words_read(0)
    return out
