"""Answer-quality metrics for reasoning tasks: exact match, unbiased pass@k, accuracy under a token budget."""

from __future__ import annotations

from typing import Any, Iterable, Mapping, Sequence

from brisklm.errors import BriskError


def _normalise(text: str) -> str:
    """Collapse runs of whitespace and strip the ends, so spacing differences do not count."""
    return " ".join(text.split())


def exact_match_accuracy(predictions: Sequence[str], references: Sequence[str]) -> float:
    """Fraction of predictions equal to their reference after whitespace normalisation."""
    if len(predictions) != len(references):
        raise BriskError(
            f"{len(predictions)} predictions but {len(references)} references; pass one reference per prediction"
        )
    if not predictions:
        raise BriskError("exact_match_accuracy needs at least one prediction; pass a non-empty list")
    hits = sum(_normalise(p) == _normalise(r) for p, r in zip(predictions, references))
    return hits / len(predictions)


def pass_at_k(n: int, c: int, k: int) -> float:
    """Unbiased pass@k = 1 - C(n-c,k)/C(n,k), as a stable product (no huge binomials)."""
    if n <= 0 or not 0 <= c <= n:
        raise BriskError(f"pass_at_k needs n >= 1 and 0 <= c <= n, got n={n}, c={c}")
    if not 1 <= k <= n:
        raise BriskError(f"pass_at_k needs 1 <= k <= n, got k={k}, n={n}; draw at least k samples")
    if n - c < k:
        return 1.0
    # C(n-c,k)/C(n,k) = prod_{i=n-c+1..n} (1 - k/i)
    miss = 1.0
    for i in range(n - c + 1, n + 1):
        miss *= 1.0 - k / i
    return 1.0 - miss


def mean_pass_at_k(counts: Iterable[tuple[int, int]], k: int) -> float:
    """Mean pass@k over problems given as (samples drawn n, correct samples c) pairs."""
    values = [pass_at_k(n, c, k) for n, c in counts]
    if not values:
        raise BriskError("mean_pass_at_k needs at least one (n, c) pair; pass a non-empty list")
    return sum(values) / len(values)


def _field(record: Any, name: str) -> Any:
    """Read a field from a mapping or an object with that attribute."""
    if isinstance(record, Mapping):
        if name in record:
            return record[name]
    elif hasattr(record, name):
        return getattr(record, name)
    raise BriskError(f"record {record!r} has no '{name}'; each record needs 'correct' and 'length'")


def accuracy_under_budget(records: Iterable[Any], budget: int) -> float:
    """Fraction of records that are correct AND used at most `budget` tokens (longer ones count as wrong)."""
    if budget < 0:
        raise BriskError(f"budget must be non-negative, got {budget}; pass a token budget")
    items = list(records)
    if not items:
        raise BriskError("accuracy_under_budget needs at least one record; pass a non-empty list")
    hits = sum(bool(_field(r, "correct")) and int(_field(r, "length")) <= budget for r in items)
    return hits / len(items)
