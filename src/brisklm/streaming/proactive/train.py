"""ProactiveLLM training: monotonic random visibility schedules and Synchronized Privileged Self-Distillation.

Clean-room design from the public description (the authors' code is not released); every choice is ours:

* Schedule (mask-based streaming modeling): per example, g(j) = min(k + j - 1 + e_j, n + 1) source segments
  after the prompt are visible when target segment j is predicted, with k ~ U{k_min..k_max} and extra reads
  e_j = e_{j-1} + Bernoulli(p_extra) * U{1..max_extra_step} (non-decreasing, so g is monotone). With probability
  p_full the example is fully visible (g = n + 1) so the full-context view keeps its own CE. The end of the
  target always sees the whole source (a stream ends only after its source), and the GPE one-row shift applies.
* SPSD: loss = CE(student) + lambda * tau^2 * mean_t KL(softmax(z_T / tau) || softmax(z_S / tau)), where the
  student is the masked pass and the teacher is the *same* model at the *same* step with every source segment
  visible, computed under no_grad (stop-gradient). KL is averaged over the labelled target tokens.
"""

from __future__ import annotations

import random
from dataclasses import dataclass
from typing import Sequence

import torch
import torch.nn.functional as F
from transformers import Trainer

from brisklm.core import MatrixVisibility, Plan, execute
from brisklm.core.text import as_text_layer
from brisklm.errors import BriskError
from brisklm.streaming.gpe import (IGNORE, StreamLayout, build_layout, padded_batch, padded_visibility,
                                   position_ids)
from brisklm.streaming.train import stream_features
from brisklm.tasks.base import Example
from brisklm.zoo.textlm import TrainOptions, training_arguments


@dataclass(frozen=True)
class ScheduleOptions:
    """How random visibility schedules are drawn: lag range, extra-read rate and size, share of full views."""

    k_min: int = 1
    k_max: int = 5
    p_extra: float = 0.3
    max_extra_step: int = 2
    p_full: float = 0.1

    def __post_init__(self) -> None:
        if not 1 <= self.k_min <= self.k_max:
            raise BriskError(f"schedule lags need 1 <= k_min <= k_max, got {self.k_min}, {self.k_max}: fix --k-range")
        if not (0.0 <= self.p_extra <= 1.0 and 0.0 <= self.p_full <= 1.0):
            raise BriskError("p_extra and p_full are probabilities: pass values in [0, 1]")
        if self.max_extra_step < 1:
            raise BriskError(f"max_extra_step must be >= 1, got {self.max_extra_step}")


def sample_schedule(rng: random.Random, n: int, m: int, options: ScheduleOptions = ScheduleOptions()) -> list[int]:
    """Visible source segments (after the prompt) per target segment 0..m+1: monotone, 1..n+1, end sees n+1."""
    if n < 1 or m < 0:
        raise BriskError(f"a schedule needs n >= 1 source words and m >= 0 target words, got n={n}, m={m}")
    if rng.random() < options.p_full:
        return [n + 1] * (m + 2)
    k, extra, sees = rng.randint(options.k_min, options.k_max), 0, []
    for j in range(m + 1):
        if j >= 1 and rng.random() < options.p_extra:
            extra += rng.randint(1, options.max_extra_step)
        sees.append(max(1, min(k + j - 1 + extra, n + 1)))
    return sees + [n + 1]


def row_sees(layout: StreamLayout, segment_sees: Sequence[int]) -> list[int]:
    """Per target token row, the visible source segments, with GPE's one-row shift (row r predicts r+1)."""
    if len(segment_sees) != len(layout.target):
        raise BriskError(f"schedule has {len(segment_sees)} entries for {len(layout.target)} target segments")
    last, rows = len(layout.target) - 1, []
    for j, seg in enumerate(layout.target):
        rows += [segment_sees[j]] * (len(seg) - 1) + [segment_sees[min(j + 1, last)]]
    return rows


def schedule_visibility(layout: StreamLayout, segment_sees: Sequence[int]) -> torch.Tensor:
    """(L, L) bool: source causal and blind to target; target causal and sees source segments <= its row's g."""
    s_len, t_len = len(layout.source_ids), len(layout.target_ids)
    mask = torch.ones(s_len + t_len, s_len + t_len).tril().bool()
    seg = torch.tensor(layout.source_segment_of_tokens())
    sees = torch.tensor(row_sees(layout, segment_sees))
    mask[s_len:, :s_len] = seg[None, :] <= sees[:, None]
    return mask


def full_schedule(layout: StreamLayout) -> list[int]:
    """The privileged (teacher) view: every target segment sees the whole source and its end marker."""
    return [layout.num_source_words + 1] * len(layout.target)


def collate_views(layouts: Sequence[StreamLayout], schedules: Sequence[Sequence[int]], pad_id: int,
                  phi: int = 0) -> dict[str, torch.Tensor]:
    """Right-padded batch with the student visibility, the full (teacher) visibility and the row schedule."""
    batch = padded_batch(layouts, pad_id, [position_ids(x, "group", phi) for x in layouts])
    length = batch["input_ids"].shape[1]
    batch["visibility"] = padded_visibility([schedule_visibility(x, s) for x, s in zip(layouts, schedules)], length)
    batch["teacher_visibility"] = padded_visibility([schedule_visibility(x, full_schedule(x)) for x in layouts],
                                                    length)
    sees = torch.full((len(layouts), length), -1, dtype=torch.long)  # per row: visible source segments (-1 = source/pad)
    for b, (layout, schedule) in enumerate(zip(layouts, schedules)):
        sees[b, len(layout.source_ids):len(layout.input_ids)] = torch.tensor(row_sees(layout, schedule))
    batch["row_sees"] = sees
    return batch


