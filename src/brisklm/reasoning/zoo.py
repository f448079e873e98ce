"""Zoo recipes of the reasoning area: a verbose-CoT arithmetic teacher strong enough to separate the methods, and a
part-trained student for distillation.

Both train on the *re-check-at-end* layout of `cot_arithmetic` (`recheck="end"`): the minimal steps come first,
unbroken (`3 + 4 = 2 ; 2 - 1 = 1 ;`), then 0-3 redundant re-check lines per step, all about the final step, then
the answer. The earlier layout (an opener restating the problem, and re-check lines after every step) made the
position of the next operand vary from example to example: at batch 64 x 320 steps the teacher reached greedy
accuracy 0.357 (chance 0.2), and a student distilled from it stayed at chance. With the steps unbroken the operand
of step k sits at a fixed distance, as in the minimal CoT, and the over-thinking that On-Policy SFT removes is the
re-checking after the answer is known. 800 steps: 500 gave 0.77 and 650 passed on one seed of two
(docs/reasoning.md has the measured accuracy and time).
"""

from __future__ import annotations

from brisklm.zoo.recipes import train_text_recipe
from brisklm.zoo.registry import ZooRecipe, register

# 3-4 terms mod 5 (2-3 steps): verbose CoT ~47 tokens, minimal ~17.
# Mod 10 at this size learnt the format but not the sums in 320 steps (accuracy 0.077, it copied the term).
TASK_OPTIONS = dict(min_terms=3, max_terms=4, modulus=5, recheck="end")
STUDENT_SHAPE = dict(hidden_size=96, num_hidden_layers=3, num_attention_heads=4, num_key_value_heads=2,
                     intermediate_size=256)


register(ZooRecipe(
    name="arith-cot",
    description="multi-step arithmetic answered after a verbose chain of thought that re-checks the final step "
                "(reasoning area teacher; measured greedy accuracy 1.00 on its 300 test prompts, chance 0.2)",
    task="cot_arithmetic",
    train=train_text_recipe,
    quality_metric="accuracy",
    options=dict(n_train=20000, n_test=300, max_new_tokens=120, evaluator="answers", task_options=TASK_OPTIONS,
                 train=dict(steps=800, batch_size=32, learning_rate=3e-3, log_every=50),
                 threads=1),  # measured on one thread (1.00 on seeds 0 and 1; 650 steps fell to 0.447 on seed 1)
))
register(ZooRecipe(
    name="arith-cot-student",
    description="smaller student (d=96, 3 layers), part-trained on the same verbose CoT, for distillation "
                "(measured greedy accuracy 0.44)",
    task="cot_arithmetic",
    train=train_text_recipe,
    quality_metric="accuracy",
    options=dict(n_train=10000, n_test=200, max_new_tokens=120, evaluator="answers", shape=STUDENT_SHAPE,
                 task_options=TASK_OPTIONS, train=dict(steps=250, batch_size=32, learning_rate=3e-3, log_every=50)),
))
