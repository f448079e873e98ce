"""Latent CoT, slow quality test on the trained zoo model: every method trains above chance on the task.

Same settings as `brisk bench reasoning --quick` (LATENT_SETTINGS["quick"]): from `arith-cot`, 100 steps of
explicit minimal-CoT fine-tuning (stage 0), then stage 1 of each method (the first step a continuous thought /
dropped after the pauses / its 6 tokens internalized), greedy on 200 test prompts. Chance is 0.2 (answers mod 5).
Measured with the earlier teacher (the quick benchmark run, seed 0): stage 0 accuracy 0.70 with 18.1 generated
tokens; stage 1: pause 1.00, coconut 0.515, internalize 0.355, each with 12.1 generated tokens; the floors are
about 3 standard errors (n = 200) below those. With the current teacher (0.77, `recheck="end"` layout;
benchmarks/results/reasoning.json, seed 0; seeds 0-2 in brackets) stage 0 reaches 1.00 but stage 1 gives pause
0.18 (0.18 / 0.21 / 0.78), coconut 0.315 (0.315 / 0.35 / 0.405), internalize 0.405 (0.405 / 0.535 / 0.36): pause
and Coconut were marked as expected failures. With the 800-step teacher (1.00; benchmark, seeds 0 / 1 / 2) stage 1
gives pause 1.00 / 0.86 / 0.765, coconut 0.69 / 0.855 / 0.20, internalize 0.335 / 0.435 / 0.285; this test passed
for all three methods at seed 0 (pause and coconut as unexpected passes), but the spread over seeds keeps the marks.
The later stages (no explicit step left) stay near chance at this training budget.
"""

from __future__ import annotations

import copy

import pytest

from brisklm.reasoning.bench import LATENT_SETTINGS
from brisklm.reasoning.latent import LatentConfig, evaluate_explicit, evaluate_latent, train_explicit, train_latent
from brisklm.reasoning.zoo import TASK_OPTIONS
from brisklm.tasks.cot_arithmetic import CotArithmeticTask, is_correct
from brisklm.zoo.store import load

pytestmark = pytest.mark.slow
CHANCE = 0.2


@pytest.fixture(scope="module")
def stage0():
    base = load("arith-cot")
    task = CotArithmeticTask(**TASK_OPTIONS)
    train, test = task.examples("train", 4000, seed=0), task.examples("test", 200, seed=0)
    train_explicit(base.model, base.tokenizer, train, LATENT_SETTINGS["quick"]["stage0"], learning_rate=1e-3, seed=0)
    explicit = evaluate_explicit(base.model, base.tokenizer, test, is_correct)
    assert explicit["accuracy"] >= 0.8, explicit  # measured 1.00 (200 prompts; 0.70 with the earlier teacher)
    return base, train, test, explicit


REGRESSED = pytest.mark.xfail(reason="unstable over seeds: with the 800-step teacher pause 1.00 / 0.86 / 0.765 and "
                                     "coconut 0.69 / 0.855 / 0.20 at stage 1, seeds 0-2 (docs/reasoning.md)",
                              strict=False)


@pytest.mark.parametrize("method, floor", [pytest.param("pause", 0.8, marks=REGRESSED),
                                           pytest.param("coconut", 0.4, marks=REGRESSED), ("internalize", 0.27)])
def test_latent_method_trains_above_chance_with_fewer_generated_tokens(stage0, method, floor):
    base, train, test, explicit = stage0
    model, tok = copy.deepcopy(base.model), copy.deepcopy(base.tokenizer)
    steps, lr = LATENT_SETTINGS["quick"][method]
    config = LatentConfig(method=method, stages=1, steps_per_stage=steps, learning_rate=lr, seed=0)
    train_latent(model, tok, train, config)
    result = evaluate_latent(model, tok, test, is_correct, config)
    assert result["accuracy"] >= floor > CHANCE, result
    assert result["mean_generated_tokens"] < explicit["mean_generated_tokens"] - 3, (result, explicit)
