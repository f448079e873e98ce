"""`brisk bench reasoning`: On-Policy SFT (accuracy and CoT length before/after, accuracy under budgets), the
four decoupled distillation objectives plus two KL mixes (accuracy, pass@k, entropy; mean over seeds), the
entropy-gated length curriculum against a fixed cap, and latent CoT (pause, Coconut, internalization) against
explicit CoT (accuracy and generated tokens per stage), all on verbose-CoT arithmetic. On-Policy SFT and the
latent study run for 3 seeds (`seed_part`, which can also run as separate processes and be joined by
`merge_parts`); distillation and the curriculum run their 3 seeds inside."""

from __future__ import annotations

import copy
import statistics
import time
from typing import Any, Callable

from brisklm.eval.bench import BenchContext
from brisklm.eval.report import new_figure
from brisklm.reasoning.curriculum import EntropyGatedCurriculum
from brisklm.reasoning.distill import DistillConfig, distill, parse_kl
from brisklm.reasoning.evaluate import evaluate_rollouts
from brisklm.reasoning.latent import (
    METHODS, LatentConfig, evaluate_explicit, evaluate_latent, train_explicit, train_latent,
)
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


def _distill_run(prefix: str, kl: str, s: int, seed: int, rounds: int, test, curriculum: bool = False,
                 memo: dict | None = None) -> dict[str, Any]:
    """One distillation run from a fresh arith-cot-student, measured (avg@4, pass@4, entropy); memoised per call."""
    key = (prefix, kl, s, seed, rounds, len(test), curriculum)
    if memo is not None and key in memo:
        return memo[key]
    teacher = load("arith-cot")
    student = load("arith-cot-student").model
    task_prompts = [e.prompt for e in _task().examples("train", 2000, seed=seed)]
    config = DistillConfig(prefix=prefix, kl=parse_kl(kl), rounds=rounds, prompts_per_round=16, samples_per_prompt=2,
                           max_new_tokens=96, learning_rate=1e-3, seed=seed + s)
    schedule = EntropyGatedCurriculum(stages=(32, 64, 96), gate=0.2, tolerance=0.03, patience=2) if curriculum else None
    start = time.perf_counter()
    logs = distill(teacher.model, student, teacher.tokenizer, task_prompts, config, length_schedule=schedule)
    seconds = time.perf_counter() - start
    result = evaluate_rollouts(student, teacher.tokenizer, test, is_correct, 4, 96, 1.0, k=4, seed=seed + 100 + s,
                               with_entropy=True)
    rollouts = config.prompts_per_round * config.samples_per_prompt
    result.update(train_seconds=seconds, train_rollout_tokens=sum(r["mean_length"] * rollouts for r in logs),
                  final_cap=logs[-1]["max_new_tokens"], caps=[r["max_new_tokens"] for r in logs])
    if memo is not None:
        memo[key] = result
    return result


def distill_study(quick: bool, seed: int = 0, seeds: int | None = None, progress: Callable | None = None,
                  memo: dict | None = None) -> dict[str, Any]:
    """Each objective from the same warm student: accuracy avg@4, pass@4, token entropy, length (mean over seeds)."""
    teacher = load("arith-cot")
    test = _task().examples("test", 48 if quick else 100, seed=seed)
    n_seeds = seeds or 3
    rounds = 12 if quick else 20
    measure = lambda m, s: evaluate_rollouts(m, teacher.tokenizer, test, is_correct, 4, 96, 1.0, k=4, seed=s,
                                             with_entropy=True)
    rows: dict[str, Any] = {"teacher": measure(teacher.model, seed), "student_start": measure(load("arith-cot-student").model, seed)}
    jobs = [(p, k, s) for p, k in OBJECTIVES for s in range(n_seeds)]
    bar = progress(range(len(jobs)), desc="distillation objectives", total=len(jobs)) if progress else None
    per: dict[str, list[dict]] = {}
    for prefix, kl, s in jobs:
        per.setdefault(f"{prefix}-prefix {kl}", []).append(_distill_run(prefix, kl, s, seed, rounds, test, memo=memo))
        if bar:
            next(bar, None)
    for name, results in per.items():
        rows[name] = _mean_rows(results, ("accuracy", "pass@4", "entropy", "mean_length", "truncation_ratio",
                                          "train_seconds", "train_rollout_tokens"))
    return {"rounds_per_objective": rounds, "seeds": n_seeds, "objectives": rows}


