"""Calibration / recovery data and token-level quality metrics shared by every pruning method.

Data can come from the model's own training distribution ("mixed_lm", the LRM-pruning finding that
aligned calibration is more stable), from a shifted distribution ("shifted": only noise and copy
segments), or from a text file (one sequence per line, encoded through the text layer: any tokenizer).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch

from brisklm.core.device import to_device
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


def load_calibration(tokenizer, source: str = "mixed_lm", n: int = 64, split: str = "train", seed: int = 0,
                     min_sequences: int = 4, min_tokens: int = 128) -> CalibData:
    """n sequences from a named source or a text file; too little data is a user error."""
    from brisklm.tasks.mixed_lm import MixedLMTask

    if source in CALIB_SOURCES:
        task = MixedLMTask() if source == "mixed_lm" else MixedLMTask(kinds=SHIFTED_KINDS)
        examples = task.examples(split, n, seed=seed)
        texts = [e.prompt for e in examples]
        difficulty = [e.meta["difficulty"] for e in examples]
    else:
        path = Path(source)
        if not path.is_file():
            raise BriskError(f"calibration source {source!r} is neither one of {', '.join(CALIB_SOURCES)} nor a text file")
        texts = [line.strip() for line in path.read_text().splitlines() if line.strip()][:n]
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
