"""Curve areas of the proactive benchmark: the BLEU frontier over a common LAAL range (hand cases)."""

import math

import pytest

from brisklm.streaming.proactive.bench import curve_area, frontier, pareto


def test_frontier_is_the_best_bleu_within_a_latency():
    points = [(1.0, 10.0), (2.0, 30.0), (3.0, 20.0), (4.0, 50.0)]
    assert frontier(points, 0.5) == 0.0  # no operating point reaches that latency
    assert frontier(points, 1.0) == 10.0
    assert frontier(points, 2.5) == 30.0
    assert frontier(points, 3.5) == 30.0  # a worse point at a higher latency does not lower the frontier
    assert frontier(points, 9.0) == 50.0


def test_curve_area_is_the_mean_frontier_over_the_range():
    flat = [(1.0, 40.0), (5.0, 40.0)]
    assert curve_area(flat, 1.0, 5.0) == pytest.approx(40.0)
    step = [(1.0, 0.0), (3.0, 100.0)]
    assert curve_area(step, 1.0, 5.0, grid=4001) == pytest.approx(50.0, abs=0.1)
    assert math.isnan(curve_area(step, 2.0, 2.0))
    better = [(1.0, 10.0), (3.0, 100.0)]
    assert curve_area(better, 1.0, 5.0) > curve_area(step, 1.0, 5.0)


def test_pareto_keeps_only_undominated_points():
    points = [(3.0, 20.0), (1.0, 10.0), (4.0, 50.0), (2.0, 30.0), (5.0, 40.0)]
    assert pareto(points) == [(1.0, 10.0), (2.0, 30.0), (4.0, 50.0)]
    late = [(0.5, 0.0), (2.0, 30.0)]
    assert curve_area(late, 1.0, 3.0, grid=2001) == pytest.approx(15.0, abs=0.1)  # 0 until the curve starts


def test_sweep_refines_where_the_curve_jumps():
    import torch

    from brisklm.streaming.proactive.bench import sweep, threshold_at

    signal = torch.linspace(0.0, 1.0, 1001)  # entropy-like: WRITE if below the threshold
    assert threshold_at("entropy", signal, 0.3) == pytest.approx(0.7)
    assert threshold_at("probe", signal, 0.3) == pytest.approx(0.3)
    calls = []

    def run(t):  # a latency that jumps between thresholds 0.6 and 0.4
        calls.append(t)
        laal = 5.0 if t < 0.5 else 1.0
        return {"threshold": t, "bleu": 20.0 * laal, "laal": laal}

    rows = sweep(run, "entropy", signal, budget=9)
    assert len(rows) == len(calls) == 9
    strict = [r["strictness"] for r in rows]
    assert strict == sorted(strict)
    assert sum(0.3 < s < 0.7 for s in strict) >= 4  # the extra points went into the jump (0.5 -> 0.5 quantile)
