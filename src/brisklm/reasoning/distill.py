"""Decoupled distillation: {teacher, student} prefixes x {forward, reverse} token KL over the full vocabulary.

Token-level objectives at each completion position c (prefixes are data, gradients flow only through the student):
  forward  FKL(c) = sum_v pT(v|c) (log pT(v|c) - log pS(v|c))   -> soft-target cross-entropy (SFT / KD / DAgger)
  reverse  RKL(c) = sum_v pS(v|c) (log pS(v|c) - log pT(v|c))   -> policy gradient with reward log pT - log pS (OPD)
  mix      beta * RKL + (1 - beta) * FKL
`top_k` restricts both distributions to the teacher's k most likely tokens, renormalised there.
`DistillTrainer` (a transformers.Trainer) computes the loss; `distill` runs rounds of prefix rollouts + updates.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable, Sequence

import torch
import torch.nn.functional as F
from transformers import Trainer

from brisklm.errors import BriskError
from brisklm.reasoning.rollout import StepDriver, sample_rollouts, token_entropy

PREFIXES = ("teacher", "student")


@dataclass(frozen=True)
class KLSpec:
    """Which divergence: beta = weight of reverse KL (0 forward, 1 reverse, in between the linear mix)."""

    beta: float
    top_k: int | None = None
    temperature: float = 1.0

    @property
    def name(self) -> str:
        return {0.0: "forward", 1.0: "reverse"}.get(self.beta, f"mix:{self.beta:g}")


def parse_kl(text: str, top_k: int | None = None, temperature: float = 1.0) -> KLSpec:
    """'forward' | 'reverse' | 'mix:BETA' (BETA in [0, 1], the reverse-KL weight) -> KLSpec."""
    if text == "forward":
        return KLSpec(0.0, top_k, temperature)
    if text == "reverse":
        return KLSpec(1.0, top_k, temperature)
    if text.startswith("mix:"):
        try:
            beta = float(text[4:])
        except ValueError:
            beta = -1.0
        if 0.0 <= beta <= 1.0:
            return KLSpec(beta, top_k, temperature)
    raise BriskError(f"unknown --kl {text!r}: use forward, reverse or mix:BETA with BETA in [0, 1] (e.g. mix:0.5)")


def _wide(x: torch.Tensor) -> torch.Tensor:
    """Half-precision logits in float32 (softmax over a vocabulary); float32/float64 unchanged."""
    return x.float() if x.dtype in (torch.float16, torch.bfloat16) else x


def _log_probs(student_logits: torch.Tensor, teacher_logits: torch.Tensor, top_k: int | None,
               temperature: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Student and teacher log-probabilities (..., V or k), optionally on the teacher's top-k support."""
    if student_logits.shape != teacher_logits.shape:
        raise BriskError(f"student logits {tuple(student_logits.shape)} and teacher logits "
                         f"{tuple(teacher_logits.shape)} differ; both models need the same tokenizer")
    s, t = _wide(student_logits) / temperature, _wide(teacher_logits) / temperature
    if top_k is not None:
        if not 1 <= top_k <= s.shape[-1]:
            raise BriskError(f"top_k must be in 1..{s.shape[-1]}, got {top_k}")
        index = t.topk(top_k, dim=-1).indices  # (..., k)
        s, t = s.gather(-1, index), t.gather(-1, index)
    return F.log_softmax(s, dim=-1), F.log_softmax(t, dim=-1)


def token_kl(student_logits: torch.Tensor, teacher_logits: torch.Tensor, beta: float = 0.0,
             top_k: int | None = None, temperature: float = 1.0) -> torch.Tensor:
    """Per-position beta*RKL + (1-beta)*FKL; logits (..., V) -> (...). The teacher side is detached."""
    if not 0.0 <= beta <= 1.0:
        raise BriskError(f"beta must be in [0, 1], got {beta}")
    log_s, log_t = _log_probs(student_logits, teacher_logits.detach(), top_k, temperature)
    out = torch.zeros(log_s.shape[:-1], dtype=log_s.dtype, device=log_s.device)
    if beta < 1.0:
        out = out + (1.0 - beta) * (log_t.exp() * (log_t - log_s)).sum(-1)
    if beta > 0.0:
        out = out + beta * (log_s.exp() * (log_s - log_t)).sum(-1)
    return out