def _mean_rows(results: list[dict], keys: tuple[str, ...]) -> dict[str, Any]:
    row = {key: statistics.mean(r[key] for r in results) for key in keys}
    for key in ("accuracy", "entropy"):
        row[f"{key}_std"] = statistics.stdev(r[key] for r in results) if len(results) > 1 else 0.0
    row["per_seed_accuracy"] = [r["accuracy"] for r in results]
    row["seeds"] = len(results)
    return row


def curriculum_study(quick: bool, seed: int = 0, seeds: int | None = None, progress: Callable | None = None,
                     memo: dict | None = None) -> dict[str, Any]:
    """Student-prefix reverse KL (OPD) with a fixed 96-token cap vs the entropy-gated curriculum (32 -> 64 -> 96).

    The fixed-cap arm is the same run as the distillation sweep's OPD row (shared through `memo`).
    """
    test = _task().examples("test", 48 if quick else 100, seed=seed)
    n_seeds = seeds or 3
    rounds = 12 if quick else 20
    arms = (("fixed cap 96", False), ("entropy-gated 32/64/96", True))
    jobs = [(arm, s) for arm in arms for s in range(n_seeds)]
    bar = progress(range(len(jobs)), desc="curriculum vs fixed cap", total=len(jobs)) if progress else None
    per: dict[str, list[dict]] = {}
    for (arm, gated), s in jobs:
        per.setdefault(arm, []).append(_distill_run("student", "reverse", s, seed, rounds, test, gated, memo))
        if bar:
            next(bar, None)
    rows = {arm: _mean_rows(results, ("accuracy", "pass@4", "entropy", "mean_length", "truncation_ratio",
                                      "train_seconds", "train_rollout_tokens", "final_cap"))
            for arm, results in per.items()}
    for arm, results in per.items():
        rows[arm]["caps_first_seed"] = results[0]["caps"]
    gated, fixed = rows[arms[1][0]], rows[arms[0][0]]
    return {"objective": "student-prefix reverse KL", "rounds": rounds, "seeds": n_seeds, "arms": rows,
            "gate": 0.2, "patience": 2, "tolerance": 0.03,
            "ratios_gated_over_fixed": {k: gated[k] / fixed[k] if fixed[k] else float("nan")
                                        for k in ("mean_length", "train_rollout_tokens", "entropy")},
            "differences_gated_minus_fixed": {k: gated[k] - fixed[k] for k in ("accuracy", "pass@4")}}


# Per-method Trainer settings of the latent study. Coconut's step costs #thoughts + 1 forward passes (4 at the
# last stage), so 100 Coconut steps cost about as much compute as 250-300 plain steps of pause/internalization.
LATENT_SETTINGS = {"full": {"stage0": 150, "coconut": (100, 2e-3), "pause": (250, 1e-3), "internalize": (250, 1e-3)},
                   "quick": {"stage0": 100, "coconut": (60, 2e-3), "pause": (150, 1e-3), "internalize": (150, 1e-3)}}


