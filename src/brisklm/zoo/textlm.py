"""Prompt/completion language modelling on word-level tasks: sequences, collator, Trainer loop, greedy decoding.

A sequence is `<bos> prompt <sep> completion <eos>` on the zoo's word-level tokenizer (a checkpoint's chat frame
and end-of-turn token elsewhere; see `brisklm.core.text`); the loss covers the completion and its end token only.
"""

from __future__ import annotations

import math
import sys
from dataclasses import dataclass
from typing import Sequence

import torch
from transformers import PreTrainedTokenizerFast, Trainer, TrainingArguments

from brisklm.core.device import trainer_precision
from brisklm.core.generate import generate, left_pad
from brisklm.core.text import TextLayer, as_text_layer
from brisklm.tasks.base import Example

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


Text = PreTrainedTokenizerFast | TextLayer  # a tokenizer (its default text layer) or a text layer built for the model


def prompt_ids(tokenizer: Text, prompt: str) -> list[int]:
    """What the model sees before it writes the completion: `<bos> prompt <sep>` on the zoo, else its chat frame."""
    return as_text_layer(tokenizer).prompt_ids(prompt)


def encode_example(tokenizer: Text, example: Example) -> dict[str, list[int]]:
    """input_ids and labels (-100 on the prompt) for one example: the completion ends with `<eos>` / end of turn."""
    text = as_text_layer(tokenizer)
    head = text.prompt_ids(example.prompt)
    tail = text.completion_ids(example.completion)
    return {"input_ids": head + tail, "labels": [IGNORE] * len(head) + tail}


def encode_plain_text(tokenizer: Text, text: str) -> dict[str, list[int]]:
    """A plain LM sequence `[<bos>] text <eos>` with loss on every predicted token."""
    ids = as_text_layer(tokenizer).plain_ids(text)
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
    """Deterministic, no checkpoints or external loggers: a zoo run leaves only the final model.

    The device is `--device` (auto: a GPU when there is one) and `--dtype` the mixed precision
    (`core.device.trainer_precision`); `accelerate launch` / torchrun run it data-parallel unchanged. On a machine
    without an accelerator `use_cpu` must be set: only then does accelerate join the ranks into one gloo job
    (MULTI_CPU); without it each rank would train alone (tests/test_distributed.py).
    """
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
        dataloader_num_workers=0,
        remove_unused_columns=False,
        **trainer_precision(),  # use_cpu on a CPU-only machine (see the docstring)
        disable_tqdm=not sys.stderr.isatty(),  # bars on a terminal, none in CI logs
    )


def train_lm(model, tokenizer: Text, features: list[dict], options: TrainOptions,
             output_dir: str, collator=None) -> dict[str, float]:
    """Fit `model` on encoded features with transformers.Trainer; returns the final training loss and time."""
    trainer = Trainer(
        model=model,
        args=training_arguments(options, output_dir),
        train_dataset=features,
        data_collator=collator or PadCollator(as_text_layer(tokenizer).roles.pad_id),
    )
    result = trainer.train()
    model.eval()
    return {"train_loss": float(result.training_loss), "train_seconds": float(result.metrics.get("train_runtime", 0.0))}


@torch.no_grad()
def greedy_complete(model, tokenizer: Text, prompts: Sequence[str], max_new_tokens: int,
                    batch_size: int = 64) -> list[str]:
    """Greedy completions (text up to `<eos>`) for many prompts, batched with left padding and a KV cache."""
    model.eval()
    outputs: list[str] = []
    text = as_text_layer(tokenizer)
    eos, pad = list(text.roles.eos_ids), text.roles.pad_id
    for start in range(0, len(prompts), batch_size):
        chunk = [text.prompt_ids(p) for p in prompts[start:start + batch_size]]
        ids, mask = left_pad(chunk, pad, model.device)
        length = ids.shape[1]
        generated = generate(model, ids, mask, max_new_tokens=max_new_tokens, do_sample=False,
                             eos_token_id=eos, pad_token_id=pad)[:, length:]
        for row in generated.tolist():
            outputs.append(text.decode(text.cut_at_eos(row)[0]).strip())
    return outputs


@torch.no_grad()
def token_losses(model, features: list[dict], pad_id: int, batch_size: int = 64) -> list[list[float]]:
    """Per-token cross-entropy (nats) of each labelled position, aligned to the labels (NaN where ignored)."""
    collate = PadCollator(pad_id)
    out: list[list[float]] = []
    for start in range(0, len(features), batch_size):
        chunk = features[start:start + batch_size]
        batch = {k: v.to(model.device) for k, v in collate(chunk).items()}  # the collator fills on the host
        logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
        labels = batch["labels"]
        losses = torch.nn.functional.cross_entropy(
            logits[:, :-1].transpose(1, 2), labels[:, 1:].clamp(min=0), reduction="none"
        )
        losses = torch.where(labels[:, 1:] == IGNORE, torch.full_like(losses, math.nan), losses)
        for i, f in enumerate(chunk):
            out.append([math.nan] + losses[i, : len(f["input_ids"]) - 1].tolist())
    return out
