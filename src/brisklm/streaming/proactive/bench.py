"""`brisk bench proactive`: BLEU-LAAL curves of decision heads vs wait-k, sufficiency AUROC, area gain.

Data: variable-lookahead translation (noun phrases of 1-4 words reordered noun-first, particles 1-3 words later),
so the lookahead a word needs varies and no fixed k is right everywhere. Models (same init, steps and data):
translate-waitk-var (wait-k masks), translate-proactive-mask (random monotone masks) and translate-proactive
(random masks + SPSD). Curves: wait-k k=1..7 on the wait-k model and on each proactive model (the `lag` head,
same decoder), and the entropy / attention / probe heads swept over thresholds at quantiles of their signal on
dev rows (a fixed grid refined where neighbouring points are far apart). Area: mean of the BLEU frontier (best
BLEU at LAAL <= L, a step function, 0 below a curve's fastest point) over the LAAL range of wait-k k=1..7 on the
wait-k model; auc_gain = best head's area minus the better wait-k curve's area.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Callable, Sequence

import torch

from brisklm.core.timing import one_torch_thread
from brisklm.errors import BriskError
from brisklm.eval.bench import BenchContext
from brisklm.eval.metrics import bleu
from brisklm.eval.report import save_figure
from brisklm.streaming.bench import latency
from brisklm.streaming.proactive.heads import (Head, SufficiencyData, adaptive_decode, auroc, load_probe, sufficiency_data,
                                     train_probe)
from brisklm.streaming.proactive_zoo import proactive_task

MODELS = {"waitk": "translate-waitk-var", "mask": "translate-proactive-mask", "spsd": "translate-proactive"}
KS = tuple(range(1, 8))
SIGNAL_HEADS = ("entropy", "attention", "probe")


def frontier(points: Sequence[tuple[float, float]], laal: float) -> float:
    """Best BLEU among (LAAL, BLEU) points with LAAL <= laal (0 if no point reaches that latency)."""
    inside = [b for l, b in points if l <= laal + 1e-9]
    return max(inside) if inside else 0.0


def pareto(points: Sequence[tuple[float, float]]) -> list[tuple[float, float]]:
    """The non-dominated (LAAL, BLEU) points, by increasing LAAL (each better in BLEU than all faster ones)."""
    out: list[tuple[float, float]] = []
    for laal, b in sorted(points):
        if not out or b > out[-1][1]:
            out.append((laal, b))
    return out


def curve_area(points: Sequence[tuple[float, float]], lo: float, hi: float, grid: int = 400) -> float:
    """Mean of the BLEU frontier over [lo, hi] (an area normalised by the range width, in BLEU)."""
    if not points or hi <= lo:
        return float("nan")
    xs = [lo + (hi - lo) * i / (grid - 1) for i in range(grid)]
    return sum(frontier(points, x) for x in xs) / grid


def head_signal(head: str, data: SufficiencyData, probe) -> torch.Tensor:
    """The head's raw signal on dev rows (entropy, newest-word attention mass, or probe probability)."""
    if head == "probe":
        return probe.score(data.hidden)
    return {"entropy": data.entropy, "attention": data.attention}[head]


def threshold_at(head: str, signal: torch.Tensor, strictness: float) -> float:
    """The threshold that makes a fraction `strictness` of dev rows READ (quantile in the head's direction)."""
    q = strictness if head == "probe" else 1.0 - strictness  # probe WRITEs above T, the others below T
    return round(float(torch.quantile(signal.double(), q)), 6)


INITIAL_STRICTNESS = (0.01, 0.05, 0.15, 0.3, 0.5, 0.7)


