"""Simultaneous-translation latency (AL, LAAL, DAL, AP) with SimulEval's definitions, from the formulas.

Delays are 1-based counts: ``delays[i]`` is the number of source units read when target unit ``i + 1`` was
emitted. ``source_len`` is |X|; target lengths are counted in the same units as the delays.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable, Iterable, Mapping, Sequence

from brisklm.errors import BriskError


@dataclass(frozen=True)
class LatencyInstance:
    """One sentence's delays, source length and (optional) reference length, for corpus averages."""

    delays: Sequence[float]
    source_len: int
    reference_len: int | None = None


def _check(delays: Sequence[float], source_len: int) -> list[float]:
    """Validate the shared inputs and return the delays as a list of floats."""
    values = [float(d) for d in delays]
    if not values:
        raise BriskError("latency needs at least one delay; pass one delay per emitted target unit")
    if source_len <= 0:
        raise BriskError(f"source_len must be positive, got {source_len}; pass the number of source units")
    if any(d < 0 or math.isnan(d) for d in values):
        raise BriskError("delays must be non-negative counts of source units read; check the delay list")
    return values


def _check_positive(name: str, value: int) -> None:
    """Raise when a length argument is not a positive integer."""
    if value <= 0:
        raise BriskError(f"{name} must be positive, got {value}; pass the target length in delay units")


def _check_hyp_len(delays: Sequence[float], hyp_len: int) -> None:
    """Raise when the hypothesis length disagrees with the number of delays."""
    if hyp_len != len(delays):
        raise BriskError(
            f"hyp_len={hyp_len} but {len(delays)} delays were given; pass one delay per hypothesis unit"
        )


def _lagging(delays: list[float], source_len: int, gamma: float) -> float:
    """Shared AL/LAAL core: mean of d_i - (i-1)/gamma up to the first i with d_i >= |X|."""
    if delays[0] > source_len:
        return delays[0]
    tau = next((i + 1 for i, d in enumerate(delays) if d >= source_len), len(delays))
    return sum(delays[i] - i / gamma for i in range(tau)) / tau


def average_lagging(delays: Sequence[float], source_len: int, target_len: int) -> float:
    """AL with gamma = target_len/|X| (SimulEval passes the reference length by default)."""
    values = _check(delays, source_len)
    _check_positive("target_len", target_len)
    return _lagging(values, source_len, target_len / source_len)


def length_adaptive_average_lagging(
    delays: Sequence[float], source_len: int, hyp_len: int, ref_len: int
) -> float:
    """LAAL: AL with gamma = max(hyp, ref)/|X|, so over-generation cannot lower the latency."""
    values = _check(delays, source_len)
    _check_hyp_len(values, hyp_len)
    _check_positive("ref_len", ref_len)
    return _lagging(values, source_len, max(hyp_len, ref_len) / source_len)


def differentiable_average_lagging(delays: Sequence[float], source_len: int, hyp_len: int) -> float:
    """DAL: delays made to grow by at least 1/gamma per unit (gamma = hyp/|X|), averaged over all units."""
    values = _check(delays, source_len)
    _check_hyp_len(values, hyp_len)
    step = source_len / hyp_len
    total, previous = 0.0, 0.0
    for i, d in enumerate(values):
        current = d if i == 0 else max(d, previous + step)
        total += current - i * step
        previous = current
    return total / hyp_len


def average_proportion(delays: Sequence[float], source_len: int, target_len: int) -> float:
    """AP = sum(d_i) / (|X| * |Y|): the mean fraction of the source read per target unit."""
    values = _check(delays, source_len)
    _check_positive("target_len", target_len)
    return sum(values) / (source_len * target_len)


def _instance(item: LatencyInstance | Mapping) -> LatencyInstance:
    """Accept a LatencyInstance or a mapping with delays/source_len[/reference_len]."""
    if isinstance(item, LatencyInstance):
        return item
    try:
        return LatencyInstance(item["delays"], int(item["source_len"]), item.get("reference_len"))
    except (KeyError, TypeError) as error:
        raise BriskError(
            "each latency instance needs 'delays' and 'source_len' (and optional 'reference_len')"
        ) from error


def _al(x: LatencyInstance) -> float:
    """AL of one instance, with the reference length when given."""
    return average_lagging(x.delays, x.source_len, x.reference_len or len(x.delays))


def _laal(x: LatencyInstance) -> float:
    """LAAL of one instance (hypothesis length = number of delays)."""
    hyp = len(x.delays)
    return length_adaptive_average_lagging(x.delays, x.source_len, hyp, x.reference_len or hyp)


def _dal(x: LatencyInstance) -> float:
    """DAL of one instance (hypothesis length = number of delays)."""
    return differentiable_average_lagging(x.delays, x.source_len, len(x.delays))


def _ap(x: LatencyInstance) -> float:
    """AP of one instance, with the reference length when given."""
    return average_proportion(x.delays, x.source_len, x.reference_len or len(x.delays))


# SimulEval's default (use_ref_len=True): AL and AP use the reference length when one is given.
LATENCY_METRICS: dict[str, Callable[[LatencyInstance], float]] = {
    "AL": _al,
    "LAAL": _laal,
    "DAL": _dal,
    "AP": _ap,
}


def corpus_latency(instances: Iterable[LatencyInstance | Mapping], metric: str) -> float:
    """Mean of a per-sentence latency metric ('AL', 'LAAL', 'DAL' or 'AP') over a corpus."""
    fn = LATENCY_METRICS.get(metric.upper())
    if fn is None:
        raise BriskError(f"unknown latency metric '{metric}'; choose one of {', '.join(LATENCY_METRICS)}")
    values = [fn(_instance(item)) for item in instances]
    if not values:
        raise BriskError("corpus_latency needs at least one instance; pass a non-empty list")
    return sum(values) / len(values)
