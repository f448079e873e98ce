"""The generic text-model recipe of the zoo, and its offline-translation and mixed-difficulty LM models.

Areas register their own models (e.g. arith-cot in brisklm.reasoning.zoo) with `train_text_recipe`.
"""

from __future__ import annotations

import math
import tempfile
from pathlib import Path
from typing import Any

from brisklm.eval.metrics import bleu, exact_match_accuracy
from brisklm.tasks import get_task
from brisklm.tasks.tokenizer import build_word_tokenizer
from brisklm.zoo.architecture import count_parameters, new_model, tiny_llama_config
from brisklm.zoo.registry import ZooRecipe, register
from brisklm.zoo.textlm import TrainOptions, encode_example, encode_plain_text, greedy_complete, token_losses, train_lm


def build_tokenizer_for(task):
    """The word-level tokenizer of a task's vocabulary."""
    return build_word_tokenizer(task.vocabulary())


def train_text_recipe(recipe: ZooRecipe, out_dir: Path, seed: int) -> dict[str, Any]:
    """Train a prompt/completion (or plain LM) model on a task, save it, and measure it on the test split."""
    opts = recipe.options
    task = get_task(recipe.task, **opts.get("task_options", {}))
    tokenizer = build_tokenizer_for(task)
    train_examples = task.examples("train", opts["n_train"], seed=seed)
    encode = encode_plain_text if opts.get("plain_lm") else encode_example
    if opts.get("plain_lm"):
        features = [encode(tokenizer, e.prompt) for e in train_examples]
    else:
        features = [encode(tokenizer, e) for e in train_examples]
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
    quality = EVALUATORS[opts["evaluator"]](model, tokenizer, task, test_examples, opts)
    return {**quality, "parameters": count_parameters(model), "train_steps": train_options.steps,
            "train_examples": len(train_examples), "test_examples": len(test_examples), **stats}


def evaluate_bleu(model, tokenizer, task, examples, opts) -> dict[str, float]:
    hyps = greedy_complete(model, tokenizer, [e.prompt for e in examples], opts["max_new_tokens"])
    refs = [e.completion for e in examples]
    return {"bleu": bleu(hyps, refs), "exact_match": exact_match_accuracy(hyps, refs)}


def evaluate_answers(model, tokenizer, task, examples, opts) -> dict[str, float]:
    outs = greedy_complete(model, tokenizer, [e.prompt for e in examples], opts["max_new_tokens"])
    correct = [task.is_correct(o, e) for o, e in zip(outs, examples)]
    lengths = [len(o.split()) for o in outs]
    return {"accuracy": sum(correct) / len(correct), "mean_completion_words": sum(lengths) / len(lengths)}


def evaluate_lm(model, tokenizer, task, examples, opts) -> dict[str, float]:
    """Perplexity overall and next-token loss per token difficulty (easy / hard / random)."""
    features = [encode_plain_text(tokenizer, e.prompt) for e in examples]
    losses = token_losses(model, features, tokenizer.pad_token_id)
    by_kind: dict[str, list[float]] = {}
    every: list[float] = []
    for e, row in zip(examples, losses):
        kinds = e.meta["difficulty"]
        for kind, loss in zip(kinds, row[1:]):  # row[i+1] predicts word i (after <bos>)
            if not math.isnan(loss):
                by_kind.setdefault(kind, []).append(loss)
                every.append(loss)
    out = {"perplexity": math.exp(sum(every) / len(every))}
    for kind, values in sorted(by_kind.items()):
        out[f"loss_{kind}"] = sum(values) / len(values)
    return out


EVALUATORS = {"bleu": evaluate_bleu, "answers": evaluate_answers, "lm": evaluate_lm}

register(ZooRecipe(
    name="translate-offline",
    description="simultaneous-translation task, trained offline (read the whole source, then translate)",
    task="translation",
    train=train_text_recipe,
    quality_metric="bleu",
    options=dict(n_train=20000, n_test=300, evaluator="bleu", max_new_tokens=48,
                 train=dict(steps=600, batch_size=32, learning_rate=3e-3)),
))
register(ZooRecipe(
    name="mixed-lm",
    description="language model on mixed-difficulty text (copies, patterns, sums, noise)",
    task="mixed_lm",
    train=train_text_recipe,
    quality_metric="perplexity",
    options=dict(n_train=20000, n_test=300, evaluator="lm", plain_lm=True, size="deep",
                 train=dict(steps=600, batch_size=32, learning_rate=3e-3)),
))
