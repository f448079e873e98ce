"""Zoo recipes of ProactiveLLM on variable-lookahead translation (noun phrases of 1-4 words, particles 1-3 later).

All three fine-tune translate-gpe (same vocabulary) for the same steps on the same data, so they differ only
in the objective: fixed-lag wait-k masks (baseline), random monotone masks, and random masks + SPSD.
The proactive recipes also fit the decision probe on self-labelled training rows and save it beside the model.
"""

from __future__ import annotations

import tempfile
import time
from pathlib import Path
from typing import Any

from brisklm.core.timing import one_torch_thread
from brisklm.eval.metrics import bleu
from brisklm.tasks import get_task
from brisklm.zoo.architecture import count_parameters
from brisklm.zoo.registry import ZooRecipe, register
from brisklm.zoo.textlm import TrainOptions

TASK_OPTIONS = {"variable_lookahead": True}


def proactive_task():
    """The variable-lookahead translation task every proactive recipe, test and benchmark uses."""
    return get_task("translation", **TASK_OPTIONS)


def train_proactive_recipe(recipe: ZooRecipe, out_dir: Path, seed: int) -> dict[str, Any]:
    """Fine-tune the init model with the recipe's objective, fit the probe if proactive, save, and score."""

    from brisklm.streaming.proactive.heads import Head, adaptive_decode, auroc, save_probe, sufficiency_data, train_probe
    from brisklm.streaming.policies import gpe_wait_k
    from brisklm.streaming.proactive.train import ScheduleOptions, train_proactive
    from brisklm.streaming.train import train_gpe
    from brisklm.zoo.store import load

    opts = recipe.options
    task = proactive_task()
    loaded = load(opts["init_from"], seed=seed)
    model, tokenizer = loaded.model, loaded.tokenizer
    model.train()
    train_examples = task.examples("train", opts["n_train"], seed=seed)
    options = TrainOptions(seed=seed, **opts["train"])
    quality: dict[str, Any] = {}
    with tempfile.TemporaryDirectory() as tmp:  # training: every core (zoo.store.training_threads)
        if opts["objective"] == "wait-k":
            stats = train_gpe(model, tokenizer, train_examples, tuple(opts["k_range"]), options, tmp)
        else:
            stats = train_proactive(model, tokenizer, train_examples, options, tmp, spsd_lambda=opts["spsd"],
                                    schedule=ScheduleOptions(**opts["schedule"]))
    model.save_pretrained(out_dir)
    tokenizer.save_pretrained(out_dir)
    with one_torch_thread():  # per-token decoding and the probe's data: one thread
        test = task.examples("test", opts["n_test"], seed=seed)
        sources, refs = [e.meta["source_words"] for e in test], [e.completion for e in test]
        quality["bleu_k3"] = bleu(gpe_wait_k(model, tokenizer, sources, 3).hypotheses, refs)
        held_out = sufficiency_data(model, tokenizer, test, seed=seed)
        quality["auroc_entropy"] = auroc(-held_out.entropy, held_out.label)
        if opts["objective"] != "wait-k":
            start = time.perf_counter()
            probe = train_probe(sufficiency_data(model, tokenizer, train_examples[:opts["n_probe"]], seed=seed + 1),
                                seed=seed)
            save_probe(probe, out_dir)
            stats["probe_seconds"] = time.perf_counter() - start
            quality["auroc_probe"] = auroc(held_out.scores(probe)["probe"], held_out.label)
            result = adaptive_decode(model, tokenizer, sources, Head("probe", probe), 0.5)
            quality["bleu_probe_0.5"] = bleu(result.hypotheses, refs)
    metric = "bleu_k3" if opts["objective"] == "wait-k" else "bleu_probe_0.5"
    return {"bleu": quality[metric], **quality, "parameters": count_parameters(model), "train_steps": options.steps,
            "train_examples": len(train_examples), "test_examples": len(test), **stats}


COMMON = dict(init_from="translate-gpe", n_train=10000, n_test=100, n_probe=600,
              train=dict(steps=200, batch_size=32, learning_rate=1e-3))
SCHEDULE = dict(k_min=1, k_max=5, p_extra=0.3, max_extra_step=2, p_full=0.1)
register(ZooRecipe(
    name="translate-waitk-var",
    description="baseline: translate-gpe fine-tuned with fixed-lag wait-k masks (k in 1..7) on variable-lookahead "
                "translation (bleu = wait-3)",
    task="translation",
    train=train_proactive_recipe,
    quality_metric="bleu",
    options=dict(COMMON, objective="wait-k", k_range=(1, 7)),
))
register(ZooRecipe(
    name="translate-proactive-mask",
    description="ProactiveLLM ablation: monotonic random masks only (no SPSD) on variable-lookahead translation, "
                "with a self-labelled probe (bleu = probe head at 0.5)",
    task="translation",
    train=train_proactive_recipe,
    quality_metric="bleu",
    options=dict(COMMON, objective="proactive", spsd=0.0, schedule=SCHEDULE),
))
register(ZooRecipe(
    name="translate-proactive",
    description="ProactiveLLM: monotonic random masks + SPSD (lambda 1) on variable-lookahead translation, "
                "with a self-labelled probe (bleu = probe head at 0.5)",
    task="translation",
    train=train_proactive_recipe,
    quality_metric="bleu",
    options=dict(COMMON, objective="proactive", spsd=1.0, schedule=SCHEDULE),
))
