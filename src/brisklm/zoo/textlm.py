"""Prompt/completion language modelling on word-level tasks: sequences, collator, Trainer loop, greedy decoding.

A sequence is `<bos> prompt <sep> completion <eos>`; the loss covers the completion and `<eos>` only.
"""

from __future__ import annotations

import math
import sys
from dataclasses import dataclass
from typing import Sequence

import torch
from transformers import PreTrainedTokenizerFast, Trainer, TrainingArguments

from brisklm.tasks.base import Example
from brisklm.tasks.tokenizer import encode_words

IGNORE = -100


@dataclass
class TrainOptions:
    """How long and how hard to train a zoo model; defaults suit a ~1M-parameter model on 2 CPU cores."""

    steps: int = 1500
    batch_size: int = 32
    learning_rate: float = 3e-3
    warmup_ratio: float = 0.05
    weight_decay: float = 0.01
    seed: int = 0
    log_every: int = 100


def prompt_ids(tokenizer: PreTrainedTokenizerFast, prompt: str) -> list[int]:
    """`<bos> prompt <sep>` as ids: what the model sees before it writes the completion."""
    return [tokenizer.bos_token_id, *encode_words(tokenizer, prompt.split()), tokenizer.sep_token_id]


def encode_example(tokenizer: PreTrainedTokenizerFast, example: Example) -> dict[str, list[int]]:
    """input_ids and labels (-100 on the prompt) for one example."""
    head = prompt_ids(tokenizer, example.prompt)
    tail = [*encode_words(tokenizer, example.completion.split()), tokenizer.eos_token_id]
    return {"input_ids": head + tail, "labels": [IGNORE] * len(head) + tail}


def encode_plain_text(tokenizer: PreTrainedTokenizerFast, text: str) -> dict[str, list[int]]:
    """A plain LM sequence `<bos> text <eos>` with loss on every predicted token."""
    ids = [tokenizer.bos_token_id, *encode_words(tokenizer, text.split()), tokenizer.eos_token_id]
    return {"input_ids": ids, "labels": [IGNORE] + ids[1:]}


class PadCollator:
    """Right-pads input_ids with the pad id and labels with -100; builds the attention mask."""

    def __init__(self, pad_id: int) -> None:
        self.pad_id = pad_id

    def __call__(self, features: Sequence[dict]) -> dict[str, torch.Tensor]:
        length = max(len(f["input_ids"]) for f in features)
        ids = torch.full((len(features), length), self.pad_id, dtype=torch.long)
        labels = torch.full((len(features), length), IGNORE, dtype=torch.long)
        mask = torch.zeros((len(features), length), dtype=torch.long)
        for i, f in enumerate(features):
            n = len(f["input_ids"])
            ids[i, :n] = torch.tensor(f["input_ids"])
            labels[i, :n] = torch.tensor(f["labels"])
            mask[i, :n] = 1
        return {"input_ids": ids, "labels": labels, "attention_mask": mask}


def training_arguments(options: TrainOptions, output_dir: str) -> TrainingArguments:
    """CPU, deterministic, no checkpoints or external loggers: a zoo run leaves only the final model."""
    return TrainingArguments(
        output_dir=output_dir,
        max_steps=options.steps,
        per_device_train_batch_size=options.batch_size,
        learning_rate=options.learning_rate,
        warmup_steps=int(options.warmup_ratio * options.steps),
        weight_decay=options.weight_decay,
        lr_scheduler_type="cosine",
        logging_steps=options.log_every,
        save_strategy="no",
        report_to=[],
        seed=options.seed,
        data_seed=options.seed,
        use_cpu=True,
        dataloader_num_workers=0,
        remove_unused_columns=False,
        disable_tqdm=not sys.stderr.isatty(),  # bars on a terminal, none in CI logs
    )


def train_lm(model, tokenizer: PreTrainedTokenizerFast, features: list[dict], options: TrainOptions,
             output_dir: str, collator=None) -> dict[str, float]:
    """Fit `model` on encoded features with transformers.Trainer; returns the final training loss and time."""
    trainer = Trainer(
        model=model,
        args=training_arguments(options, output_dir),
        train_dataset=features,
        data_collator=collator or PadCollator(tokenizer.pad_token_id),
    )
    result = trainer.train()
    model.eval()
    return {"train_loss": float(result.training_loss), "train_seconds": float(result.metrics.get("train_runtime", 0.0))}


@torch.no_grad()
def greedy_complete(model, tokenizer: PreTrainedTokenizerFast, prompts: Sequence[str], max_new_tokens: int,
                    batch_size: int = 64) -> list[str]:
    """Greedy completions (text up to `<eos>`) for many prompts, batched with left padding and a KV cache."""
    model.eval()
    outputs: list[str] = []
    eos, pad = tokenizer.eos_token_id, tokenizer.pad_token_id
    for start in range(0, len(prompts), batch_size):
        chunk = [prompt_ids(tokenizer, p) for p in prompts[start:start + batch_size]]
        length = max(len(c) for c in chunk)
        ids = torch.full((len(chunk), length), pad, dtype=torch.long)
        mask = torch.zeros_like(ids)
        for i, c in enumerate(chunk):
            ids[i, length - len(c):] = torch.tensor(c)
            mask[i, length - len(c):] = 1
        generated = model.generate(
            input_ids=ids, attention_mask=mask, max_new_tokens=max_new_tokens, do_sample=False,
            eos_token_id=eos, pad_token_id=pad,
        )[:, length:]
        for row in generated.tolist():
            if eos in row:
                row = row[: row.index(eos)]
            outputs.append(" ".join(tokenizer.convert_ids_to_tokens(row)))
    return outputs


@torch.no_grad()
def token_losses(model, features: list[dict], pad_id: int, batch_size: int = 64) -> list[list[float]]:
    """Per-token cross-entropy (nats) of each labelled position, aligned to the labels (NaN where ignored)."""
    collate = PadCollator(pad_id)
    out: list[list[float]] = []
    for start in range(0, len(features), batch_size):
        chunk = features[start:start + batch_size]
        batch = collate(chunk)
        logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
        labels = batch["labels"]
        losses = torch.nn.functional.cross_entropy(
            logits[:, :-1].transpose(1, 2), labels[:, 1:].clamp(min=0), reduction="none"
        )
        losses = torch.where(labels[:, 1:] == IGNORE, torch.full_like(losses, math.nan), losses)
        for i, f in enumerate(chunk):
            out.append([math.nan] + losses[i, : len(f["input_ids"]) - 1].tolist())
    return out