def sweep(run: Callable[[float], dict], head: str, signal: torch.Tensor, budget: int,
          max_laal_gap: float = 0.75, max_bleu_gap: float = 8.0) -> list[dict]:
    """Threshold sweep: a fixed strictness grid, then midpoints where neighbouring points are far apart in LAAL/BLEU.

    Strictness s is the share of dev rows on which the head would READ; the threshold is the matching quantile of
    the head's dev signal, so one grid serves heads with very different signal scales.
    """
    points: dict[float, dict] = {}
    for s in INITIAL_STRICTNESS[:budget]:
        points[s] = run(threshold_at(head, signal, s))
    while len(points) < budget:
        keys = sorted(points)
        gaps = [(max(abs(points[a]["laal"] - points[b]["laal"]) / max_laal_gap,
                     abs(points[a]["bleu"] - points[b]["bleu"]) / max_bleu_gap), a, b)
                for a, b in zip(keys, keys[1:]) if b - a > 0.004]
        gaps = [g for g in gaps if g[0] > 1.0]
        if not gaps:
            break
        _, a, b = max(gaps)
        mid = round((a + b) / 2, 4)
        points[mid] = run(threshold_at(head, signal, mid))
    rows = []
    for s in sorted(points):
        rows.append({"strictness": s, **points[s]})
    return rows


def evaluate(model, tokenizer, sources, refs, head: Head, threshold: float) -> dict[str, float]:
    """BLEU, LAAL and AL of one head at one threshold, plus average source words read per written word."""
    result = adaptive_decode(model, tokenizer, sources, head, threshold)
    words = sum(len(o.words) for o in result.outputs)
    return {"threshold": threshold, "bleu": round(bleu(result.hypotheses, refs), 3),
            "laal": round(latency(result, refs, "LAAL"), 3), "al": round(latency(result, refs, "AL"), 3),
            "mean_delay": round(sum(sum(o.delays) for o in result.outputs) / max(words, 1), 3)}


def _points(rows: Sequence[dict]) -> list[tuple[float, float]]:
    return [(r["laal"], r["bleu"]) for r in rows]


def proactive_figures(n_test: int, n_dev: int, n_thresholds: int, curve_models: Sequence[str], seed: int = 0,
                      progress: Callable = lambda x, **_: x) -> dict[str, Any]:
    """All figures: curves, AUROC of each signal on each model, areas, matched-LAAL comparison."""
    from brisklm.zoo.store import load

    task = proactive_task()
    test = task.examples("test", n_test, seed=seed)
    dev = task.examples("train", n_dev, seed=seed + 1000)  # dev rows: threshold grids and the baseline's probe
    sources, refs = [e.meta["source_words"] for e in test], [e.completion for e in test]
    loaded = {key: load(name) for key, name in MODELS.items()}
    probes, dev_data, figures = {}, {}, {"models": dict(MODELS), "n_test_sentences": n_test}
    aurocs: dict[str, dict[str, float]] = {}
    label_rate: dict[str, float] = {}
    for key, m in progress(list(loaded.items()), desc="sufficiency AUROC"):
        dev_data[key] = sufficiency_data(m.model, m.tokenizer, dev, seed=seed + 1)
        try:
            probes[key] = load_probe(m.path)
        except BriskError:  # the wait-k baseline has no stored probe: fit one on the same kind of dev rows
            probes[key] = train_probe(dev_data[key], seed=seed)
        held = sufficiency_data(m.model, m.tokenizer, test, seed=seed + 2)
        aurocs[key] = {name: round(auroc(score, held.label), 4) for name, score in held.scores(probes[key]).items()}
        label_rate[key] = round(float(held.label.mean()), 4)
    figures["auroc"] = aurocs
    figures["sufficient_row_fraction"] = label_rate
    figures["auroc_gain_spsd_minus_mask"] = {h: round(aurocs["spsd"][h] - aurocs["mask"][h], 4) for h in aurocs["spsd"]}

    curves: dict[str, list[dict]] = {}
    runs: list[tuple[str, str, Callable[[], list[dict]]]] = []
    for key in ("waitk", *curve_models):
        m = loaded[key]
        runs.append((key, f"waitk@{key}", lambda m=m: [evaluate(m.model, m.tokenizer, sources, refs, Head("lag"),
                                                                 float(k)) for k in KS]))
    for key in curve_models:
        m = loaded[key]
        for name in SIGNAL_HEADS:
            head = Head(name, probes[key] if name == "probe" else None)
            signal = head_signal(name, dev_data[key], probes[key])
            runs.append((key, f"{name}@{key}", lambda m=m, head=head, signal=signal: sweep(
                lambda t: evaluate(m.model, m.tokenizer, sources, refs, head, t), head.name, signal, n_thresholds)))
    for key, curve, fn in progress(runs, desc="curves (wait-k and head sweeps)"):
        curves[curve] = fn()
    offline = Head("lag")
    figures["offline_bleu"] = {key: evaluate(loaded[key].model, loaded[key].tokenizer, sources, refs, offline,
                                             float("inf"))["bleu"] for key in ("waitk", *curve_models)}
    figures["curves"] = curves

    waitk_curves = [c for c in curves if c.startswith("waitk@")]
    head_curves = [c for c in curves if not c.startswith("waitk@")]
    lo, hi = min(r["laal"] for r in curves["waitk@waitk"]), max(r["laal"] for r in curves["waitk@waitk"])
    areas = {c: round(curve_area(_points(curves[c]), lo, hi), 3) for c in curves}
    best_head = max(head_curves, key=lambda c: areas[c])
    best_waitk = max(waitk_curves, key=lambda c: areas[c])
    figures["area_laal_range"] = [round(lo, 3), round(hi, 3)]
    figures["area"] = areas
    figures["best_head"], figures["best_waitk"] = best_head, best_waitk
    figures["auc_gain"] = round(areas[best_head] - areas[best_waitk], 3)
    figures["auc_gain_vs_waitk_baseline_model"] = round(areas[best_head] - areas["waitk@waitk"], 3)
    matched = []
    for row in curves[best_waitk]:
        head_bleu = frontier(_points(curves[best_head]), row["laal"])
        matched.append({"k": int(row["threshold"]), "laal": row["laal"], "waitk_bleu": row["bleu"],
                        "best_head_bleu_at_laal": round(head_bleu, 3)})
    figures["matched_laal"] = matched
    figures["best_head_dominates_waitk_points"] = sum(1 for r in matched
                                                      if r["best_head_bleu_at_laal"] >= r["waitk_bleu"])
    return figures


