"""Wall-clock timing of a callable (warm-up, then repeats; the median resists noise on shared CPUs)."""

from __future__ import annotations

import statistics
import time
from contextlib import contextmanager
from typing import Any, Callable, Iterator

import torch

from brisklm.errors import BriskError


def _samples(fn: Callable[[], Any], repeats: int, warmup: int) -> list[float]:
    """Run `fn` warmup times untimed, then `repeats` times timed with perf_counter; return the seconds."""
    if repeats < 1:
        raise BriskError(f"repeats must be at least 1, got {repeats}")
    if warmup < 0:
        raise BriskError(f"warmup must be non-negative, got {warmup}")
    for _ in range(warmup):
        fn()
    seconds = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        seconds.append(time.perf_counter() - start)
    return seconds


def time_many(fn: Callable[[], Any], repeats: int = 5, warmup: int = 1) -> dict[str, float | int]:
    """Time `fn` and return median_s, min_s, max_s and repeats, for benchmark tables."""
    seconds = _samples(fn, repeats, warmup)
    return {
        "median_s": statistics.median(seconds),
        "min_s": min(seconds),
        "max_s": max(seconds),
        "repeats": repeats,
    }


def median_seconds(fn: Callable[[], Any], repeats: int = 5, warmup: int = 1) -> float:
    """Median wall-clock seconds of `fn` over `repeats` calls after `warmup` untimed calls."""
    return float(time_many(fn, repeats, warmup)["median_s"])


@contextmanager
def one_torch_thread() -> Iterator[None]:
    """Run the block with one torch thread: tiny models step per token, where threads only add contention."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


def interleaved_medians(fns: dict[str, Callable[[], Any]], repeats: int, warmup: int = 1) -> dict[str, float]:
    """Median seconds of each callable, timed in interleaved rounds whose order rotates by one each round
    (shared-CPU noise and any position effect hit all of them alike)."""
    if repeats < 1:
        raise BriskError(f"repeats must be at least 1, got {repeats}")
    samples: dict[str, list[float]] = {k: [] for k in fns}
    for _ in range(warmup):
        for fn in fns.values():
            fn()
    names = list(fns)
    for round_ in range(repeats):
        for name in names[round_ % len(names):] + names[:round_ % len(names)]:
            fn = fns[name]
            start = time.perf_counter()
            fn()
            samples[name].append(time.perf_counter() - start)
    return {k: statistics.median(v) for k, v in samples.items()}


def speedup_ratios(baseline_s: float, method_s: float, ideal: float) -> dict[str, float | None]:
    """Speed-up s = baseline / method, s / ideal and the strict (s - 1) / (ideal - 1): the share of the ideal
    saving that became wall-clock saving (None when the ideal is no saving)."""
    speedup = baseline_s / method_s
    return {"speedup": speedup, "speedup_over_ideal": speedup / ideal,
            "fraction_of_ideal": (speedup - 1) / (ideal - 1) if ideal > 1 else None}
