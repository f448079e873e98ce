"""User reasoning data: JSONL lines `{"question" or "prompt": ..., "answer": ..., "steps": [...] (optional)}`.

Each line becomes a `ReasoningExample` with the fields the methods read: `prompt` (what the model is asked),
`answer` (the reference the verifier compares with) and `steps` (the explicit chain of thought, step by step, for
latent CoT; None when the line has none). `completion` is the explicit training target: the steps, then the answer.
Bad lines are one-line errors naming the file and line number.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Sequence

from brisklm.errors import BriskError


@dataclass
class ReasoningExample:
    """One question with its reference answer and, optionally, its chain of thought as a list of steps."""

    prompt: str
    answer: str
    steps: tuple[str, ...] | None = None
    meta: dict[str, Any] = field(default_factory=dict)

    @property
    def completion(self) -> str:
        """The explicit target: the steps then the answer, space-joined."""
        return " ".join([*(self.steps or ()), self.answer])


def _field(record: dict, name: str, where: str) -> str:
    value = record.get(name)
    if not isinstance(value, (str, int, float)) or isinstance(value, bool) or not str(value).strip():
        raise BriskError(f"{where}: {name!r} must be a non-empty string")
    return str(value)


def load_jsonl(path: str | Path, verifier: Callable | None = None, need_steps: bool = False) -> list[ReasoningExample]:
    """Read reasoning examples; `verifier.check_reference` (when it has one) must read every answer.

    need_steps: every line must carry a non-empty `steps` list (latent CoT trains on the steps).
    """
    path = Path(path)
    if not path.is_file():
        raise BriskError(f"data file {path} does not exist; pass a JSONL file with one question per line")
    out: list[ReasoningExample] = []
    check = getattr(verifier, "check_reference", None)
    with path.open(encoding="utf-8") as handle:
        for number, line in enumerate(handle, start=1):
            if not line.strip():
                continue
            where = f"{path}, line {number}"
            try:
                record = json.loads(line)
            except json.JSONDecodeError as error:
                raise BriskError(f"{where}: not valid JSON ({error.msg})") from None
            if not isinstance(record, dict):
                raise BriskError(f"{where}: expected a JSON object with 'question' (or 'prompt') and 'answer'")
            key = "question" if "question" in record else "prompt"
            if key not in record or "answer" not in record:
                missing = [k for k in ("question", "answer") if k not in record and not (k == "question" and "prompt" in record)]
                raise BriskError(f"{where}: missing {' and '.join(repr(m) for m in missing)}; each line needs "
                                 "'question' (or 'prompt') and 'answer'")
            prompt, answer = _field(record, key, where), _field(record, "answer", where)
            steps = record.get("steps")
            if steps is not None:
                if not isinstance(steps, list) or not all(isinstance(s, str) and s.strip() for s in steps):
                    raise BriskError(f"{where}: 'steps' must be a list of non-empty strings")
                steps = tuple(s.strip() for s in steps)
            if need_steps and not steps:
                raise BriskError(f"{where}: latent CoT needs a non-empty 'steps' list (the explicit chain of thought)")
            if check is not None:
                try:
                    check(answer)
                except BriskError as error:
                    raise BriskError(f"{where}: {error}") from None
            out.append(ReasoningExample(prompt.strip(), answer.strip(), steps, {"line": number}))
    if not out:
        raise BriskError(f"data file {path} has no examples")
    return out


def prompts_of(examples: Sequence[Any]) -> list[str]:
    """The prompts of examples (built-in task examples or ReasoningExamples)."""
    return [e.prompt for e in examples]


@dataclass
class ExternalRollout:
    """A completion generated outside brisklm (e.g. by vLLM) for one question: what On-Policy SFT filters."""

    example: ReasoningExample
    completion: str
    finished: bool = True  # False when the engine stopped at its length limit (finish_reason "length")


def load_rollouts(path: str | Path, verifier: Callable | None = None) -> list[ExternalRollout]:
    """Read JSONL rollouts: `question` (or `prompt`), `answer`, `completion` and optional `finished` (default true).

    The same checks as `load_jsonl`, plus a string `completion` on every line (empty is allowed: an empty answer).
    """
    path = Path(path)
    examples = load_jsonl(path, verifier)
    out: list[ExternalRollout] = []
    with path.open(encoding="utf-8") as handle:
        records = [(n, json.loads(line)) for n, line in enumerate(handle, start=1) if line.strip()]
    for example, (number, record) in zip(examples, records):
        where = f"{path}, line {number}"
        if not isinstance(record.get("completion"), str):
            raise BriskError(f"{where}: missing 'completion' (the generated text to filter and train on)")
        finished = record.get("finished", True)
        if not isinstance(finished, bool):
            raise BriskError(f"{where}: 'finished' must be true or false")
        out.append(ExternalRollout(example, record["completion"], finished))
    return out
