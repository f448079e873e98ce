"""Rollout metrics of a reasoning model: avg@n accuracy, unbiased pass@k, CoT length, truncation, budgets, entropy."""

from __future__ import annotations

from typing import Any, Sequence

from brisklm.eval.accuracy import accuracy_under_budget, mean_pass_at_k
from brisklm.reasoning.rollout import Verifier, sample_rollouts, token_entropy


def evaluate_rollouts(model, tokenizer, examples: Sequence[Any], verifier: Verifier, n: int = 1,
                      max_new_tokens: int = 120, temperature: float = 1.0, budgets: Sequence[int] = (),
                      k: int | None = None, seed: int = 0, with_entropy: bool = False,
                      generation_config=None) -> dict[str, Any]:
    """Sample n completions per example and measure them; accuracy at budget b = correct and finished within b."""
    batch = sample_rollouts(model, tokenizer, [e.prompt for e in examples], n, max_new_tokens, temperature, seed=seed,
                            do_sample=temperature > 0, generation_config=generation_config)
    ok = [r.finished and bool(verifier(r.text, examples[r.prompt_index])) for r in batch.rollouts]
    out: dict[str, Any] = {
        "accuracy": sum(ok) / len(ok),
        "mean_length": batch.mean_length(),
        "truncation_ratio": batch.truncation_ratio(),
        "samples": len(ok),
    }
    correct_lengths = [r.length for r, good in zip(batch.rollouts, ok) if good]
    out["mean_length_correct"] = sum(correct_lengths) / len(correct_lengths) if correct_lengths else float("nan")
    if budgets:
        records = [{"correct": good, "length": r.length} for r, good in zip(batch.rollouts, ok)]
        out["accuracy_at_budget"] = {str(b): accuracy_under_budget(records, b) for b in budgets}
    if k is not None:
        per_prompt = [sum(ok[i * n:(i + 1) * n]) for i in range(len(examples))]
        out[f"pass@{k}"] = mean_pass_at_k([(n, c) for c in per_prompt], k)
    if with_entropy:
        out["entropy"] = token_entropy(model, batch)
    return out
