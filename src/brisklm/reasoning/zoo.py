"""Zoo recipes of the reasoning area: a verbose-CoT arithmetic teacher strong enough to separate the methods, and a
small student.

`arith-cot` (3-4 terms mod 5, verbose CoT) is trained by a two-phase curriculum (`train_cot_curriculum`): first
on the *minimal* CoT (short sequences, so cheap steps: the model learns the step format and the mod-5 table), then
on the *verbose* CoT it is meant to produce (the redundant re-check lines that On-Policy SFT removes). Each phase
is its own Trainer (fresh AdamW and cosine schedule). The earlier one-phase recipe (verbose only, batch 64 x 320
steps) reached greedy accuracy 0.357 (chance 0.2); the README's reasoning section has this recipe's measured
accuracy and training time.
`arith-cot-student` is a smaller model (d=96, 3 layers), part-trained by a shorter curriculum, for distillation.
"""

from __future__ import annotations

import tempfile
from pathlib import Path
from typing import Any

from brisklm.tasks import get_task
from brisklm.zoo.architecture import count_parameters, new_model, tiny_llama_config
from brisklm.zoo.recipes import EVALUATORS, build_tokenizer_for
from brisklm.zoo.registry import ZooRecipe, register
from brisklm.zoo.textlm import TrainOptions, encode_example, train_lm

# 3-4 terms mod 5 (2-3 steps, each followed by 0-3 redundant lines): verbose CoT ~58 tokens, minimal ~18.
# Mod 10 at this size learnt the format but not the sums in 320 steps (accuracy 0.077, it copied the term).
TASK_OPTIONS = dict(min_terms=3, max_terms=4, modulus=5)
STUDENT_SHAPE = dict(hidden_size=96, num_hidden_layers=3, num_attention_heads=4, num_key_value_heads=2,
                     intermediate_size=256)
# The teacher's curriculum: (CoT style, Trainer settings) per phase; the last phase's style is what it generates.
TEACHER_PHASES = (
    ("minimal", dict(steps=400, batch_size=64, learning_rate=3e-3, log_every=50)),
    ("verbose", dict(steps=250, batch_size=64, learning_rate=2e-3, log_every=50)),
)
# The student's shorter curriculum: it should end part-trained (well above chance, below the teacher), so that
# distillation has room to move it and the objectives can be told apart by accuracy.
STUDENT_PHASES = (
    ("minimal", dict(steps=250, batch_size=32, learning_rate=3e-3, log_every=50)),
    ("verbose", dict(steps=100, batch_size=32, learning_rate=2e-3, log_every=50)),
)


def train_cot_curriculum(recipe: ZooRecipe, out_dir: Path, seed: int) -> dict[str, Any]:
    """Train one model through `options["phases"]` (style, train settings) in order, save it, and measure greedy
    accuracy on the last phase's style (test split)."""
    opts = recipe.options
    phases = opts["phases"]
    task = get_task(recipe.task, **opts["task_options"], style=phases[-1][0])
    tokenizer = build_tokenizer_for(task)  # the vocabulary does not depend on the style
    config = tiny_llama_config(len(tokenizer), opts.get("size", "tiny"), pad_token_id=tokenizer.pad_token_id,
                               bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
                               **opts.get("shape", {}))
    model = new_model(config, seed)
    record: dict[str, Any] = {"phases": []}
    for style, train in phases:
        phase_task = get_task(recipe.task, **opts["task_options"], style=style)
        features = [encode_example(tokenizer, e) for e in phase_task.examples("train", opts["n_train"], seed=seed)]
        with tempfile.TemporaryDirectory() as tmp:
            stats = train_lm(model, tokenizer, features, TrainOptions(seed=seed, **train), tmp)
        record["phases"].append({"style": style, "steps": train["steps"], **stats})
    model.save_pretrained(out_dir)
    tokenizer.save_pretrained(out_dir)
    test_examples = task.examples("test", opts["n_test"], seed=seed)
    quality = EVALUATORS[opts["evaluator"]](model, tokenizer, task, test_examples, opts)
    return {**quality, "parameters": count_parameters(model), "train_steps": sum(t["steps"] for _, t in phases),
            "train_examples": opts["n_train"], "test_examples": len(test_examples),
            "train_seconds": sum(p["train_seconds"] for p in record["phases"]), **record}


register(ZooRecipe(
    name="arith-cot",
    description="multi-step arithmetic answered after a verbose, redundant chain of thought (reasoning area recipe; "
                "curriculum: minimal CoT, then verbose)",
    task="cot_arithmetic",
    train=train_cot_curriculum,
    quality_metric="accuracy",
    options=dict(n_train=20000, n_test=300, max_new_tokens=120, evaluator="answers", task_options=TASK_OPTIONS,
                 phases=TEACHER_PHASES),
))
register(ZooRecipe(
    name="arith-cot-student",
    description="small student (d=96, 3 layers) briefly trained by the same curriculum, for distillation",
    task="cot_arithmetic",
    train=train_cot_curriculum,
    quality_metric="accuracy",
    options=dict(n_train=10000, n_test=200, max_new_tokens=120, evaluator="answers", shape=STUDENT_SHAPE,
                 task_options=TASK_OPTIONS, phases=STUDENT_PHASES),
))