def latent_study(quick: bool, seed: int = 0, progress: Callable | None = None) -> dict[str, Any]:
    """Explicit verbose CoT (arith-cot), explicit minimal CoT (stage 0) and each latent method after every stage."""
    settings = LATENT_SETTINGS["quick" if quick else "full"]
    base = load("arith-cot")
    task = _task()
    train, test = task.examples("train", 4000, seed=seed), task.examples("test", 200, seed=seed)
    rows: dict[str, Any] = {"explicit verbose CoT (arith-cot)": evaluate_explicit(base.model, base.tokenizer, test,
                                                                                 is_correct)}
    start = time.perf_counter()
    train_explicit(base.model, base.tokenizer, train, settings["stage0"], learning_rate=1e-3, seed=seed)
    rows["explicit minimal CoT (stage 0)"] = evaluate_explicit(base.model, base.tokenizer, test, is_correct)
    rows["explicit minimal CoT (stage 0)"]["train_seconds"] = time.perf_counter() - start
    bar = progress(METHODS, desc="latent CoT methods", total=len(METHODS)) if progress else iter(METHODS)
    for method in bar:
        model, tok = copy.deepcopy(base.model), copy.deepcopy(base.tokenizer)
        steps, lr = settings[method]
        config = LatentConfig(method=method, stages=3, steps_per_stage=steps, learning_rate=lr, seed=seed)
        start = time.perf_counter()

        def on_stage(stage: int, record: dict, method=method, model=model, tok=tok, config=config) -> None:
            result = evaluate_latent(model, tok, test, is_correct, config, stage=stage)
            result.update(train_loss=record["loss"], train_seconds_cumulative=time.perf_counter() - start)
            rows[f"{method} stage {stage}"] = result

        train_latent(model, tok, train, config, on_stage=on_stage)
    return {"settings": {k: list(v) if isinstance(v, tuple) else v for k, v in settings.items()}, "pauses": 6,
            "thoughts_per_step": 1, "remove_per_stage": 6, "test_prompts": len(test), "rows": rows}


def latent_figure(latent: dict[str, Any], opsft: dict[str, Any]):
    """Greedy accuracy against generated tokens: explicit CoT, On-Policy SFT and each latent method per stage."""
    fig = new_figure(5.5, 3.8)
    ax = fig.add_subplot(1, 1, 1)
    rows = latent["rows"]
    for name, marker in (("explicit verbose CoT (arith-cot)", "s"), ("explicit minimal CoT (stage 0)", "D")):
        ax.scatter(rows[name]["mean_generated_tokens"], rows[name]["accuracy"], marker=marker, color="black",
                   label=name)
    g = opsft["greedy"]["after"]
    ax.scatter(g["mean_length"], g["accuracy"], marker="*", s=80, color="tab:blue", label="On-Policy SFT (greedy)")
    for method, color in zip(METHODS, ("tab:orange", "tab:green", "tab:red")):
        points = sorted((int(k.split()[-1]), v) for k, v in rows.items() if k.startswith(method + " stage"))
        ax.plot([v["mean_generated_tokens"] for _, v in points], [v["accuracy"] for _, v in points], marker="o",
                color=color, label=f"{method} (stages {points[0][0]}..{points[-1][0]})")
    ax.axhline(0.2, color="gray", linestyle=":", label="chance (mod 5)")
    ax.set_xlabel("generated tokens per answer (greedy)")
    ax.set_ylabel("accuracy")
    ax.set_title("accuracy vs generated tokens")
    ax.legend(fontsize=6)
    fig.tight_layout()
    return fig


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


SEEDS = 3  # On-Policy SFT and the latent study run once per seed; distillation and curriculum run their seeds inside


def _spread(values: list[float]) -> dict[str, Any]:
    """Mean, sample standard deviation and the values themselves (NaN-free lists only)."""
    return {"mean": statistics.mean(values), "std": statistics.stdev(values) if len(values) > 1 else 0.0,
            "values": values}


def seed_part(quick: bool, seed: int, progress: Callable | None = None) -> dict[str, Any]:
    """The per-seed studies: On-Policy SFT and latent CoT (each trains its own copy of arith-cot)."""
    start = time.perf_counter()
    opsft = opsft_study(quick, seed, progress=progress)
    opsft_seconds = time.perf_counter() - start
    start = time.perf_counter()
    latent = latent_study(quick, seed, progress=progress)
    latent["wall_seconds"] = time.perf_counter() - start
    return {"seed": seed, "opsft": opsft, "opsft_wall_seconds": opsft_seconds, "latent_cot": latent}


