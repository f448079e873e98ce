"""GPE fine-tuning through the layer-loop executor: wait-k visibility matrix + group positions, with Trainer.

Each example draws its k from a range (one model then serves several lags, as in efficient wait-k); the loss
is plain next-token cross-entropy on the target words and the end marker, computed from the full masked pass.
"""

from __future__ import annotations

import random
from typing import Sequence

import torch
import torch.nn.functional as F
from transformers import Trainer

from brisklm.core import MatrixVisibility, Plan, execute
from brisklm.errors import BriskError
from brisklm.streaming.gpe import IGNORE, PositionMode, build_layout, check_k, collate, stream_frame
from brisklm.streaming.policies import interleaved_sequence
from brisklm.tasks.base import Example
from brisklm.zoo.textlm import TrainOptions, train_lm, training_arguments


def parse_k_range(text: str | int | Sequence[int]) -> tuple[int, int]:
    """'3' -> (3, 3); '1:5' -> (1, 5); validates 1 <= a <= b."""
    if isinstance(text, int):
        a = b = text
    elif isinstance(text, str):
        parts = text.split(":")
        try:
            a, b = (int(parts[0]), int(parts[-1])) if len(parts) in (1, 2) else (None, None)
        except ValueError:
            a = b = None
        if a is None:
            raise BriskError(f"cannot read k range {text!r}: write K or A:B, e.g. 3 or 1:5")
    else:
        a, b = int(text[0]), int(text[-1])
    check_k(a)
    check_k(b)
    if a > b:
        raise BriskError(f"k range {a}:{b} is empty: write A:B with A <= B")
    return a, b


def stream_features(examples: Sequence[Example]) -> list[dict]:
    """Word lists of each example (the collator tokenizes word by word)."""
    return [{"source_words": list(e.meta["source_words"]), "target_words": list(e.meta["target_words"])} for e in examples]


class GPECollator:
    """Builds GPE batches: layouts, a k per example drawn from k_range, visibility matrices and positions."""

    def __init__(self, tokenizer, k_range: tuple[int, int], mode: PositionMode = "group", phi: int = 0, seed: int = 0,
                 instruction: str | None = None):
        self.tokenizer, self.k_range, self.mode, self.phi = tokenizer, k_range, mode, phi
        self.instruction = instruction
        self.rng = random.Random(seed)

    def __call__(self, features: Sequence[dict]) -> dict[str, torch.Tensor]:
        layouts = [build_layout(self.tokenizer, f["source_words"], f["target_words"], instruction=self.instruction)
                   for f in features]
        ks = [self.rng.randint(*self.k_range) for _ in features]
        return collate(layouts, ks, stream_frame(self.tokenizer, self.instruction).pad, self.mode, self.phi)


def streaming_loss(model, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    """Mean CE of the labelled tokens from one executor pass with the batch's visibility and positions."""
    plan = Plan(position_ids=batch["position_ids"], visibility=MatrixVisibility(batch["visibility"]))
    logits = execute(model, batch["input_ids"], plan=plan, attention_mask=batch["attention_mask"]).logits  # (B, L, V)
    labels = batch["labels"]
    return F.cross_entropy(logits[:, :-1].flatten(0, 1).float(), labels[:, 1:].flatten(), ignore_index=IGNORE)


class StreamingTrainer(Trainer):
    """transformers.Trainer whose loss is the GPE streaming pass (so accelerate/DeepSpeed/FSDP still apply)."""

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        loss = streaming_loss(model, inputs)
        return (loss, None) if return_outputs else loss


def train_gpe(model, tokenizer, examples: Sequence[Example], k_range: tuple[int, int], options: TrainOptions,
              output_dir: str, mode: PositionMode = "group", phi: int = 0,
              instruction: str | None = None) -> dict[str, float]:
    """Fine-tune `model` with the wait-k streaming mask and group positions; returns loss and seconds.
    `tokenizer` may be a TextLayer (its chat-template setting and the instruction pick the frame)."""
    trainer = StreamingTrainer(
        model=model,
        args=training_arguments(options, output_dir),
        train_dataset=stream_features(examples),
        data_collator=GPECollator(tokenizer, k_range, mode, phi, options.seed, instruction),
    )
    result = trainer.train()
    model.eval()
    return {"train_loss": float(result.training_loss), "train_seconds": float(result.metrics.get("train_runtime", 0.0))}


def train_interleaved(model, tokenizer, examples: Sequence[Example], k_range: tuple[int, int], options: TrainOptions,
                      output_dir: str) -> dict[str, float]:
    """Baseline: a plain causal LM on arrival-order (interleaved) sequences with k drawn from k_range."""
    rng = random.Random(options.seed)
    features = [interleaved_sequence(tokenizer, e.meta["source_words"], e.meta["target_words"], rng.randint(*k_range))
                for e in examples]
    return train_lm(model, tokenizer, features, options, output_dir)
