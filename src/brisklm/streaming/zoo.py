"""Zoo recipes of the streaming area: a GPE wait-k translation model and the interleaved baseline."""

from __future__ import annotations

import tempfile
from pathlib import Path
from typing import Any

from brisklm.core.timing import one_torch_thread
from brisklm.eval.metrics import bleu
from brisklm.tasks import get_task
from brisklm.zoo.architecture import count_parameters, new_model, tiny_llama_config
from brisklm.zoo.recipes import build_tokenizer_for
from brisklm.zoo.registry import ZooRecipe, register
from brisklm.zoo.textlm import TrainOptions


def train_streaming_recipe(recipe: ZooRecipe, out_dir: Path, seed: int) -> dict[str, Any]:
    """Train a streaming translation model (GPE or interleaved), save it, and score wait-k BLEU on the test split."""

    from brisklm.streaming.policies import gpe_wait_k, interleaved_wait_k
    from brisklm.streaming.train import train_gpe, train_interleaved

    opts = recipe.options
    task = get_task(recipe.task)
    tokenizer = build_tokenizer_for(task)
    train_examples = task.examples("train", opts["n_train"], seed=seed)
    if opts.get("init_from"):  # GPE as in the paper: fine-tune a batch-trained LM with the streaming mask
        from brisklm.zoo.store import load

        model = load(opts["init_from"], seed=seed).model
        model.train()
    else:
        config = tiny_llama_config(len(tokenizer), "tiny", pad_token_id=tokenizer.pad_token_id,
                                   bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id)
        model = new_model(config, seed)
    options = TrainOptions(seed=seed, **opts["train"])
    k_range = tuple(opts["k_range"])
    with tempfile.TemporaryDirectory() as tmp:  # training: every core (zoo.store.training_threads)
        if opts["layout"] == "gpe":
            stats = train_gpe(model, tokenizer, train_examples, k_range, options, tmp)
        else:
            stats = train_interleaved(model, tokenizer, train_examples, k_range, options, tmp)
    model.save_pretrained(out_dir)
    tokenizer.save_pretrained(out_dir)
    with one_torch_thread():  # per-token decoding: one thread
        test = task.examples("test", opts["n_test"], seed=seed)
        sources, refs = [e.meta["source_words"] for e in test], [e.completion for e in test]
        decode = gpe_wait_k if opts["layout"] == "gpe" else interleaved_wait_k
        quality = {f"bleu_k{k}": bleu(decode(model, tokenizer, sources, k).hypotheses, refs) for k in opts["eval_k"]}
    return {"bleu": quality[f"bleu_k{opts['eval_k'][0]}"], **quality, "k_range": list(k_range),
            "parameters": count_parameters(model), "train_steps": options.steps,
            "train_examples": len(train_examples), "test_examples": len(test), **stats}


COMMON = dict(n_train=20000, n_test=200, k_range=(1, 5), eval_k=(3, 1, 5),
              train=dict(steps=500, batch_size=32, learning_rate=3e-3))
register(ZooRecipe(
    name="translate-gpe",
    description="translate-offline fine-tuned with Group Position Encoding and the wait-k mask, k in 1..5 (bleu = wait-3)",
    task="translation",
    train=train_streaming_recipe,
    quality_metric="bleu",
    options=dict(COMMON, layout="gpe", init_from="translate-offline",
                 train=dict(steps=300, batch_size=32, learning_rate=1e-3)),
))
register(ZooRecipe(
    name="translate-interleaved",
    description="baseline: simultaneous translation in arrival order (source sees target), k in 1..5 (bleu = wait-3)",
    task="translation",
    train=train_streaming_recipe,
    quality_metric="bleu",
    options=dict(COMMON, layout="interleaved"),
))
