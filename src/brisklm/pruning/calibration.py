"""Calibration / recovery data and token-level quality metrics shared by every pruning method.

Data can come from the model's own training distribution ("mixed_lm", the LRM-pruning finding that
aligned calibration is more stable), from a shifted distribution ("shifted": only noise and copy
segments), or from the user's text: a `.txt` file (the whole file is one document) or a `.jsonl` file (one
document per line, field `text`). Text is encoded through the text layer (any tokenizer): each document
becomes `[bos] text eos`, the documents are concatenated and cut into sequences of `seq_len` tokens
(`seq_len=None`: one sequence per line / record instead).
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch

from brisklm.core.device import to_device
from brisklm.core.text import as_text_layer
from brisklm.errors import BriskError
from brisklm.zoo.textlm import IGNORE, PadCollator, encode_plain_text

CALIB_SOURCES = ("mixed_lm", "shifted")
SHIFTED_KINDS = ("noise", "copy")


@dataclass
class CalibData:
    """Encoded sequences (input_ids/labels dicts) and, when known, per-word difficulty labels."""

    features: list[dict]
    difficulty: list[list[str]] | None
    source: str

    @property
    def num_tokens(self) -> int:
        return sum(len(f["input_ids"]) for f in self.features)

    def batches(self, batch_size: int, pad_id: int, device: torch.device | str | None = None) -> list[dict[str, torch.Tensor]]:
        """Right-padded batches: input_ids, labels, attention_mask (B, T), on `device` (default: the host)."""
        collate = PadCollator(pad_id)
        out = [collate(self.features[i:i + batch_size]) for i in range(0, len(self.features), batch_size)]
        return out if device is None else [to_device(batch, device) for batch in out]


def read_documents(path: Path) -> list[str]:
    """The documents of a user text file: a `.jsonl` file's `text` fields (one per line), else the whole file."""
    if path.suffix.lower() != ".jsonl":
        text = path.read_text(encoding="utf-8")
        return [text] if text.strip() else []
    docs = []
    for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), start=1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError as error:
            raise BriskError(f"{path}: line {number} is not valid JSON ({error.msg}); each line must be an "
                             'object like {"text": "..."}') from None
        if not isinstance(record, dict) or not isinstance(record.get("text"), str):
            raise BriskError(f"{path}: line {number} has no string field 'text'; each line must be an object "
                             'like {"text": "..."}')
        if record["text"].strip():
            docs.append(record["text"])
    return docs


def pack_documents(tokenizer, docs: list[str], seq_len: int, n: int, where: str) -> list[dict]:
    """Up to n sequences of exactly seq_len tokens cut from the concatenated `[bos] doc eos` encodings."""
    if not isinstance(seq_len, int) or seq_len < 2:
        raise BriskError(f"--seq-len must be an integer of at least 2, got {seq_len!r}")
    text = as_text_layer(tokenizer)
    stream: list[int] = []
    for doc in docs:
        stream += text.plain_ids(doc)
        if len(stream) >= seq_len * n:
            break
    count = min(n, len(stream) // seq_len)
    if count == 0:
        raise BriskError(f"calibration text {where} has {len(stream)} tokens, shorter than one sequence of "
                         f"--seq-len {seq_len}; pass more text or a smaller --seq-len")
    windows = [stream[i * seq_len:(i + 1) * seq_len] for i in range(count)]
    return [{"input_ids": w, "labels": [IGNORE] + w[1:]} for w in windows]


def load_calibration(tokenizer, source: str = "mixed_lm", n: int = 64, split: str = "train", seed: int = 0,
                     min_sequences: int = 4, min_tokens: int = 128, seq_len: int | None = None) -> CalibData:
    """n sequences from a named source or a user text file (.txt / .jsonl with field `text`).

    With `seq_len`, a file's text is packed into sequences of seq_len tokens (at least one is needed, none
    shorter); without it, each line (.txt) or record (.jsonl) is one sequence and too little data is a user error.
    """
    from brisklm.tasks.mixed_lm import MixedLMTask

    if source in CALIB_SOURCES:
        task = MixedLMTask() if source == "mixed_lm" else MixedLMTask(kinds=SHIFTED_KINDS)
        examples = task.examples(split, n, seed=seed)
        texts = [e.prompt for e in examples]
        difficulty = [e.meta["difficulty"] for e in examples]
    else:
        path = Path(source)
        if not path.is_file():
            raise BriskError(f"calibration source {source!r} is neither one of {', '.join(CALIB_SOURCES)} nor a "
                             "text file (.txt, or .jsonl with a 'text' field per line)")
        docs = read_documents(path)
        if seq_len is not None:
            return CalibData(pack_documents(tokenizer, docs, seq_len, n, source), None, source)
        if path.suffix.lower() != ".jsonl":
            docs = [line for doc in docs for line in doc.splitlines()]
        texts = [d.strip() for d in docs if d.strip()][:n]
        difficulty = None
    features = [encode_plain_text(tokenizer, t) for t in texts]
    data = CalibData(features, difficulty, source)
    if len(features) < min_sequences or data.num_tokens < min_tokens:
        raise BriskError(
            f"calibration data {source!r} has {len(features)} sequences / {data.num_tokens} tokens; "
            f"need at least {min_sequences} sequences and {min_tokens} tokens (pass more lines or a larger --calib-n)"
        )
    return data


Forward = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]  # (input_ids, attention_mask) -> logits (B, T, V)


