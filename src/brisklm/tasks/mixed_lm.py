"""Mixed-difficulty LM text: easy (copy, pattern, phrase), hard (computed) and random words, labelled per word."""

from __future__ import annotations

import random
from collections.abc import Callable

from brisklm.errors import BriskError
from brisklm.tasks.base import Example, Task, sorted_vocab

EASY, HARD, RANDOM = "easy", "hard", "random"
LETTERS = tuple("abcdefghijklmnopqrstuvwxyz")
DIGITS = tuple(str(i) for i in range(10))
PHRASES = (("once", "upon", "a", "time"), ("the", "quick", "brown", "fox"), ("thank", "you", "very", "much"),
           ("see", "you", "later"), ("as", "a", "matter", "of", "fact"))
MARKERS = ("copy", "repeat", "count", "sum", "recall", "noise", "|", "=", "?", ".")
KINDS = ("copy", "repeat", "count", "phrase", "sum", "recall", "noise")

Segment = list[tuple[str, str]]  # (word, difficulty)


def _copy(rng: random.Random) -> Segment:
    """'copy x y z | x y z .': the copied half is predictable by attention alone."""
    src = [rng.choice(LETTERS) for _ in range(rng.randint(2, 5))]
    return [("copy", RANDOM), *[(w, RANDOM) for w in src], ("|", RANDOM), *[(w, EASY) for w in src], (".", EASY)]


def _repeat(rng: random.Random) -> Segment:
    """'repeat a b c a b c a b c .': the period is always 3, so everything after the first period is fixed."""
    period = [rng.choice(LETTERS) for _ in range(3)]
    out = [("repeat", RANDOM), *[(w, RANDOM) for w in period]]
    out += [(w, EASY) for _ in range(2) for w in period]
    return out + [(".", EASY)]


def _count(rng: random.Random) -> Segment:
    """'count 3 4 5 6 .': only the start is unknown."""
    start = rng.randrange(10)
    nums = [str((start + i) % 10) for i in range(4)]
    return [("count", RANDOM), (nums[0], RANDOM), *[(w, EASY) for w in nums[1:]], (".", EASY)]


def _phrase(rng: random.Random) -> Segment:
    """A fixed phrase: the first word picks it, the rest follow."""
    words = rng.choice(PHRASES)
    return [(words[0], RANDOM), *[(w, EASY) for w in words[1:]], (".", EASY)]


def _sum(rng: random.Random) -> Segment:
    """'sum 3 4 = 7 .': the result needs computation (mod 10)."""
    a, b = rng.randrange(10), rng.randrange(10)
    return [("sum", RANDOM), (str(a), RANDOM), (str(b), RANDOM), ("=", EASY), (str((a + b) % 10), HARD), (".", EASY)]


def _recall(rng: random.Random) -> Segment:
    """'recall a 3 b 5 ? b 5 .': the answer needs a long-range key-value lookup."""
    keys = rng.sample(LETTERS, rng.randint(2, 4))
    values = [rng.choice(DIGITS) for _ in keys]
    out: Segment = [("recall", RANDOM)]
    for k, v in zip(keys, values):
        out += [(k, RANDOM), (v, RANDOM)]
    i = rng.randrange(len(keys))
    return out + [("?", RANDOM), (keys[i], RANDOM), (values[i], HARD), (".", EASY)]


def _noise(rng: random.Random) -> Segment:
    """'noise k 2 z .': irreducible random words."""
    words = [rng.choice(LETTERS + DIGITS) for _ in range(rng.randint(2, 5))]
    return [("noise", RANDOM), *[(w, RANDOM) for w in words], (".", RANDOM)]


BUILDERS: dict[str, Callable[[random.Random], Segment]] = {
    "copy": _copy, "repeat": _repeat, "count": _count, "phrase": _phrase, "sum": _sum, "recall": _recall,
    "noise": _noise,
}


class MixedLMTask(Task):
    """Plain LM text (all in prompt); meta['difficulty'] labels every word easy/hard/random."""

    name = "mixed_lm"

    def __init__(self, min_words: int = 48, max_words: int = 96, kinds: tuple[str, ...] = KINDS) -> None:
        """Configure the text length in words and which segment kinds to mix."""
        if not 1 <= min_words <= max_words:
            raise BriskError(f"need 1 <= min_words <= max_words, got {min_words}, {max_words}")
        bad = [k for k in kinds if k not in BUILDERS]
        if bad or not kinds:
            raise BriskError(f"unknown segment kind(s) {bad}: choose from {', '.join(KINDS)}")
        self.min_words, self.max_words, self.kinds = min_words, max_words, tuple(kinds)

    def vocabulary(self) -> list[str]:
        """Letters, digits, markers and phrase words."""
        return sorted_vocab(LETTERS, DIGITS, MARKERS, *PHRASES)

    def generate(self, rng: random.Random) -> Example:
        """Concatenate random segments up to a sampled length (the last one may be cut)."""
        length = rng.randint(self.min_words, self.max_words)
        pairs: Segment = []
        segments: list[tuple[str, int, int]] = []
        while len(pairs) < length:
            kind = rng.choice(self.kinds)
            start = len(pairs)
            pairs += BUILDERS[kind](rng)
            segments.append((kind, start, min(len(pairs), length)))
        pairs = pairs[:length]
        meta = {"difficulty": [d for _, d in pairs], "segments": segments}
        return Example(prompt=" ".join(w for w, _ in pairs), completion="", answer="", meta=meta)
