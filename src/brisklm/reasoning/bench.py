"""`brisk bench reasoning`: On-Policy SFT (accuracy and CoT length before/after, accuracy under budgets) and the
four decoupled distillation objectives plus two KL mixes (accuracy, pass@k, entropy) on verbose-CoT arithmetic."""

from __future__ import annotations

import statistics
import time
from typing import Any, Callable

from brisklm.eval.bench import BenchContext, register
from brisklm.eval.report import new_figure
from brisklm.reasoning.distill import DistillConfig, distill, parse_kl
from brisklm.reasoning.evaluate import evaluate_rollouts
from brisklm.reasoning.opsft import OPSFTConfig, on_policy_sft
from brisklm.reasoning.zoo import TASK_OPTIONS
from brisklm.tasks.cot_arithmetic import CotArithmeticTask, is_correct
from brisklm.zoo.store import load

BUDGETS = (12, 16, 20, 25, 30, 40, 60)
OBJECTIVES = (("teacher", "forward"), ("teacher", "reverse"), ("student", "forward"), ("student", "reverse"),
              ("student", "mix:0.25"), ("student", "mix:0.75"))


def _task() -> CotArithmeticTask:
    return CotArithmeticTask(**TASK_OPTIONS)


def opsft_study(quick: bool, seed: int = 0, rounds: int | None = None, progress: Callable | None = None) -> dict[str, Any]:
    """Train arith-cot by On-Policy SFT with budget L = 0.7 x its mean CoT length; measure before and after."""
    base = load("arith-cot")
    model, tok = base.model, base.tokenizer
    task = _task()
    train, test = task.examples("train", 2000, seed=seed), task.examples("test", 128 if quick else 300, seed=seed)
    measure = lambda: evaluate_rollouts(model, tok, test, is_correct, 1, 96, 1.0, BUDGETS, seed=seed + 7)
    before = measure()
    budget = int(round(0.7 * before["mean_length"]))
    config = OPSFTConfig(budget=budget, samples=8, prompts_per_round=16, rounds=rounds or (30 if quick else 60),
                         learning_rate=1e-4, seed=seed)
    bar = progress(range(config.rounds), desc="on-policy SFT", total=config.rounds) if progress else None
    start = time.perf_counter()
    logs = on_policy_sft(model, tok, train, is_correct, config,
                         on_round=(lambda r, rec: next(bar, None)) if bar else None)
    seconds = time.perf_counter() - start
    after = measure()
    greedy = {name: evaluate_rollouts(m, tok, test, is_correct, 1, 96, 0.0, BUDGETS, seed=seed)
              for name, m in (("after", model), ("before", load("arith-cot").model))}
    example = test[0]
    return {
        "budget_L": budget, "rounds": len(logs), "samples_per_prompt": config.samples, "train_seconds": seconds,
        "kept_fraction_first_rounds": statistics.mean(r["kept"] / r["sampled"] for r in logs[:5]),
        "kept_fraction_last_rounds": statistics.mean(r["kept"] / r["sampled"] for r in logs[-5:]),
        "sampled_T1": {"before": before, "after": after},
        "greedy": {"before": greedy["before"], "after": greedy["after"]},
        "length_reduction": 1 - after["mean_length"] / before["mean_length"],
        "accuracy_change_points": 100 * (after["accuracy"] - before["accuracy"]),
        "example": {"prompt": example.prompt, "reference_verbose": example.completion,
                    "after": evaluate_completion(model, tok, example)},
    }


def evaluate_completion(model, tok, example) -> str:
    """One greedy completion, for the report."""
    from brisklm.zoo.textlm import greedy_complete

    return greedy_complete(model, tok, [example.prompt], 96)[0]


