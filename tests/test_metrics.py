"""Hand-computed checks of BLEU, SimulEval latency metrics, exact match, pass@k and budgeted accuracy."""

from __future__ import annotations

import math

import pytest

from brisklm.errors import BriskError
from brisklm.eval.metrics import (
    LatencyInstance,
    accuracy_under_budget,
    average_lagging,
    average_proportion,
    bleu,
    corpus_latency,
    differentiable_average_lagging,
    exact_match_accuracy,
    length_adaptive_average_lagging,
    mean_pass_at_k,
    pass_at_k,
)


def wait_k(k: int, source_len: int, target_len: int) -> list[int]:
    """Ideal wait-k delays: d_i = min(k + i - 1, |X|) for i = 1..|Y|."""
    return [min(k + i - 1, source_len) for i in range(1, target_len + 1)]


@pytest.mark.parametrize("k, ap", [(1, 0.525), (3, 0.6175), (5, 0.7)])
def test_ideal_wait_k_equal_lengths(k: int, ap: float) -> None:
    # AP by hand: k=1 sum(1..20)=210; k=3 sum(3..20)+2*20=247; k=5 sum(5..20)+4*20=280; over 20*20=400.
    d = wait_k(k, 20, 20)
    assert average_lagging(d, 20, 20) == pytest.approx(k)
    assert length_adaptive_average_lagging(d, 20, 20, 20) == pytest.approx(k)
    assert differentiable_average_lagging(d, 20, 20) == pytest.approx(k)
    assert average_proportion(d, 20, 20) == pytest.approx(ap)


def test_first_delay_beyond_source_returns_it() -> None:
    d = [7, 7, 7]
    assert average_lagging(d, 5, 3) == 7
    assert length_adaptive_average_lagging(d, 5, 3, 4) == 7


def test_over_generation_laal_penalised() -> None:
    # wait-3, |X|=20, |Y_hyp|=26, |Y*|=20: tau=18 (d_18 = 20).
    d = wait_k(3, 20, 26)
    assert len(d) == 26
    # AL with the reference length: gamma=1, every term d_i-(i-1) = 3.
    assert average_lagging(d, 20, 20) == pytest.approx(3.0)
    # LAAL: gamma=26/20, (sum_{i=1..18}(i+2) - (20/26) * sum_{i=1..18}(i-1)) / 18 = (207 - 153*20/26) / 18.
    expected = (207 - 153 * 20 / 26) / 18
    assert expected == pytest.approx(4.9615, abs=1e-4)
    assert length_adaptive_average_lagging(d, 20, 26, 20) == pytest.approx(expected)
    # AL with the hypothesis length uses the same gamma as LAAL here (hyp > ref).
    assert average_lagging(d, 20, 26) == pytest.approx(expected)


def test_tau_uses_all_when_source_never_finished() -> None:
    d = [1, 2, 3]  # never reaches |X| = 10, gamma = 3/10
    expected = ((1 - 0) + (2 - 10 / 3) + (3 - 20 / 3)) / 3
    assert average_lagging(d, 10, 3) == pytest.approx(expected)


def test_dal_enforces_minimum_step() -> None:
    # |X|=4, |Y|=4 (gamma=1): d=[4,4,4,4] -> d'=[4,5,6,7]; terms 4,4,4,4.
    assert differentiable_average_lagging([4, 4, 4, 4], 4, 4) == pytest.approx(4.0)


def test_latency_errors() -> None:
    with pytest.raises(BriskError):
        average_lagging([], 5, 5)
    with pytest.raises(BriskError):
        average_proportion([1, 2], 0, 2)
    with pytest.raises(BriskError):
        differentiable_average_lagging([1, 2], 5, 3)
    with pytest.raises(BriskError):
        corpus_latency([LatencyInstance([1], 1)], "XYZ")


def test_corpus_latency_averages_sentences() -> None:
    instances = [LatencyInstance(wait_k(1, 20, 20), 20, 20), {"delays": wait_k(3, 20, 20), "source_len": 20}]
    assert corpus_latency(instances, "AL") == pytest.approx(2.0)
    assert corpus_latency(instances, "laal") == pytest.approx(2.0)
    assert corpus_latency(instances, "DAL") == pytest.approx(2.0)
    assert corpus_latency(instances, "AP") == pytest.approx((0.525 + 0.6175) / 2)


def direct_pass_at_k(n: int, c: int, k: int) -> float:
    return 1.0 - math.comb(n - c, k) / math.comb(n, k)


def test_pass_at_k_edges_and_middle() -> None:
    assert pass_at_k(10, 0, 3) == 0.0
    assert pass_at_k(10, 10, 3) == 1.0
    assert pass_at_k(10, 3, 1) == pytest.approx(0.3)
    for n, c, k in [(10, 3, 2), (20, 5, 5), (100, 7, 10), (5, 4, 2)]:
        assert pass_at_k(n, c, k) == pytest.approx(direct_pass_at_k(n, c, k))
    assert mean_pass_at_k([(10, 0), (10, 10)], 3) == pytest.approx(0.5)
    with pytest.raises(BriskError):
        pass_at_k(5, 2, 6)
    with pytest.raises(BriskError):
        pass_at_k(5, 6, 1)


def test_exact_match_and_budget() -> None:
    assert exact_match_accuracy(["a  b", " 12 ", "x"], ["a b", "12", "y"]) == pytest.approx(2 / 3)
    with pytest.raises(BriskError):
        exact_match_accuracy(["a"], [])
    records = [
        {"correct": True, "length": 10},
        {"correct": True, "length": 11},  # over budget: wrong
        {"correct": False, "length": 3},
        {"correct": True, "length": 1},
    ]
    assert accuracy_under_budget(records, 10) == pytest.approx(0.5)
    assert accuracy_under_budget(records, 100) == pytest.approx(0.75)


def test_bleu_identical_is_100() -> None:
    hyps = ["the cat sat on the mat .", "a quick brown fox jumps over the lazy dog"]
    assert bleu(hyps, hyps) == pytest.approx(100.0)
    assert bleu(["completely different words here"], ["the cat sat on the mat"]) < 10
    with pytest.raises(BriskError):
        bleu(["a"], ["a", "b"])
