"""Zoo recipes of the reasoning area: a verbose-CoT arithmetic base model that works, and a small student.

`arith-cot` replaces the earlier recipe of the same name (5 terms, batch 32 x 600 steps: 18% accuracy):
3-4 terms and batch 64 x 320 steps (see the README for its measured accuracy and time).
`arith-cot-student` is a deliberately small model (d=64, 2 layers) for the distillation benchmark.
"""

from __future__ import annotations

import tempfile
from pathlib import Path
from typing import Any

from brisklm.tasks import get_task
from brisklm.tasks.tokenizer import build_word_tokenizer
from brisklm.zoo.architecture import count_parameters, new_model, tiny_llama_config
from brisklm.zoo.recipes import EVALUATORS
from brisklm.zoo.registry import ZooRecipe, register
from brisklm.zoo.textlm import TrainOptions, encode_example, train_lm

# 3-4 terms mod 5 (2-3 steps, each followed by 0-3 redundant lines): verbose CoT ~58 tokens, minimal ~18.
# Mod 10 at this size learnt the format but not the sums in 320 steps (accuracy 0.077, it copied the term).
TASK_OPTIONS = dict(min_terms=3, max_terms=4, modulus=5)
STUDENT_SHAPE = dict(hidden_size=64, num_hidden_layers=2, num_attention_heads=2, num_key_value_heads=1,
                     intermediate_size=176)


def train_cot_recipe(recipe: ZooRecipe, out_dir: Path, seed: int) -> dict[str, Any]:
    """Train a prompt/completion model of a configurable shape on the CoT task and measure greedy accuracy."""
    opts = recipe.options
    task = get_task(recipe.task, **opts.get("task_options", {}))
    tokenizer = build_word_tokenizer(task.vocabulary())
    features = [encode_example(tokenizer, e) for e in task.examples("train", opts["n_train"], seed=seed)]
    config = tiny_llama_config(len(tokenizer), opts.get("size", "tiny"), pad_token_id=tokenizer.pad_token_id,
                               bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
                               **opts.get("shape", {}))
    model = new_model(config, seed)
    train_options = TrainOptions(seed=seed, **opts.get("train", {}))
    with tempfile.TemporaryDirectory() as tmp:
        stats = train_lm(model, tokenizer, features, train_options, tmp)
    model.save_pretrained(out_dir)
    tokenizer.save_pretrained(out_dir)
    test_examples = task.examples("test", opts["n_test"], seed=seed)
    quality = EVALUATORS["answers"](model, tokenizer, task, test_examples, opts)
    return {**quality, "parameters": count_parameters(model), "train_steps": train_options.steps,
            "train_examples": len(features), "test_examples": len(test_examples), **stats}


register(ZooRecipe(
    name="arith-cot",
    description="multi-step arithmetic answered after a verbose, redundant chain of thought (reasoning area recipe)",
    task="cot_arithmetic",
    train=train_cot_recipe,
    quality_metric="accuracy",
    options=dict(n_train=20000, n_test=300, max_new_tokens=120, task_options=TASK_OPTIONS,
                 train=dict(steps=320, batch_size=64, learning_rate=3e-3, log_every=40)),
))
register(ZooRecipe(
    name="arith-cot-student",
    description="small student (d=64, 2 layers) briefly trained on the verbose CoT, for distillation",
    task="cot_arithmetic",
    train=train_cot_recipe,
    quality_metric="accuracy",
    options=dict(n_train=10000, n_test=200, max_new_tokens=120, shape=STUDENT_SHAPE, task_options=TASK_OPTIONS,
                 train=dict(steps=200, batch_size=32, learning_rate=3e-3, log_every=50)),
))
