"""Reasoning area, slow tests on the trained zoo model: On-Policy SFT shortens the verbose CoT at kept accuracy.

Thresholds come from `brisk bench reasoning --quick` (same settings): greedy accuracy 0.367 -> 0.367 (chance 0.2),
greedy length 48.6 -> 24.8, sampled length 58.2 -> 29.0, kept fraction 0.05 -> 0.28 over 30 rounds.
"""

from __future__ import annotations

import pytest

from brisklm.reasoning.evaluate import evaluate_rollouts
from brisklm.reasoning.opsft import OPSFTConfig, on_policy_sft
from brisklm.reasoning.zoo import TASK_OPTIONS
from brisklm.tasks.cot_arithmetic import CotArithmeticTask, is_correct
from brisklm.zoo.store import load

pytestmark = pytest.mark.slow


def test_opsft_shortens_cot_and_keeps_accuracy():
    base = load("arith-cot")
    task = CotArithmeticTask(**TASK_OPTIONS)
    train, test = task.examples("train", 2000), task.examples("test", 128)
    greedy = lambda: evaluate_rollouts(base.model, base.tokenizer, test, is_correct, 1, 96, 0.0)
    sampled = evaluate_rollouts(base.model, base.tokenizer, test, is_correct, 1, 96, 1.0, seed=7)
    before = greedy()
    assert before["accuracy"] >= 0.3, before  # above chance (0.2); the tiny base model is weak (README)
    config = OPSFTConfig(budget=int(round(0.7 * sampled["mean_length"])), rounds=30, seed=0)
    logs = on_policy_sft(base.model, base.tokenizer, train, is_correct, config)
    after = greedy()
    assert after["mean_length"] <= 0.7 * before["mean_length"], (before, after)
    assert after["accuracy"] >= before["accuracy"] - 0.08, (before, after)
    assert sum(r["kept"] for r in logs[-5:]) > 2 * sum(r["kept"] for r in logs[:5])