def distill_study(quick: bool, seed: int = 0, seeds: int | None = None, progress: Callable | None = None) -> dict[str, Any]:
    """Each objective from the same warm student: accuracy avg@4, pass@4, token entropy, length (mean over seeds)."""
    teacher = load("arith-cot")
    task = _task()
    prompts = [e.prompt for e in task.examples("train", 2000, seed=seed)]
    test = task.examples("test", 48 if quick else 100, seed=seed)
    n_seeds = seeds or (1 if quick else 3)
    rounds = 12 if quick else 40
    measure = lambda m, s: evaluate_rollouts(m, teacher.tokenizer, test, is_correct, 4, 96, 1.0, k=4, seed=s,
                                             with_entropy=True)
    rows: dict[str, Any] = {"teacher": measure(teacher.model, seed), "student_start": measure(load("arith-cot-student").model, seed)}
    jobs = [(p, k, s) for p, k in OBJECTIVES for s in range(n_seeds)]
    bar = progress(range(len(jobs)), desc="distillation objectives", total=len(jobs)) if progress else None
    per: dict[str, list[dict]] = {}
    for prefix, kl, s in jobs:
        student = load("arith-cot-student").model
        config = DistillConfig(prefix=prefix, kl=parse_kl(kl), rounds=rounds, prompts_per_round=16,
                               samples_per_prompt=2, max_new_tokens=96, learning_rate=1e-3, seed=seed + s)
        start = time.perf_counter()
        distill(teacher.model, student, teacher.tokenizer, prompts, config)
        result = measure(student, seed + 100 + s)
        result["train_seconds"] = time.perf_counter() - start
        per.setdefault(f"{prefix}-prefix {kl}", []).append(result)
        if bar:
            next(bar, None)
    for name, results in per.items():
        rows[name] = {key: statistics.mean(r[key] for r in results)
                      for key in ("accuracy", "pass@4", "entropy", "mean_length", "truncation_ratio", "train_seconds")}
        rows[name]["accuracy_std"] = statistics.stdev(r["accuracy"] for r in results) if len(results) > 1 else 0.0
        rows[name]["seeds"] = len(results)
    return {"rounds_per_objective": rounds, "seeds": n_seeds, "objectives": rows}


def accuracy_length_figure(opsft: dict[str, Any]):
    """Left: accuracy vs mean CoT length (sampled and greedy, before/after). Right: accuracy under token budgets."""
    fig = new_figure(9.0, 3.5)
    left, right = fig.add_subplot(1, 2, 1), fig.add_subplot(1, 2, 2)
    for mode, marker in (("sampled_T1", "o"), ("greedy", "s")):
        for when, color in (("before", "tab:gray"), ("after", "tab:blue")):
            m = opsft[mode][when]
            left.scatter(m["mean_length"], m["accuracy"], marker=marker, color=color, label=f"{when} ({mode})")
    left.set_xlabel("mean CoT length (tokens)")
    left.set_ylabel("accuracy")
    left.set_title(f"On-Policy SFT, L={opsft['budget_L']}")
    left.legend(fontsize=7)
    for when, color in (("before", "tab:gray"), ("after", "tab:blue")):
        acc = opsft["sampled_T1"][when]["accuracy_at_budget"]
        right.plot([int(b) for b in acc], list(acc.values()), marker="o", color=color, label=when)
    right.set_xlabel("token budget")
    right.set_ylabel("accuracy within budget")
    right.set_title("accuracy under a budget (T=1)")
    right.legend(fontsize=7)
    fig.tight_layout()
    return fig


@register("reasoning")
def bench_reasoning(ctx: BenchContext) -> dict[str, Any]:
    """On-Policy SFT and decoupled distillation figures; plot accuracy against mean length."""
    start = time.perf_counter()
    opsft = opsft_study(ctx.quick, ctx.seed, progress=ctx.progress)
    fig = accuracy_length_figure(opsft)
    ctx.out_dir.mkdir(parents=True, exist_ok=True)
    fig.savefig(ctx.out_dir / "reasoning-accuracy-length.png")
    opsft_seconds = time.perf_counter() - start
    distillation = distill_study(ctx.quick, ctx.seed, progress=ctx.progress)
    return {"opsft": opsft, "opsft_wall_seconds": opsft_seconds, "distillation": distillation,
            "plots": ["reasoning-accuracy-length.png"]}
