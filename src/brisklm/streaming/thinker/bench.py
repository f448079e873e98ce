"""`brisk bench thinker`: StreamingThinker vs batch CoT on streaming arithmetic, at depths D1/D2/D3.

Models: streaming-thinker (think while reading, two caches) and thinker-batch-cot (same units and budget, reads
everything first). Figures: accuracy; input tokens waited before the first reasoning token; reasoning tokens
(decode steps) between the last input and the answer; simulated time to answer when facts arrive at a fixed
interval, with per-forward costs measured in the same run; skip rate on distractor facts; exactness of the
session against the full masked pass.
"""

from __future__ import annotations

import statistics
from pathlib import Path
from typing import Any, Callable, Sequence

import torch

from brisklm.core.timing import one_torch_thread
from brisklm.eval.bench import BenchContext
from brisklm.eval.report import save_figure
from brisklm.streaming.thinker.data import DEPTHS, MODES, streaming_cot, thinker_task
from brisklm.streaming.thinker.session import ThinkerResult, reference_logits, think_depths
from brisklm.streaming.thinker_zoo import BATCH_MODEL, STREAMING_MODEL

MODELS = {"streaming": STREAMING_MODEL, "batch": BATCH_MODEL}
INTERVALS = (0, 1, 2, 4, 6, 8, 12, 16, 24)  # fact arrival interval, in decode steps (the x-axis of the plot)
HEADLINE_INTERVAL = 8  # "a fixed input arrival rate": one fact every 8 decode steps


def waited_tokens(result: ThinkerResult) -> int:
    """Input tokens read before the first reasoning token was forwarded."""
    total = 0
    for event in result.events:
        if event.kind == "write":
            return total
        total += event.tokens
    return total


def decode_steps_after_last_input(result: ThinkerResult, n_facts: int) -> int:
    """Reasoning forwards from the moment the last fact is read to the forward that wrote the answer (inclusive)."""
    steps, started = 0, False
    for event in result.events:
        if event.kind == "read" and event.segment == n_facts:
            started = True
        elif event.kind == "write" and started:
            steps += 1
            if event.answer:
                return steps
    return steps  # no answer written: every step after the last input counts


def simulated_time_to_answer(result: ThinkerResult, n_facts: int, interval: float, read_cost: float,
                             write_cost: float) -> float:
    """Seconds from the last fact's arrival to the answer, facts arriving every `interval` s (question at 0).

    Each read waits for its segment to arrive; the end of input arrives with the last fact. Forward costs are
    the medians measured in this run (pooled over both methods, so the clock is the same for both).
    """
    clock, answered = 0.0, None
    for event in result.events:
        if event.kind == "read":
            clock = max(clock, min(event.segment, n_facts) * interval) + read_cost
        else:
            clock += write_cost
            if event.answer:
                answered = clock
                break
    return (answered if answered is not None else clock) - n_facts * interval


def run_all(examples: Sequence, depths: Sequence[str], progress: Callable) -> dict[str, dict[str, list[ThinkerResult]]]:
    """Results of every example for each mode and depth (greedy; units written once, forked per depth).

    The two models run interleaved, example by example, so both see the same machine load.
    """
    from brisklm.zoo.store import load

    loaded = {mode: load(MODELS[mode]) for mode in MODES}
    runs: dict[str, dict[str, list[ThinkerResult]]] = {mode: {d: [] for d in depths} for mode in MODES}
    for e in progress(examples, desc="thinker streaming + batch"):
        for mode in MODES:
            for depth, result in think_depths(loaded[mode].model, loaded[mode].tokenizer, e, depths, mode).items():
                runs[mode][depth].append(result)
    return runs


def costs(results: Sequence[ThinkerResult]) -> dict[str, float]:
    """Median seconds of one input read (a segment) and of one reasoning forward."""
    reads = [e.seconds for r in results for e in r.events if e.kind == "read"]
    writes = [e.seconds for r in results for e in r.events if e.kind == "write"]
    return {"read_s": statistics.median(reads), "write_s": statistics.median(writes)}