class ProactiveCollator:
    """Draws one random monotone schedule per example and builds the student/teacher batch."""

    def __init__(self, tokenizer, schedule: ScheduleOptions = ScheduleOptions(), phi: int = 0, seed: int = 0):
        self.tokenizer, self.schedule, self.phi = tokenizer, schedule, phi
        self.rng = random.Random(seed)

    def __call__(self, features: Sequence[dict]) -> dict[str, torch.Tensor]:
        layouts = [build_layout(self.tokenizer, f["source_words"], f["target_words"]) for f in features]
        schedules = [sample_schedule(self.rng, x.num_source_words, len(x.target) - 2, self.schedule) for x in layouts]
        return collate_views(layouts, schedules, self.tokenizer.pad_token_id, self.phi)


def view_logits(model, batch: dict[str, torch.Tensor], visibility: torch.Tensor) -> torch.Tensor:
    """(B, L, V) logits of one executor pass with the given visibility, the batch's positions and padding."""
    plan = Plan(position_ids=batch["position_ids"], visibility=MatrixVisibility(visibility))
    return execute(model, batch["input_ids"], plan=plan, attention_mask=batch["attention_mask"]).logits


def spsd_from_logits(student: torch.Tensor, teacher: torch.Tensor, labels: torch.Tensor, lam: float,
                     tau: float = 1.0) -> dict[str, torch.Tensor]:
    """CE of the student, the KL(teacher || student) term (teacher detached) and their SPSD sum."""
    if lam < 0 or tau <= 0:
        raise BriskError(f"SPSD needs lambda >= 0 and tau > 0, got lambda={lam}, tau={tau}")
    s, t, y = student[:, :-1].float(), teacher[:, :-1].detach().float(), labels[:, 1:]
    keep = y != IGNORE
    ce = F.cross_entropy(s.flatten(0, 1), y.flatten(), ignore_index=IGNORE)
    log_s = F.log_softmax(s[keep] / tau, dim=-1)
    log_t = F.log_softmax(t[keep] / tau, dim=-1)
    kl = (log_t.exp() * (log_t - log_s)).sum(-1).mean() * tau ** 2 if bool(keep.any()) else s.sum() * 0
    return {"loss": ce + lam * kl, "ce": ce, "kl": kl}


def spsd_loss(model, batch: dict[str, torch.Tensor], lam: float, tau: float = 1.0) -> dict[str, torch.Tensor]:
    """SPSD on one batch: student = masked pass, teacher = same model with full visibility under no_grad."""
    student = view_logits(model, batch, batch["visibility"])
    if lam == 0:  # masking alone: no teacher pass needed
        return spsd_from_logits(student, student.detach(), batch["labels"], 0.0, tau)
    with torch.no_grad():
        teacher = view_logits(model, batch, batch["teacher_visibility"])
    return spsd_from_logits(student, teacher, batch["labels"], lam, tau)


class ProactiveTrainer(Trainer):
    """transformers.Trainer whose loss is SPSD over random monotone masks (lambda = 0: masking alone)."""

    def __init__(self, *args, spsd_lambda: float = 0.0, spsd_tau: float = 1.0, **kwargs):
        super().__init__(*args, **kwargs)
        self.spsd_lambda, self.spsd_tau = spsd_lambda, spsd_tau

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        loss = spsd_loss(model, inputs, self.spsd_lambda, self.spsd_tau)["loss"]
        return (loss, None) if return_outputs else loss


def train_proactive(model, tokenizer, examples: Sequence[Example], options: TrainOptions, output_dir: str,
                    spsd_lambda: float = 0.0, spsd_tau: float = 1.0, schedule: ScheduleOptions = ScheduleOptions(),
                    phi: int = 0) -> dict[str, float]:
    """Fine-tune `model` with random monotone masks (+ SPSD when spsd_lambda > 0); returns loss and seconds.
    A subword tokenizer (or a TextLayer) runs `subword.train_proactive_text` (the same loss on text layouts)."""
    if not as_text_layer(tokenizer).word_level:
        from brisklm.streaming.proactive.subword import train_proactive_text

        return train_proactive_text(model, as_text_layer(tokenizer), examples, options, output_dir, spsd_lambda,
                                    spsd_tau, schedule, phi)
    if spsd_lambda < 0:
        raise BriskError(f"--spsd must be >= 0 (the KL weight lambda), got {spsd_lambda}")
    trainer = ProactiveTrainer(
        model=model,
        args=training_arguments(options, output_dir),
        train_dataset=stream_features(examples),
        data_collator=ProactiveCollator(tokenizer, schedule, phi, options.seed),
        spsd_lambda=spsd_lambda,
        spsd_tau=spsd_tau,
    )
    result = trainer.train()
    model.eval()
    return {"train_loss": float(result.training_loss), "train_seconds": float(result.metrics.get("train_runtime", 0.0))}