def opsft_over_seeds(parts: list[dict[str, Any]]) -> dict[str, Any]:
    """Length cut and accuracy change of On-Policy SFT, greedy and sampled, as mean and spread over seeds."""
    out: dict[str, Any] = {"seeds": [p["seed"] for p in parts]}
    for mode in ("greedy", "sampled_T1"):
        for when in ("before", "after"):
            for key in ("accuracy", "mean_length"):
                out[f"{mode} {key} {when}"] = _spread([p["opsft"][mode][when][key] for p in parts])
        out[f"{mode} length_reduction"] = _spread([1 - p["opsft"][mode]["after"]["mean_length"]
                                                   / p["opsft"][mode]["before"]["mean_length"] for p in parts])
        out[f"{mode} accuracy_change_points"] = _spread([100 * (p["opsft"][mode]["after"]["accuracy"]
                                                                - p["opsft"][mode]["before"]["accuracy"])
                                                         for p in parts])
    out["budget_L"] = [p["opsft"]["budget_L"] for p in parts]
    return out


def latent_over_seeds(parts: list[dict[str, Any]]) -> dict[str, Any]:
    """Each latent-study row (explicit CoT, every method at every stage): accuracy and generated tokens over seeds."""
    names = list(parts[0]["latent_cot"]["rows"])
    return {name: {key: _spread([p["latent_cot"]["rows"][name][key] for p in parts])
                   for key in ("accuracy", "mean_generated_tokens")} for name in names}


def merge_parts(opsft_parts: list[dict[str, Any]], latent_parts: list[dict[str, Any]], distillation: dict[str, Any],
                curriculum: dict[str, Any], out_dir) -> dict[str, Any]:
    """The reasoning figures from per-seed parts (On-Policy SFT and latent CoT may cover different seeds when run
    as separate processes) and the (internally seeded) distillation and curriculum studies; plots show the first."""
    first, latent_first = opsft_parts[0], latent_parts[0]
    out_dir.mkdir(parents=True, exist_ok=True)
    accuracy_length_figure(first["opsft"]).savefig(out_dir / "reasoning-accuracy-length.png")
    latent_figure(latent_first["latent_cot"], first["opsft"]).savefig(out_dir / "reasoning-latent.png")
    teacher = load("arith-cot")
    student = load("arith-cot-student")
    return {"teacher": {k: teacher.quality[k] for k in ("accuracy", "mean_completion_words", "wall_seconds")
                        if teacher.quality and k in teacher.quality},
            "student": {k: student.quality[k] for k in ("accuracy", "mean_completion_words", "wall_seconds")
                        if student.quality and k in student.quality},
            "opsft_seeds": [p["seed"] for p in opsft_parts], "latent_seeds": [p["seed"] for p in latent_parts],
            "opsft": first["opsft"], "opsft_wall_seconds": first["opsft_wall_seconds"],
            "opsft_over_seeds": opsft_over_seeds(opsft_parts), "distillation": distillation,
            "curriculum_vs_fixed_cap": curriculum, "latent_cot": latent_first["latent_cot"],
            "latent_over_seeds": latent_over_seeds(latent_parts),
            "latent_per_seed": {str(p["seed"]): p["latent_cot"]["rows"] for p in latent_parts},
            "opsft_per_seed": {str(p["seed"]): {k: p["opsft"][k] for k in ("greedy", "sampled_T1", "budget_L",
                                                                          "length_reduction")} for p in opsft_parts},
            "plots": ["reasoning-accuracy-length.png", "reasoning-latent.png"]}


def bench_reasoning(ctx: BenchContext) -> dict[str, Any]:
    """On-Policy SFT and latent CoT over 3 seeds, the distillation objectives and the curriculum (3 seeds inside);
    plot accuracy against length for the first seed."""
    parts = [seed_part(ctx.quick, ctx.seed + s, progress=ctx.progress) for s in range(SEEDS)]
    memo: dict = {}
    distillation = distill_study(ctx.quick, ctx.seed, progress=ctx.progress, memo=memo)
    curriculum = curriculum_study(ctx.quick, ctx.seed, progress=ctx.progress, memo=memo)
    return merge_parts(parts, parts, distillation, curriculum, ctx.out_dir)
