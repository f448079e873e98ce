"""Zoo recipe `icl-lm`: a tiny LM pretrained on ICL sequences mixed with knowledge statements.

Recognisable tasks (meaningful labels such as positive/negative) follow one fixed rule that the knowledge statements
also state ("sentiment of great is positive"); arbitrary-label tasks (foo/bar) get a fresh random rule in every
sequence, so the only way to answer them is to copy a same-key demonstration. Concept statements ("positive is a
sentiment" written as "great is positive sentiment") tie label words to the word naming their task, the tiny-corpus
stand-in for the co-occurrences a real pretraining corpus provides; PIR measures whether that concept surfaces at
the label positions of an ICL prompt.
"""

from __future__ import annotations

import random
import tempfile
from pathlib import Path
from typing import Any

from brisklm.tasks.base import Example, make_rng
from brisklm.tasks.icl import ARROW, FILLERS, TASK_SPECS, IclTask, knowledge_statements, label_rule
from brisklm.tasks.tokenizer import build_word_tokenizer
from brisklm.zoo.architecture import count_parameters, new_model, tiny_llama_config
from brisklm.zoo.registry import ZooRecipe, register
from brisklm.zoo.textlm import TrainOptions, encode_plain_text, train_lm

RECOGNISABLE = tuple(n for n, s in TASK_SPECS.items() if s.recognisable)
ARBITRARY = tuple(n for n, s in TASK_SPECS.items() if not s.recognisable)
EVAL_RULE_SEED = 0  # arbitrary tasks are evaluated on rule seed 0, which pretraining never uses


def concept_statements() -> list[str]:
    """'great is positive sentiment': each recognisable label word followed by the word naming its task."""
    out = []
    for spec in TASK_SPECS.values():
        if spec.recognisable:
            out += [f"{key} is {label} {spec.domain}" for key, label in sorted(label_rule(spec).items())]
    return out


def icl_sequences(n: int, seed: int, max_shots: int = 8) -> list[Example]:
    """n training ICL examples: half recognisable (fixed rule), half arbitrary (a fresh rule per sequence)."""
    rng = make_rng("icl-lm-corpus", seed)
    out: list[Example] = []
    while len(out) < n:
        shots, similar = rng.randint(1, max_shots), rng.random() < 0.5
        if rng.random() < 0.5:
            task = IclTask(RECOGNISABLE, shots=shots, with_similar=similar)
        else:
            task = IclTask(ARBITRARY, shots=shots, with_similar=similar, rule_seed=rng.randint(1, 10**6))
        out += task.examples("train", 8, seed=rng.randint(0, 10**9))
    return out[:n]


def copy_sequences(n: int, seed: int) -> list[str]:
    """Arbitrary-label demonstrations whose keys repeat (drawn with replacement from a few keys, fresh rule each):
    every repeated key's label can only be predicted by copying, which teaches the induction that Q4 needs."""
    rng = make_rng("icl-lm-copy", seed)
    out = []
    for _ in range(n):
        spec = TASK_SPECS[rng.choice(ARBITRARY)]
        rule = label_rule(spec, rng.randint(1, 10**6))
        keys = rng.sample(sorted(rule), rng.randint(3, 6))
        demos = [rng.choice(keys) for _ in range(rng.randint(4, 10))]
        out.append(" ; ".join(f"{rng.choice(FILLERS)} {k} {ARROW} {rule[k]}" for k in demos))
    return out


def corpus(n_train: int, seed: int, statement_fraction: float, concepts: bool, copy_fraction: float = 0.0) -> list[str]:
    """Plain-text pretraining lines: ICL sequences (prompt + label), copy practice and repeated knowledge statements."""
    facts = knowledge_statements() + (concept_statements() if concepts else [])
    n_facts = int(statement_fraction * n_train)
    n_copy = int(copy_fraction * n_train)
    rng = random.Random(seed)
    lines = [f"{e.prompt} {e.completion}" for e in icl_sequences(n_train - n_facts - n_copy, seed)]
    lines += copy_sequences(n_copy, seed)
    lines += [rng.choice(facts) for _ in range(n_facts)]
    rng.shuffle(lines)
    return lines


def train_icl_recipe(recipe: ZooRecipe, out_dir: Path, seed: int) -> dict[str, Any]:
    """Pretrain the ICL model, save it, and measure recognition (no similar demo) and copying (similar demo)."""
    from brisklm.analysis.icl import evaluate_condition  # local import: icl imports the zoo lazily too

    opts = recipe.options
    tokenizer = build_word_tokenizer(IclTask().vocabulary())
    features = [encode_plain_text(tokenizer, line) for line in
                corpus(opts["n_train"], seed, opts["statement_fraction"], opts["concepts"], opts["copy_fraction"])]
    config = tiny_llama_config(len(tokenizer), opts.get("size", "tiny"), pad_token_id=tokenizer.pad_token_id,
                               bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id)
    model = new_model(config, seed)
    train_options = TrainOptions(seed=seed, **opts["train"])
    with tempfile.TemporaryDirectory() as tmp:
        stats = train_lm(model, tokenizer, features, train_options, tmp)
    model.save_pretrained(out_dir)
    tokenizer.save_pretrained(out_dir)
    n = opts["n_test"]
    rec = evaluate_condition(model, tokenizer, RECOGNISABLE, shots=4, with_similar=False, n=n, seed=seed, modes=())
    arb = evaluate_condition(model, tokenizer, ARBITRARY, shots=4, with_similar=False, n=n, seed=seed, modes=())
    copy = evaluate_condition(model, tokenizer, ARBITRARY, shots=4, with_similar=True, n=n, seed=seed, modes=())
    return {"accuracy_recognisable": rec.accuracy, "accuracy_arbitrary": arb.accuracy,
            "accuracy_arbitrary_similar": copy.accuracy, "parameters": count_parameters(model),
            "train_steps": train_options.steps, "train_examples": len(features), "test_examples": n, **stats}


register(ZooRecipe(
    name="icl-lm",
    description="ICL pretraining: recognisable (meaningful labels) and arbitrary-label tasks, plus knowledge statements",
    task="icl",
    train=train_icl_recipe,
    quality_metric="accuracy_recognisable",
    options=dict(n_train=20000, n_test=200, statement_fraction=0.2, copy_fraction=0.4, concepts=True, size="tiny",
                 train=dict(steps=600, batch_size=32, learning_rate=3e-3)),
))