def curve_figure(figures: dict[str, Any], out_dir: Path | None = None, name: str = "proactive_bleu_vs_laal.png"):
    """BLEU against LAAL: wait-k (k = 1..7) and each head's sweep; lines join the Pareto points, dots are all runs."""
    from brisklm.eval.report import new_figure

    fig = new_figure(7.0, 4.5)
    ax = fig.add_subplot(111)
    for curve, rows in sorted(figures["curves"].items()):
        points = _points(rows)
        front = pareto(points) if not curve.startswith("waitk@") else sorted(points)
        style = "--" if curve.startswith("waitk@") else "-"
        line, = ax.plot([p[0] for p in front], [p[1] for p in front], style, marker="o", markersize=3, label=curve)
        ax.scatter([p[0] for p in points], [p[1] for p in points], s=8, alpha=0.35, color=line.get_color())
    ax.set_xlabel("LAAL (source words)")
    ax.set_ylabel("BLEU")
    ax.set_title("variable-lookahead translation: decision heads vs wait-k")
    ax.legend(fontsize=7, ncol=2)
    ax.grid(alpha=0.3)
    save_figure(fig, out_dir, name)
    return fig


def proactive_benchmark(ctx: BenchContext) -> dict[str, Any]:
    """ProactiveLLM figures on the variable-lookahead task (quick: 100 sentences, SPSD model's heads only)."""
    with one_torch_thread():
        figures = proactive_figures(
            n_test=100 if ctx.quick else 200, n_dev=200 if ctx.quick else 400, n_thresholds=10 if ctx.quick else 14,
            curve_models=("spsd",) if ctx.quick else ("spsd", "mask"), seed=ctx.seed, progress=ctx.progress)
        curve_figure(figures, ctx.out_dir)
    return figures
