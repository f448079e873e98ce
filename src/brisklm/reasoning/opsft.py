"""On-Policy SFT: sample n completions per prompt, keep the correct ones that finished within budget L, train NLL.

With beta=0, no group baseline, reward 1[correct]*1[len <= L] and one update per rollout, the GRPO gradient is
the NLL gradient on the kept samples (reference note, section 1.2), so each round is a plain Trainer step.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, Sequence

import torch

from brisklm.errors import BriskError
from brisklm.reasoning.rollout import RolloutBatch, StepDriver, Verifier, sample_rollouts

KEEP_RULES = ("all_correct", "shortest")


def keep_mask(batch: RolloutBatch, references: Sequence[Any], verifier: Verifier, budget: int,
              rule: str = "all_correct") -> list[bool]:
    """True exactly for rollouts that finished (`<eos>`) within `budget` tokens and that the verifier accepts.

    rule='shortest' further keeps, per prompt, only the shortest of those (an ablation; the paper keeps all).
    """
    if rule not in KEEP_RULES:
        raise BriskError(f"unknown keep rule {rule!r}: use one of {', '.join(KEEP_RULES)}")
    keep = [r.finished and r.length <= budget and bool(verifier(r.text, references[r.prompt_index]))
            for r in batch.rollouts]
    if rule == "shortest":
        best: dict[int, int] = {}
        for i, r in enumerate(batch.rollouts):
            if keep[i] and (r.prompt_index not in best or r.length < batch.rollouts[best[r.prompt_index]].length):
                best[r.prompt_index] = i
        keep = [i in best.values() for i in range(len(keep))]
    return keep


@dataclass
class OPSFTConfig:
    """Rounds of rollouts: prompts x n samples at temperature T, budget L, one NLL step per round."""

    budget: int = 40
    samples: int = 8
    prompts_per_round: int = 16
    rounds: int = 40
    temperature: float = 1.0
    learning_rate: float = 1e-4
    keep: str = "all_correct"
    stop_kept_fraction: float | None = None  # stop when this fraction of samples is kept (all correct and short)
    seed: int = 0
    generation_config: Any = None  # a GenerationConfig whose sampling settings replace plain sampling at `temperature`

    def check(self) -> None:
        """Reject settings that cannot run, with the fix in the message."""
        if self.budget < 2:
            raise BriskError(f"--budget must be >= 2 tokens (an answer needs at least 'answer N'), got {self.budget}")
        if self.samples < 1 or self.rounds < 1 or self.prompts_per_round < 1:
            raise BriskError("--samples, --rounds and prompts per round must be >= 1")
        if self.temperature <= 0:
            raise BriskError(f"--temperature must be > 0, got {self.temperature}")
        if self.keep not in KEEP_RULES:
            raise BriskError(f"unknown keep rule {self.keep!r}: use one of {', '.join(KEEP_RULES)}")


def on_policy_sft(model, tokenizer, examples: Sequence[Any], verifier: Verifier, config: OPSFTConfig,
                  prompt_of: Callable[[Any], str] = lambda e: e.prompt,
                  on_round: Callable[[int, dict], None] | None = None) -> list[dict]:
    """Train `model` in place by On-Policy SFT on `examples`; returns one log record per round."""
    config.check()
    if not examples:
        raise BriskError("On-Policy SFT needs at least one training example")
    driver = StepDriver(model, tokenizer, config.learning_rate, config.rounds, config.seed)
    gen = torch.Generator().manual_seed(config.seed)
    logs: list[dict] = []
    for r in range(config.rounds):
        idx = torch.randint(len(examples), (config.prompts_per_round,), generator=gen).tolist()
        chosen = [examples[i] for i in idx]
        batch = sample_rollouts(model, tokenizer, [prompt_of(e) for e in chosen], config.samples, config.budget,
                                config.temperature, seed=config.seed * 100003 + r,
                                generation_config=config.generation_config)
        keep = keep_mask(batch, chosen, verifier, config.budget, config.keep)
        loss = driver.step(batch.features(keep))
        record = {"round": r, "kept": sum(keep), "sampled": len(keep), "loss": loss,
                  "mean_length": batch.mean_length(), "truncation_ratio": batch.truncation_ratio()}
        logs.append(record)
        if on_round:
            on_round(r, record)
        if config.stop_kept_fraction is not None and sum(keep) >= config.stop_kept_fraction * len(keep):
            break
    model.eval()
    return logs


def rollout_features(text, rollouts: Sequence[Any], verifier: Verifier, budget: int) -> tuple[list[dict], list[int]]:
    """Features of external rollouts that On-Policy SFT keeps: finished, within `budget` model tokens (the
    completion's tokens plus its end token) and accepted by the verifier; also every rollout's length."""
    from brisklm.core.text import as_text_layer
    from brisklm.zoo.textlm import IGNORE

    text = as_text_layer(text)
    features, lengths = [], []
    for r in rollouts:
        ids = text.encode(r.completion) if r.completion.strip() else []
        lengths.append(len(ids) + int(r.finished))
        if r.finished and lengths[-1] <= budget and bool(verifier(r.completion, r.example)):
            head, tail = text.prompt_ids(r.example.prompt), ids + [text.end_id]
            features.append({"input_ids": head + tail, "labels": [IGNORE] * len(head) + tail})
    return features, lengths


def sft_on_rollouts(model, tokenizer, rollouts: Sequence[Any], verifier: Verifier, config: OPSFTConfig,
                    on_round: Callable[[int, dict], None] | None = None) -> list[dict]:
    """On-Policy SFT on rollouts made elsewhere (vLLM, another cluster): each round takes the next
    prompts_per_round x samples rollouts of the file, keeps them by `keep_mask`'s rule and takes one NLL step."""
    config.check()
    per_round = config.prompts_per_round * config.samples
    rounds = min(config.rounds, -(-len(rollouts) // per_round))
    if rounds < 1:
        raise BriskError("no rollouts to train on")
    driver = StepDriver(model, tokenizer, config.learning_rate, rounds, config.seed)
    logs = []
    for r in range(rounds):
        chunk = rollouts[r * per_round:(r + 1) * per_round]
        features, lengths = rollout_features(tokenizer, chunk, verifier, config.budget)
        loss = driver.step(features)
        record = {"round": r, "kept": len(features), "sampled": len(chunk), "loss": loss,
                  "mean_length": sum(lengths) / len(lengths),
                  "truncation_ratio": sum(not x.finished for x in chunk) / len(chunk)}
        logs.append(record)
        if on_round:
            on_round(r, record)
    model.eval()
    return logs