def hf_forward(model) -> Forward:
    """The plain HF forward as a `Forward`."""
    return lambda ids, mask: model(input_ids=ids.to(model.device), attention_mask=mask.to(model.device)).logits


@torch.no_grad()
def token_metrics(forward: Forward, data: CalibData, pad_id: int, batch_size: int = 32,
                  per_token: Callable[[], torch.Tensor] | None = None) -> dict[str, float]:
    """Perplexity, next-word accuracy on predictable (easy + hard) words, and loss per difficulty."""
    loss_sum, count = 0.0, 0
    by_kind: dict[str, list[float]] = {}
    correct_kind: dict[str, list[float]] = {}
    offset = 0
    for batch in data.batches(batch_size, pad_id):
        logits = forward(batch["input_ids"], batch["attention_mask"])  # (B, T, V)
        labels = batch["labels"][:, 1:].to(logits.device)
        losses = torch.nn.functional.cross_entropy(logits[:, :-1].transpose(1, 2), labels.clamp(min=0),
                                                   reduction="none")  # (B, T-1)
        hits = (logits[:, :-1].argmax(-1) == labels).float()
        keep = labels != IGNORE
        loss_sum += float(losses[keep].sum())
        count += int(keep.sum())
        if data.difficulty is not None:
            for i in range(labels.shape[0]):
                kinds = data.difficulty[offset + i]
                n = min(len(kinds), labels.shape[1])
                for j in range(n):  # labels[:, j] predicts word j (position j + 1 after <bos>)
                    by_kind.setdefault(kinds[j], []).append(float(losses[i, j]))
                    correct_kind.setdefault(kinds[j], []).append(float(hits[i, j]))
        offset += labels.shape[0]
    out = {"perplexity": math.exp(loss_sum / max(count, 1))}
    for kind in sorted(by_kind):
        out[f"loss_{kind}"] = sum(by_kind[kind]) / len(by_kind[kind])
        out[f"acc_{kind}"] = sum(correct_kind[kind]) / len(correct_kind[kind])
    predictable = correct_kind.get("easy", []) + correct_kind.get("hard", [])
    if predictable:
        out["accuracy"] = sum(predictable) / len(predictable)
    return out


def target_difficulty(data: CalibData, start: int, stop: int, length: int) -> list[list[str | None]]:
    """Difficulty of the word each input position (B, T) predicts (position p after <bos> predicts word p)."""
    rows = data.difficulty[start:stop]
    return [list(r[:length]) + [None] * max(0, length - len(r)) for r in rows]
