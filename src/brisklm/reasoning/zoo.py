"""Zoo recipes of the reasoning area: a verbose-CoT arithmetic base model that works, and a small student.

`arith-cot` replaces the earlier recipe of the same name (5 terms, batch 32 x 600 steps: 18% accuracy):
3-4 terms and batch 64 x 320 steps (see the README for its measured accuracy and time).
`arith-cot-student` is a deliberately small model (d=64, 2 layers) for the distillation benchmark.
"""

from __future__ import annotations

from brisklm.zoo.recipes import train_text_recipe
from brisklm.zoo.registry import ZooRecipe, register

# 3-4 terms mod 5 (2-3 steps, each followed by 0-3 redundant lines): verbose CoT ~58 tokens, minimal ~18.
# Mod 10 at this size learnt the format but not the sums in 320 steps (accuracy 0.077, it copied the term).
TASK_OPTIONS = dict(min_terms=3, max_terms=4, modulus=5)
STUDENT_SHAPE = dict(hidden_size=64, num_hidden_layers=2, num_attention_heads=2, num_key_value_heads=1,
                     intermediate_size=176)


register(ZooRecipe(
    name="arith-cot",
    description="multi-step arithmetic answered after a verbose, redundant chain of thought (reasoning area recipe)",
    task="cot_arithmetic",
    train=train_text_recipe,
    quality_metric="accuracy",
    options=dict(n_train=20000, n_test=300, max_new_tokens=120, evaluator="answers", task_options=TASK_OPTIONS,
                 train=dict(steps=320, batch_size=64, learning_rate=3e-3, log_every=40)),
))
register(ZooRecipe(
    name="arith-cot-student",
    description="small student (d=64, 2 layers) briefly trained on the verbose CoT, for distillation",
    task="cot_arithmetic",
    train=train_text_recipe,
    quality_metric="accuracy",
    options=dict(n_train=10000, n_test=200, max_new_tokens=120, evaluator="answers", shape=STUDENT_SHAPE, task_options=TASK_OPTIONS,
                 train=dict(steps=200, batch_size=32, learning_rate=3e-3, log_every=50)),
))
