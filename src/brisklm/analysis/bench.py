"""`brisk bench analysis`: PIR of recognisable vs arbitrary-label tasks, accuracy per ICL quadrant, batched speed."""

from __future__ import annotations

from typing import Any

import torch

from brisklm.analysis.icl import ARBITRARY, RECOGNISABLE, analyse_batch, encode_icl, pir_for_task, run_icl_experiment
from brisklm.analysis.pir import MODES
from brisklm.core.timing import time_many
from brisklm.eval.bench import BenchContext
from brisklm.tasks.icl import IclTask

MODEL = "icl-lm"


def pir_by_task(model, tokenizer, n: int, seed: int) -> dict[str, Any]:
    """PIR (both modes) and accuracy of each ICL task (4 shots, no similar demo), and group means."""
    per_task = {}
    for task in RECOGNISABLE + ARBITRARY:
        res = pir_for_task(model, tokenizer, task, n=n, seed=seed)
        per_task[task] = {"accuracy": res.accuracy, **{f"pir_{m}": res.pir_mean(m) for m in MODES},
                          **{f"curve_{m}": res.pir_curve(m) for m in MODES}}
    groups = {}
    for group, names in (("recognisable", RECOGNISABLE), ("arbitrary", ARBITRARY)):
        groups[group] = {f"pir_{m}": sum(per_task[t][f"pir_{m}"] for t in names) / len(names) for m in MODES}
    ratios = {f"pir_{m}_recognisable_over_arbitrary": groups["recognisable"][f"pir_{m}"] / groups["arbitrary"][f"pir_{m}"]
              for m in MODES}
    return {"per_task": per_task, "groups": groups, **ratios}


@torch.no_grad()
def time_batched_vs_single(model, tokenizer, n: int, repeats: int, seed: int) -> dict[str, float]:
    """Seconds per n prompts for the recorded pass + prediction + both PIR modes: one batch vs one at a time."""
    examples = IclTask(shots=4).examples("test", n, seed=seed)
    whole = encode_icl(tokenizer, examples)
    singles = [encode_icl(tokenizer, [e]) for e in examples]
    batched = time_many(lambda: analyse_batch(model, whole), repeats=repeats)["median_s"]
    single = time_many(lambda: [analyse_batch(model, b) for b in singles], repeats=repeats)["median_s"]
    return {"prompts": n, "batched_s": batched, "one_by_one_s": single, "speedup": single / batched}


@torch.no_grad()
def bench_analysis(ctx: BenchContext) -> dict:
    """Run the coordinate-system experiment and PIR per task on the icl-lm zoo model; time batching."""
    from brisklm.zoo.store import load

    loaded = load(MODEL, seed=ctx.seed)
    model, tokenizer = loaded.model, loaded.tokenizer
    n = 64 if ctx.quick else 256
    pir = pir_by_task(model, tokenizer, n, ctx.seed)
    exp = run_icl_experiment(model, tokenizer, n=n, seed=ctx.seed, progress=ctx.progress)
    fig_path = ctx.out_dir / "analysis_icl_coordinates.png"
    ctx.out_dir.mkdir(parents=True, exist_ok=True)
    from brisklm.analysis.icl import plot_experiment

    plot_experiment(exp).savefig(fig_path)
    timing = time_batched_vs_single(model, tokenizer, 100, 3 if ctx.quick else 5, ctx.seed)
    accuracy = {row["quadrant"]: row["accuracy"] for row in exp.quadrant_rows()}
    return {"model": MODEL, "model_quality": loaded.quality, "prompts_per_condition": n, "pir": pir,
            "accuracy_per_quadrant": accuracy, "experiment": exp.to_json(), "time_per_100_prompts": timing,
            "plot": fig_path.name}  # beside the results, in benchmarks/plots/analysis/
