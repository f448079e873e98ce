"""Streaming arithmetic: the question comes first, then fact sentences (some distractors) to reason over while reading."""

from __future__ import annotations

import random

from brisklm.errors import BriskError
from brisklm.tasks.base import Example, Task, sorted_vocab

VARIABLES = tuple("ABCDEFGH")
OPERATORS = ("+", "-", "*")
QUESTION_MARK, FACT_END, UNIT_END, SKIP, ANSWER = "Q:", ".", ";", "skip", "answer"
FROM = "from"


def apply_op(left: int, op: str, right: int, modulus: int) -> int:
    """Evaluate one fact's operation modulo the task modulus."""
    if op == "+":
        return (left + right) % modulus
    if op == "-":
        return (left - right) % modulus
    return (left * right) % modulus


class StreamingArithmeticTask(Task):
    """'Q: C ?' then facts like 'A = 3 .', 'B = A + 4 .'; the completion is one reasoning unit per fact."""

    name = "streaming_arithmetic"

    def __init__(self, min_steps: int = 2, max_steps: int = 4, min_distractors: int = 1,
                 max_distractors: int = 3, modulus: int = 100, name_start: bool = False) -> None:
        """Configure the relevant chain length, the number of distractor facts and the modulus (<= 100).

        name_start=True asks 'Q: C from A ?' (the chain's first variable is named), so whether a fact is a
        distractor can be decided the moment it is read, which streaming reasoning needs.
        """
        if not 1 <= min_steps <= max_steps or not 0 <= min_distractors <= max_distractors:
            raise BriskError("need 1 <= min_steps <= max_steps and 0 <= min_distractors <= max_distractors")
        if max_steps + max_distractors > len(VARIABLES):
            raise BriskError(f"max_steps + max_distractors must be <= {len(VARIABLES)} (one variable per fact)")
        if not 2 <= modulus <= 100:
            raise BriskError(f"modulus must be in 2..100, got {modulus}: numbers are single-word tokens 0..99")
        self.min_steps, self.max_steps = min_steps, max_steps
        self.min_distractors, self.max_distractors = min_distractors, max_distractors
        self.modulus = modulus
        self.name_start = bool(name_start)

    def vocabulary(self) -> list[str]:
        """Variables, numbers 0..modulus-1, operators and markers."""
        numbers = [str(i) for i in range(self.modulus)]
        markers = ("=", "?", QUESTION_MARK, FACT_END, UNIT_END, SKIP, ANSWER) + ((FROM,) if self.name_start else ())
        return sorted_vocab(VARIABLES, numbers, OPERATORS, markers)

    def _chain(self, rng: random.Random, names: list[str]) -> list[tuple[str, list[str], int]]:
        """A dependency chain: the first fact is a constant, each later one uses the previous variable."""
        facts: list[tuple[str, list[str], int]] = []
        value = 0
        for k, name in enumerate(names):
            if k == 0:
                value = rng.randrange(self.modulus)
                facts.append((name, [str(value)], value))
                continue
            op = rng.choice(OPERATORS)
            constant = rng.randint(2, 9) if op == "*" else rng.randint(1, min(20, self.modulus - 1))
            value = apply_op(value, op, constant, self.modulus)
            facts.append((name, [names[k - 1], op, str(constant)], value))
        return facts

    def generate(self, rng: random.Random) -> Example:
        """Draw a relevant chain and a distractor chain, interleave them in order, ask for the chain's end."""
        steps = rng.randint(self.min_steps, self.max_steps)
        n_distract = rng.randint(self.min_distractors, self.max_distractors)
        names = rng.sample(VARIABLES, steps + n_distract)
        relevant = self._chain(rng, names[:steps])
        distract = self._chain(rng, names[steps:]) if n_distract else []
        flags = [False] * steps + [True] * n_distract
        rng.shuffle(flags)  # a random merge that keeps each chain's own order
        order, r, d = [], iter(relevant), iter(distract)
        for is_distractor in flags:
            order.append((next(d) if is_distractor else next(r), is_distractor))
        target = relevant[-1][0]
        start = f" {FROM} {relevant[0][0]}" if self.name_start else ""
        question = f"{QUESTION_MARK} {target}{start} ?"
        facts = [f"{name} = {' '.join(rhs)} {FACT_END}" for (name, rhs, _), _ in order]
        units = [SKIP if dis else f"{name} = {value}" for (name, _, value), dis in order]
        answer = str(relevant[-1][2])
        completion = " ".join(f"{u} {UNIT_END}" for u in units) + f" {ANSWER} {answer}"
        meta = {
            "question": question,
            "facts": facts,
            "segments": [question, *facts],
            "distractors": [dis for _, dis in order],
            "units": units,
            "values": {name: value for (name, _, value), _ in order},
            "target": target,
            "answer": answer,
        }
        return Example(prompt=" ".join([question, *facts]), completion=completion, answer=answer, meta=meta)
