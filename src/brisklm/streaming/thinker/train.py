"""StreamingThinker training: fit a model on streaming CoT through GPE's StreamingTrainer (sentence-level mask)."""

from __future__ import annotations

from typing import Sequence

from brisklm.streaming.thinker.data import DEPTHS, ThinkerCollator
from brisklm.tasks.base import Example


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