def summarize(examples: Sequence, results: Sequence[ThinkerResult]) -> dict[str, float]:
    """Accuracy, waiting, steps after the last input, reasoning length and skip rates of one mode at one depth."""
    n = len(examples)
    skipped = distractors = false_skips = relevant = 0
    for e, r in zip(examples, results):
        for unit, is_distractor in zip(r.units[1:], e.meta["distractors"]):
            is_skip = unit.split()[0] == "skip"
            distractors += is_distractor
            skipped += is_skip and is_distractor
            relevant += not is_distractor
            false_skips += is_skip and not is_distractor
    return {
        "accuracy": sum(r.answer == e.answer for e, r in zip(examples, results)) / n,
        "tokens_waited_before_reasoning": statistics.mean(waited_tokens(r) for r in results),
        "tokens_after_last_input_to_answer": statistics.mean(
            decode_steps_after_last_input(r, len(e.meta["facts"])) for e, r in zip(examples, results)),
        "reasoning_tokens": statistics.mean(r.reasoning_tokens_forwarded for r in results),
        "input_tokens": statistics.mean(r.input_tokens_forwarded for r in results),
        "skip_rate_distractors": skipped / max(distractors, 1),
        "false_skip_rate_relevant": false_skips / max(relevant, 1),
        "truncated": sum(r.truncated for r in results),
    }


def time_curves(examples: Sequence, runs, depths: Sequence[str], step_cost: float, cost: dict) -> dict[str, Any]:
    """Median simulated seconds from last input to answer per mode and depth at each arrival interval."""
    curves: dict[str, Any] = {}
    for mode in MODES:
        for depth in depths:
            key = f"{mode}_{depth}"
            curves[key] = {}
            for steps in INTERVALS:
                times = [simulated_time_to_answer(r, len(e.meta["facts"]), steps * step_cost,
                                                  cost[mode]["read_s"], cost[mode]["write_s"])
                         for e, r in zip(examples, runs[mode][depth])]
                curves[key][str(steps)] = statistics.median(times)
    return curves


def exactness(n_examples: int, seed: int) -> float:
    """Max |logit difference| between the teacher-forced session and the full masked pass (trained model, D3)."""
    from brisklm.streaming.thinker.session import ThinkerSession
    from brisklm.zoo.store import load

    loaded = load(STREAMING_MODEL)
    worst = 0.0
    for e in thinker_task().examples("test", n_examples, seed=seed + 1):
        trace = streaming_cot(e, "D3")
        session = ThinkerSession(loaded.model, loaded.tokenizer, "D3", keep_logits=True, forced=trace)
        session.read_question(e.meta["question"])
        for fact in e.meta["facts"]:
            session.read_fact(fact)
        session.finish()
        ref = reference_logits(loaded.model, loaded.tokenizer, trace)
        worst = max(worst, float((torch.stack(session.logits) - ref).abs().max()))
    return worst


def time_figure(curves: dict[str, Any], step_cost: float, depths: Sequence[str], out_dir: Path | None = None):
    """Time from the last input to the answer vs the fact arrival rate, streaming vs batch."""
    from brisklm.eval.report import new_figure

    fig = new_figure(6.0, 4.0)
    ax = fig.add_subplot(111)
    xs = [s for s in INTERVALS if s > 0]
    rates = [1.0 / (s * step_cost) for s in xs]
    for mode, style in (("streaming", "-"), ("batch", "--")):
        for depth, marker in zip(depths, "osD"):
            ys = [1000 * curves[f"{mode}_{depth}"][str(s)] for s in xs]
            ax.plot(rates, ys, style, marker=marker, label=f"{mode} {depth}")
    ax.set_xscale("log")
    from matplotlib.ticker import NullFormatter, ScalarFormatter

    ax.xaxis.set_major_formatter(ScalarFormatter())
    ax.xaxis.set_minor_formatter(NullFormatter())
    ax.set_xlabel("input arrival rate (facts per second, simulated)")
    ax.set_ylabel("time from last input to answer (ms)")
    ax.set_title("StreamingThinker vs batch CoT: latency after the input ends")
    ax.legend(fontsize=7, ncol=2)
    ax.grid(alpha=0.3)
    save_figure(fig, out_dir, "thinker_time_to_answer.png")
    return fig


