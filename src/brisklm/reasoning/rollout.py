"""Rollouts through `brisklm.generate` (batched, KV cache), their length accounting, and Trainer-driven steps.

A rollout is `<bos> prompt <sep> completion [<eos>]`; `finished` means `<eos>` came within the budget.
"""

from __future__ import annotations

import contextlib
import tempfile
from dataclasses import dataclass
from typing import Any, Callable, Sequence

import torch
import torch.nn.functional as F
from transformers import Trainer, TrainingArguments

from brisklm.core.device import trainer_precision
from brisklm.core.generate import generate, left_pad
from brisklm.core.text import as_text_layer
from brisklm.errors import BriskError
from brisklm.eval.accuracy import pass_at_k  # noqa: F401  (re-exported for callers of this module)
from brisklm.zoo.textlm import IGNORE, PadCollator


@dataclass
class Rollout:
    """One sampled completion: prompt index, completion token ids (no `<eos>`), whether `<eos>` ended it."""

    prompt_index: int
    prompt_ids: list[int]
    completion_ids: list[int]
    text: str
    finished: bool

    @property
    def length(self) -> int:
        """Completion tokens, counting the `<eos>` when present (what a budget L caps)."""
        return len(self.completion_ids) + int(self.finished)


@dataclass
class RolloutBatch:
    """Rollouts of one round, n per prompt, in prompt order."""

    rollouts: list[Rollout]
    eos_id: int

    def features(self, keep: Sequence[bool] | None = None) -> list[dict[str, list[int]]]:
        """input_ids/labels (loss on the completion and `<eos>` if finished) of the kept rollouts."""
        out = []
        for i, r in enumerate(self.rollouts):
            if keep is not None and not keep[i]:
                continue
            tail = r.completion_ids + ([self.eos_id] if r.finished else [])
            out.append({"input_ids": r.prompt_ids + tail, "labels": [IGNORE] * len(r.prompt_ids) + tail})
        return out

    def mean_length(self) -> float:
        return sum(r.length for r in self.rollouts) / max(len(self.rollouts), 1)

    def truncation_ratio(self) -> float:
        """Fraction of rollouts that hit the budget without `<eos>`."""
        return sum(not r.finished for r in self.rollouts) / max(len(self.rollouts), 1)


@torch.no_grad()
def sample_rollouts(model, tokenizer, prompts: Sequence[str], n: int, max_new_tokens: int, temperature: float = 1.0,
                    seed: int = 0, batch_size: int = 128, do_sample: bool = True,
                    generation_config=None) -> RolloutBatch:
    """n completions per prompt at `temperature` (greedy when do_sample=False), cut at max_new_tokens.

    `tokenizer` may be a TextLayer (chat template, system prompt): prompts are framed by its `prompt_ids`.
    generation_config: a transformers GenerationConfig whose sampling settings (do_sample, temperature, top_k,
    top_p, ...) are used as they are (then `temperature` and `do_sample` are ignored); None = plain sampling at
    `temperature` with no top-k/top-p truncation (the papers' setting). Budgets count the model's own tokens.
    """
    if n < 1 or max_new_tokens < 1:
        raise BriskError(f"need n >= 1 and a budget >= 1 token, got n={n}, budget={max_new_tokens}")
    if generation_config is None and do_sample and temperature <= 0:
        raise BriskError(f"temperature must be > 0 for sampling, got {temperature}; use do_sample=False for greedy")
    model.eval()
    layer = as_text_layer(tokenizer)  # a tokenizer or a TextLayer built for the model (chat frame, several eos ids)
    eos, pad = layer.end_id, layer.roles.pad_id
    stops = list(layer.stop_ids)  # any eos id, and the template's end of turn, ends a rollout
    jobs = [(i, layer.prompt_ids(p)) for i, p in enumerate(prompts) for _ in range(n)]
    torch.manual_seed(seed)
    out: list[Rollout] = []
    for start in range(0, len(jobs), batch_size):
        chunk = jobs[start:start + batch_size]
        ids, mask = left_pad([p for _, p in chunk], pad, model.device)  # (B, P) left-padded
        width = ids.shape[1]
        kwargs: dict[str, Any] = {"generation_config": generation_config}
        if generation_config is None:
            kwargs["do_sample"] = do_sample
            if do_sample:
                kwargs.update(temperature=temperature, top_k=0, top_p=1.0)
        generated = generate(model, ids, mask, max_new_tokens=max_new_tokens, eos_token_id=stops,
                             pad_token_id=pad, **kwargs)[:, width:]
        for (i, p), row in zip(chunk, generated.tolist()):
            row, finished = layer.cut_at_eos(row)  # any eos id (or the end of turn) ends a rollout
            text = layer.decode(row).strip()
            out.append(Rollout(i, p, row, text, finished))
    return RolloutBatch(out, eos)


