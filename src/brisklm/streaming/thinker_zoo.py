"""Zoo recipes of StreamingThinker: a think-while-reading model and a batch-CoT baseline on the same data and budget."""

from __future__ import annotations

import tempfile
from pathlib import Path
from typing import Any, Callable, Sequence

from brisklm.core.timing import one_torch_thread
from brisklm.zoo.architecture import count_parameters, new_model, tiny_llama_config
from brisklm.zoo.registry import ZooRecipe, register
from brisklm.zoo.textlm import TrainOptions

STREAMING_MODEL, BATCH_MODEL = "streaming-thinker", "thinker-batch-cot"


def thinker_accuracy(model, tokenizer, examples: Sequence, depths: Sequence[str], mode: str,
                     progress: Callable = lambda x, **_: x) -> dict[str, float]:
    """Answer accuracy per depth and distractor skip rate of a model run through ThinkerSession on examples."""
    from brisklm.streaming.thinker.session import think_depths

    correct = {d: 0 for d in depths}
    skipped = distractors = 0
    for e in progress(list(examples), desc=f"thinker {mode}"):
        results = think_depths(model, tokenizer, e, depths, mode=mode)
        for depth, result in results.items():
            correct[depth] += result.answer == e.answer
        for unit, is_distractor in zip(results[depths[0]].units[1:], e.meta["distractors"]):
            if is_distractor:
                distractors += 1
                skipped += unit.split()[0] == "skip"
    n = max(len(examples), 1)
    return {**{f"accuracy_{d}": correct[d] / n for d in depths}, "skip_rate": skipped / max(distractors, 1)}


def train_thinker_recipe(recipe: ZooRecipe, out_dir: Path, seed: int) -> dict[str, Any]:
    """Train a thinker model (streaming mask + group positions, or batch CoT), save it, score it on the test split."""

    from brisklm.streaming.thinker.data import DEPTHS, thinker_task, thinker_tokenizer
    from brisklm.streaming.thinker.train import train_thinker

    opts = recipe.options
    task = thinker_task(**opts["task_options"])
    tokenizer = thinker_tokenizer(task)
    examples = task.examples("train", opts["n_train"], seed=seed)
    config = tiny_llama_config(len(tokenizer), "tiny", pad_token_id=tokenizer.pad_token_id,
                               bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id)
    model = new_model(config, seed)
    options = TrainOptions(seed=seed, **opts["train"])
    with tempfile.TemporaryDirectory() as tmp:  # training: every core (zoo.store.training_threads)
        stats = train_thinker(model, tokenizer, examples, options, tmp, mode=opts["mode"])
    model.save_pretrained(out_dir)
    tokenizer.save_pretrained(out_dir)
    with one_torch_thread():  # per-token decoding: one thread
        test = task.examples("test", opts["n_test"], seed=seed)
        quality = thinker_accuracy(model, tokenizer, test, DEPTHS, opts["mode"])
    return {"accuracy": quality["accuracy_D2"], **quality, "mode": opts["mode"], "parameters": count_parameters(model),
            "train_steps": options.steps, "train_examples": len(examples), "test_examples": len(test), **stats}


COMMON = dict(n_train=30000, n_test=50, task_options={},
              train=dict(steps=800, batch_size=32, learning_rate=3e-3))
register(ZooRecipe(
    name=STREAMING_MODEL,
    description="StreamingThinker on streaming arithmetic: a unit per fact while reading (sentence-level mask, "
                "group positions), then D1/D2/D3 deep reasoning (accuracy = D2)",
    task="streaming_arithmetic",
    train=train_thinker_recipe,
    quality_metric="accuracy",
    options=dict(COMMON, mode="streaming"),
))
register(ZooRecipe(
    name=BATCH_MODEL,
    description="baseline: batch CoT on the same units and budget (read everything, then think; causal, "
                "contiguous positions) (accuracy = D2)",
    task="streaming_arithmetic",
    train=train_thinker_recipe,
    quality_metric="accuracy",
    options=dict(COMMON, mode="batch"),
))