def masked_mean(values: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Mean of values (B, T) over mask (B, T) positions (token-mean, as in the reference trainers)."""
    mask = mask.to(values.dtype)
    return (values * mask).sum() / mask.sum().clamp(min=1.0)


def distill_loss(student_logits: torch.Tensor, teacher_logits: torch.Tensor, labels: torch.Tensor,
                 spec: KLSpec) -> torch.Tensor:
    """Token-mean KL over completion positions: logits (B, T, V) predict labels (B, T) shifted by one."""
    per_token = token_kl(student_logits[:, :-1], teacher_logits[:, :-1], spec.beta, spec.top_k, spec.temperature)
    return masked_mean(per_token, labels[:, 1:] != -100)  # (B, T-1) -> scalar


def soft_target_cross_entropy(student_logits: torch.Tensor, teacher_logits: torch.Tensor) -> torch.Tensor:
    """-sum_v pT(v) log pS(v) per position: the SFT-style form of the forward-KL gradient."""
    return -(F.softmax(_wide(teacher_logits.detach()), -1) * F.log_softmax(_wide(student_logits), -1)).sum(-1)


def reverse_kl_policy_gradient_surrogate(student_logits: torch.Tensor, teacher_logits: torch.Tensor) -> torch.Tensor:
    """-E_{v~pS}[sg(r(v)) log pS(v)] with r = log pT - log pS, exact over the vocabulary: its gradient is grad RKL."""
    log_s = F.log_softmax(_wide(student_logits), -1)
    log_t = F.log_softmax(_wide(teacher_logits.detach()), -1)
    reward = (log_t - log_s).detach()
    return -(log_s.exp().detach() * reward * log_s).sum(-1)


PROBE_TEXTS = ("The quick brown fox jumps over the lazy dog.", "Q: 12 + 7 = ? answer 19 ; #### 19",
               "  leading spaces, new\nlines and symbols: {}[]()<>=+-*/\\boxed{3}")


def check_shared_tokenizer(teacher_tokenizer, student_tokenizer) -> None:
    """Teacher and student must share one tokenizer: the same vocabulary (token -> id) and the same ids for the
    same text; otherwise token-level KL compares unrelated tokens. A one-line BriskError names the difference."""
    fix = "token-level distillation needs one shared tokenizer (e.g. two sizes of the same model family)"
    t_vocab, s_vocab = teacher_tokenizer.get_vocab(), student_tokenizer.get_vocab()
    if t_vocab != s_vocab:
        moved = sum(1 for tok, i in t_vocab.items() if s_vocab.get(tok) != i)
        raise BriskError(f"teacher and student tokenizers differ: vocabularies of {len(t_vocab)} and {len(s_vocab)} "
                         f"tokens, {moved} teacher tokens missing or at another id in the student; {fix}")
    for text in PROBE_TEXTS:
        t_ids = teacher_tokenizer(text, add_special_tokens=False)["input_ids"]
        s_ids = student_tokenizer(text, add_special_tokens=False)["input_ids"]
        if list(t_ids) != list(s_ids):
            raise BriskError(f"teacher and student tokenizers share a vocabulary but split {text[:30]!r} differently "
                             f"({len(t_ids)} vs {len(s_ids)} tokens); {fix}")


def shared_width(student_logits: torch.Tensor, teacher_logits: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Both logits cut to the narrower vocabulary: real checkpoints pad their embedding matrix to different sizes
    (rows past the shared tokenizer's length are never a token), e.g. 151936 vs 152064 in one family."""
    width = min(student_logits.shape[-1], teacher_logits.shape[-1])
    return student_logits[..., :width], teacher_logits[..., :width]


class DistillTrainer(Trainer):
    """A Trainer whose loss is the token KL between the trained student and a frozen teacher."""

    def __init__(self, *args: Any, teacher=None, kl: KLSpec = KLSpec(0.0), **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        if teacher is None:
            raise BriskError("DistillTrainer needs teacher=<a causal LM with the student's tokenizer>")
        self.teacher = teacher.eval().to(self.args.device)  # the student's device (one copy per rank)
        for p in self.teacher.parameters():
            p.requires_grad_(False)
        self.kl = kl

    def compute_loss(self, model, inputs, return_outputs: bool = False, num_items_in_batch=None):
        labels = inputs["labels"]
        out = model(input_ids=inputs["input_ids"], attention_mask=inputs["attention_mask"])
        with torch.no_grad():
            teacher_logits = self.teacher(input_ids=inputs["input_ids"], attention_mask=inputs["attention_mask"]).logits
        loss = distill_loss(*shared_width(out.logits, teacher_logits), labels, self.kl)
        return (loss, out) if return_outputs else loss


@dataclass
class DistillConfig:
    """One distillation run: prefix source, divergence, rollouts per round, optimiser and length schedule."""

    prefix: str = "student"
    kl: KLSpec = field(default_factory=lambda: KLSpec(1.0))
    rounds: int = 30
    prompts_per_round: int = 16
    samples_per_prompt: int = 2
    max_new_tokens: int = 96
    temperature: float = 1.0
    learning_rate: float = 5e-4
    seed: int = 0
    generation_config: Any = None  # a GenerationConfig whose sampling settings replace plain sampling at `temperature`

    def check(self) -> None:
        """Reject impossible settings with a one-line fix."""
        if self.prefix not in PREFIXES:
            raise BriskError(f"unknown --prefix {self.prefix!r}: use teacher or student")
        if self.rounds < 1 or self.prompts_per_round < 1 or self.samples_per_prompt < 1 or self.max_new_tokens < 1:
            raise BriskError("rounds, prompts per round, samples per prompt and max new tokens must all be >= 1")


def distill(teacher, student, tokenizer, prompts: Sequence[str], config: DistillConfig,
            length_schedule: Callable[[int, float], int] | None = None,
            on_round: Callable[[int, dict], None] | None = None) -> list[dict]:
    """Rounds of: roll out prefixes (teacher or student), one DistillTrainer update of the token KL on them.

    `length_schedule(round, student_entropy) -> max_new_tokens` plugs in the entropy-gated curriculum.
    Returns one log record per round (loss, rollout length, truncation ratio, student entropy on its prefixes).
    """
    config.check()
    if not prompts:
        raise BriskError("distillation needs at least one prompt")
    driver = StepDriver(student, tokenizer, config.learning_rate, config.rounds, config.seed,
                        trainer_cls=DistillTrainer, teacher=teacher, kl=config.kl)
    gen = torch.Generator().manual_seed(config.seed)
    logs, max_new, entropy = [], config.max_new_tokens, float("nan")
    for r in range(config.rounds):
        if length_schedule is not None:
            max_new = length_schedule(r, entropy)
            boost = bool(getattr(length_schedule, "fkl_boost", False))  # entropy below the gate: halve RKL weight
            driver.trainer.kl = KLSpec(config.kl.beta / 2, config.kl.top_k, config.kl.temperature) if boost else config.kl
        idx = torch.randint(len(prompts), (config.prompts_per_round,), generator=gen).tolist()
        source = teacher if config.prefix == "teacher" else student
        batch = sample_rollouts(source, tokenizer, [prompts[i] for i in idx], config.samples_per_prompt,
                                max_new, config.temperature, seed=config.seed * 100003 + r,
                                generation_config=config.generation_config)
        loss = driver.step(batch.features())
        entropy = token_entropy(student, batch)  # on this round's prefixes (the student's own when prefix=student)
        record = {"round": r, "loss": loss, "max_new_tokens": max_new, "mean_length": batch.mean_length(),
                  "truncation_ratio": batch.truncation_ratio(), "student_entropy": entropy}
        logs.append(record)
        if on_round:
            on_round(r, record)
    student.eval()
    return logs