@torch.no_grad()
def token_entropy(model, batch: RolloutBatch, batch_size: int = 128) -> float:
    """Mean Shannon entropy (nats) of the model's next-token distribution over the batch's completion tokens."""
    features = batch.features()
    if not features:
        return float("nan")
    collate = PadCollator(batch.eos_id)
    total, count = 0.0, 0
    model.eval()
    for start in range(0, len(features), batch_size):
        b = {k: v.to(model.device) for k, v in collate(features[start:start + batch_size]).items()}
        logits = model(input_ids=b["input_ids"], attention_mask=b["attention_mask"]).logits[:, :-1].float()
        logp = F.log_softmax(logits, -1)  # (B, T-1, V)
        ent = -(logp.exp() * logp).sum(-1)  # (B, T-1)
        m = b["labels"][:, 1:] != IGNORE
        total += float(ent[m].sum())
        count += int(m.sum())
    return total / max(count, 1)


class StepDriver:
    """One persistent transformers.Trainer stepped by hand, one optimiser step per round of fresh on-policy data.

    The Trainer creates the optimiser and scheduler, `accelerator.prepare` wraps model and optimiser (DDP under
    `accelerate launch` / torchrun), `Trainer.training_step` runs the loss (`compute_loss`: NLL for plain Trainer,
    KL for DistillTrainer) and `accelerator.backward`, and `accelerator.clip_grad_norm_` clips. Rollouts use the
    unwrapped model (`self.model`), which shares its parameters with the prepared one.
    """

    def __init__(self, model, tokenizer, learning_rate: float, total_steps: int, seed: int = 0,
                 trainer_cls: type[Trainer] = Trainer, max_grad_norm: float = 1.0, micro_batch: int = 64,
                 **trainer_kwargs: Any) -> None:
        self._tmp = tempfile.TemporaryDirectory()
        args = TrainingArguments(output_dir=self._tmp.name, learning_rate=learning_rate, max_steps=total_steps,
                                 lr_scheduler_type="constant", weight_decay=0.01, save_strategy="no", report_to=[],
                                 seed=seed, max_grad_norm=max_grad_norm, remove_unused_columns=False,
                                 per_device_train_batch_size=micro_batch, **trainer_precision())
        self.collate = PadCollator(as_text_layer(tokenizer).roles.pad_id)
        self.trainer = trainer_cls(model=model, args=args, data_collator=self.collate, **trainer_kwargs)
        self.trainer.create_optimizer()
        accelerator = self.trainer.accelerator
        self.wrapped, self.trainer.optimizer = accelerator.prepare(self.trainer.model, self.trainer.optimizer)
        self.trainer.model_wrapped = self.wrapped
        self.trainer.create_scheduler(num_training_steps=total_steps, optimizer=self.trainer.optimizer)
        self.trainer.current_gradient_accumulation_steps = 1
        self.micro_batch = micro_batch
        self.model = accelerator.unwrap_model(self.wrapped)

    def step(self, features: list[dict]) -> float:
        """One optimiser step on all features (micro-batches weighted by their token counts); returns the loss."""
        if not features:
            return float("nan")
        trainer, accelerator = self.trainer, self.trainer.accelerator
        chunks = [features[i:i + self.micro_batch] for i in range(0, len(features), self.micro_batch)]
        tokens = [sum(sum(t != IGNORE for t in f["labels"]) for f in c) for c in chunks]
        total = max(sum(tokens), 1)
        trainer.optimizer.zero_grad()
        loss_sum = 0.0
        for i, (chunk, n) in enumerate(zip(chunks, tokens)):
            trainer.current_gradient_accumulation_steps = total / max(n, 1)  # token-mean over the whole step
            last = i == len(chunks) - 1
            with contextlib.nullcontext() if last else accelerator.no_sync(self.wrapped):  # reduce grads once
                loss_sum += float(trainer.training_step(self.wrapped, self.collate(chunk)))  # chunk mean * n / total
        accelerator.clip_grad_norm_(self.wrapped.parameters(), trainer.args.max_grad_norm)
        trainer.optimizer.step()
        trainer.lr_scheduler.step()
        trainer.optimizer.zero_grad()
        self.model.eval()
        return loss_sum


Verifier = Callable[[str, Any], bool]
