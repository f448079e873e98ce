"""One progress-bar helper (tqdm on stderr) shared by benchmarks, demos and training loops."""

from __future__ import annotations

from typing import Iterable, Iterator, TypeVar

from tqdm.auto import tqdm

T = TypeVar("T")


def progress(
    iterable: Iterable[T], desc: str | None = None, total: int | None = None, leave: bool = False
) -> Iterator[T]:
    """Wrap an iterable in a tqdm bar, so long loops show how far they are."""
    return iter(tqdm(iterable, desc=desc, total=total, leave=leave, dynamic_ncols=True))


def quiet_progress(
    iterable: Iterable[T], desc: str | None = None, total: int | None = None, leave: bool = False
) -> Iterator[T]:
    """Same signature as `progress` without a bar, for tests and batch jobs."""
    return iter(iterable)
