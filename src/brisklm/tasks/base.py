"""Shared pieces of the synthetic tasks: the Example record, split hashing and the seeded sampling loop."""

from __future__ import annotations

import hashlib
import random
from abc import ABC, abstractmethod
from dataclasses import dataclass, field
from typing import Any

from brisklm.errors import BriskError

SPLITS: tuple[str, ...] = ("train", "test")
TEST_FRACTION = 0.2


@dataclass
class Example:
    """One generated item: prompt and completion are space-joined words; meta holds task-specific facts."""

    prompt: str
    completion: str
    answer: str
    meta: dict[str, Any] = field(default_factory=dict)


def check_split(split: str) -> None:
    """Raise a user error unless split is 'train' or 'test'."""
    if split not in SPLITS:
        raise BriskError(f"unknown split {split!r}: use one of {', '.join(SPLITS)}")


def split_of(key: str, test_fraction: float = TEST_FRACTION) -> str:
    """Assign a key to 'train' or 'test' by a stable SHA-256 bucket, so the splits never share a key."""
    bucket = int.from_bytes(hashlib.sha256(key.encode("utf-8")).digest()[:8], "big") % 10_000
    return "test" if bucket < int(test_fraction * 10_000) else "train"


def make_rng(*parts: object) -> random.Random:
    """A Random seeded from a string (stable across processes, unlike hash())."""
    return random.Random("|".join(str(p) for p in parts))


class Task(ABC):
    """A deterministic generator: vocabulary() lists every emitted word, examples() samples one split."""

    name: str = "task"

    @abstractmethod
    def vocabulary(self) -> list[str]:
        """Every word any example of this task can contain (sorted, unique)."""

    @abstractmethod
    def generate(self, rng: random.Random) -> Example:
        """Draw one example from rng, ignoring splits."""

    def split_key(self, example: Example) -> str:
        """The string whose hash decides the example's split (the prompt unless the task has hidden inputs)."""
        return example.prompt

    def examples(self, split: str, n: int, seed: int = 0) -> list[Example]:
        """Return n examples of one split; the same seed gives the same list, and splits are disjoint by key."""
        check_split(split)
        if n < 0:
            raise BriskError(f"n must be >= 0, got {n}: ask for a non-negative number of examples")
        rng = make_rng(self.name, split, seed)
        out: list[Example] = []
        tries, limit = 0, 1000 + 200 * n
        while len(out) < n:
            tries += 1
            if tries > limit:
                raise BriskError(
                    f"{self.name}: could only draw {len(out)} of {n} {split} examples; "
                    "widen the task options (longer inputs, more terms) or ask for fewer"
                )
            example = self.generate(rng)
            if split_of(self.split_key(example)) == split:
                out.append(example)
        return out


def sorted_vocab(*groups: object) -> list[str]:
    """Flatten word groups (strings or iterables of strings) into a sorted unique list."""
    words: set[str] = set()
    for group in groups:
        if isinstance(group, str):
            words.add(group)
        else:
            words.update(group)  # type: ignore[arg-type]
    return sorted(words)
