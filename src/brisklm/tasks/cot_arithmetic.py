"""Multi-step arithmetic with a verbose, redundant chain of thought and its minimal equivalent, plus a verifier."""

from __future__ import annotations

import random

from brisklm.errors import BriskError
from brisklm.tasks.base import Example, Task, sorted_vocab

ANSWER_MARKER = "answer"
QUESTION_MARKER = "Q:"
STEP_END = ";"
OPERATORS = ("+", "-")
# Redundant lines added after a step: (template, words it uses). {a} {op} {b} {c} are the step's numbers.
REDUNDANT_LINES = (
    "check {a} {op} {b} = {c} ok",
    "so the total is {c}",
    "again {a} {op} {b} gives {c}",
    "let me think the total is still {c}",
    "wait , recheck {a} {op} {b} = {c} yes",
)
OPENERS = ("we need {problem}", "let us compute {problem} step by step", "the problem is {problem}")
FILLER_WORDS = ("check", "ok", "so", "the", "total", "is", "again", "gives", "let", "me", "think", "still",
                "wait", ",", "recheck", "yes", "we", "need", "us", "compute", "step", "by", "problem")


def parse_answer(completion_text: str) -> str | None:
    """The word after the last answer marker, or None when the text has no complete answer."""
    words = completion_text.split()
    for i in range(len(words) - 1, -1, -1):
        if words[i] == ANSWER_MARKER:
            return words[i + 1] if i + 1 < len(words) else None
    return None


def is_correct(completion_text: str, example: Example) -> bool:
    """True when the answer after the last marker equals the example's answer (the reward for on-policy SFT)."""
    return parse_answer(completion_text) == example.answer


class CotArithmeticTask(Task):
    """'Q: 3 + 5 - 2 =' evaluated left to right mod m; completions carry a verbose or a minimal chain of thought."""

    name = "cot_arithmetic"

    def __init__(self, min_terms: int = 4, max_terms: int = 5, modulus: int = 10, verbosity: float = 0.5,
                 max_redundant: int = 3, style: str = "verbose", recheck: str = "each_step") -> None:
        """Configure the number of terms, modulus, the chance of each redundant line, which CoT is the completion,
        and where the verbose CoT re-checks: after each step (`each_step`, with an opener restating the problem), or
        only at the `end` (the minimal steps first, then the re-check lines, all about the final step)."""
        if not 2 <= min_terms <= max_terms:
            raise BriskError(f"need 2 <= min_terms <= max_terms, got {min_terms}, {max_terms}")
        if not 2 <= modulus <= 100:
            raise BriskError(f"modulus must be in 2..100, got {modulus}: numbers are single-word tokens")
        if not 0.0 <= verbosity <= 1.0 or max_redundant < 0:
            raise BriskError("verbosity must be in [0, 1] and max_redundant >= 0")
        if style not in ("verbose", "minimal"):
            raise BriskError(f"unknown style {style!r}: use 'verbose' or 'minimal'")
        if recheck not in ("each_step", "end"):
            raise BriskError(f"unknown recheck {recheck!r}: use 'each_step' or 'end'")
        self.recheck = recheck
        self.min_terms, self.max_terms, self.modulus = min_terms, max_terms, modulus
        self.verbosity, self.max_redundant, self.style = verbosity, max_redundant, style

    def vocabulary(self) -> list[str]:
        """Numbers, operators, markers and the filler words of the verbose chain of thought."""
        numbers = [str(i) for i in range(self.modulus)]
        return sorted_vocab(numbers, OPERATORS, FILLER_WORDS, ("=", STEP_END, ANSWER_MARKER, QUESTION_MARKER))

    def generate(self, rng: random.Random) -> Example:
        """Draw the terms, run the left-to-right evaluation and write both chains of thought."""
        n_terms = rng.randint(self.min_terms, self.max_terms)
        terms = [rng.randrange(self.modulus) for _ in range(n_terms)]
        ops = [rng.choice(OPERATORS) for _ in range(n_terms - 1)]
        problem = " ".join([str(terms[0])] + [f"{op} {t}" for op, t in zip(ops, terms[1:])])
        at_end = self.recheck == "end"
        minimal, verbose, tail = [], [] if at_end else [rng.choice(OPENERS).format(problem=problem) + f" {STEP_END}"], []
        steps, total = [], terms[0]
        for op, term in zip(ops, terms[1:]):
            new = (total + term if op == "+" else total - term) % self.modulus
            line = f"{total} {op} {term} = {new} {STEP_END}"
            steps.append(f"{total} {op} {term} = {new}")
            minimal.append(line)
            verbose.append(line)
            for _ in range(self.max_redundant):
                if rng.random() < self.verbosity:
                    tail.append(rng.choice(REDUNDANT_LINES))
                    if not at_end:  # re-check this step now; at the end every re-check is about the final step
                        verbose.append(tail.pop().format(a=total, op=op, b=term, c=new) + f" {STEP_END}")
            last = dict(a=total, op=op, b=term, c=new)
            total = new
        verbose += [template.format(**last) + f" {STEP_END}" for template in tail]
        answer = str(total)
        tail = f"{ANSWER_MARKER} {answer}"
        minimal_cot = " ".join([*minimal, tail])
        verbose_cot = " ".join([*verbose, tail])
        meta = {"terms": terms, "ops": ops, "steps": steps, "minimal_cot": minimal_cot,
                "verbose_cot": verbose_cot, "answer": answer}
        completion = verbose_cot if self.style == "verbose" else minimal_cot
        return Example(prompt=f"{QUESTION_MARKER} {problem} =", completion=completion, answer=answer, meta=meta)

    def is_correct(self, completion_text: str, example: Example) -> bool:
        """Method form of the module-level verifier."""
        return is_correct(completion_text, example)