def thinker_figures(n_examples: int, seed: int = 0, depths: Sequence[str] = DEPTHS,
                    progress: Callable = lambda x, **_: x, out_dir: Path | None = None) -> dict[str, Any]:
    """Every thinker figure on n test examples (used by the benchmark and the demo)."""
    examples = thinker_task().examples("test", n_examples, seed=seed)
    runs = run_all(examples, depths, progress)
    by = {mode: {d: summarize(examples, runs[mode][d]) for d in depths} for mode in MODES}
    cost = {mode: costs([r for d in depths for r in runs[mode][d]]) for mode in MODES}
    # Same architecture, same per-token work: one pooled clock for both methods, so load noise cannot favour either.
    pooled = costs([r for mode in MODES for d in depths for r in runs[mode][d]])
    step_cost = pooled["write_s"]
    curves = time_curves(examples, runs, depths, step_cost, {mode: pooled for mode in MODES})
    figures: dict[str, Any] = {"n_test_examples": n_examples, "depths": list(depths), "by_mode": by,
                               "forward_costs_s": cost, "pooled_forward_costs_s": pooled,
                               "arrival_step_s": step_cost,
                               "time_to_answer_s_by_interval_steps": curves, "headline_interval_steps": HEADLINE_INTERVAL}
    for d in depths:
        s, b = by["streaming"][d], by["batch"][d]
        t_s = curves[f"streaming_{d}"][str(HEADLINE_INTERVAL)]
        t_b = curves[f"batch_{d}"][str(HEADLINE_INTERVAL)]
        figures[d] = {
            "accuracy_streaming": s["accuracy"], "accuracy_batch": b["accuracy"],
            "accuracy_gap_points": round(100 * (s["accuracy"] - b["accuracy"]), 2),
            "tokens_waited_streaming": s["tokens_waited_before_reasoning"],
            "tokens_waited_batch": b["tokens_waited_before_reasoning"],
            "waiting_reduction": round(1 - s["tokens_waited_before_reasoning"] / b["tokens_waited_before_reasoning"], 3),
            "tokens_after_last_input_streaming": s["tokens_after_last_input_to_answer"],
            "tokens_after_last_input_batch": b["tokens_after_last_input_to_answer"],
            "tokens_after_last_input_reduction": round(
                1 - s["tokens_after_last_input_to_answer"] / b["tokens_after_last_input_to_answer"], 3),
            "time_to_answer_ms_streaming": round(1000 * t_s, 3), "time_to_answer_ms_batch": round(1000 * t_b, 3),
            "time_to_answer_reduction": round(1 - t_s / t_b, 3),
            "skip_rate_distractors_streaming": s["skip_rate_distractors"],
            "false_skip_rate_streaming": s["false_skip_rate_relevant"],
        }
    time_figure(curves, step_cost, depths, out_dir)
    return figures


def thinker_benchmark(ctx: BenchContext) -> dict[str, Any]:
    """StreamingThinker vs batch CoT: accuracy, waiting, latency after the last input, skip rate, exactness."""
    with one_torch_thread():
        figures = thinker_figures(60 if ctx.quick else 200, ctx.seed, progress=ctx.progress, out_dir=ctx.out_dir)
        figures["session_vs_full_pass_max_abs_diff"] = exactness(5 if ctx.quick else 20, ctx.seed)
    d2 = figures["D2"]
    figures.update({key: d2[key] for key in ("accuracy_streaming", "accuracy_batch", "accuracy_gap_points",
                                             "waiting_reduction", "tokens_after_last_input_reduction",
                                             "time_to_answer_reduction", "skip_rate_distractors_streaming")})
    return figures
