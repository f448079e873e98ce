"""Bring-your-own parallel data for streaming training: JSONL (`source`, `target`) or TSV (source<TAB>target).

Each bad line is a one-line BriskError naming its line number; the sentences become word lists (split on
whitespace) that the text layer later turns into per-word token segments.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator, Sequence

from brisklm.errors import BriskError
from brisklm.tasks.base import Example


def _pair(source: object, target: object, where: str) -> Example:
    for name, value in (("source", source), ("target", target)):
        if not isinstance(value, str):
            raise BriskError(f"{where}: field {name!r} must be a string, got {type(value).__name__}")
    src, tgt = source.split(), target.split()
    if not src:
        raise BriskError(f"{where}: the source is empty; every line needs at least one source word")
    if not tgt:
        raise BriskError(f"{where}: the target is empty; every line needs at least one target word")
    return Example(" ".join(src), " ".join(tgt), " ".join(tgt), {"source_words": src, "target_words": tgt})


def parse_parallel(path: str | Path) -> Iterator[tuple[int, Example | BriskError]]:
    """(line number, Example or the BriskError that names what is wrong with that line) for every non-blank
    line of a .jsonl file (objects with string fields `source` and `target`) or a .tsv file (`source<TAB>target`).
    A missing or unknown file raises at once."""
    path = Path(path).expanduser()
    if not path.is_file():
        raise BriskError(f"--data {path} does not exist; pass a .jsonl or .tsv file of source/target pairs")
    kind = path.suffix.lower()
    if kind not in (".jsonl", ".tsv"):
        raise BriskError(f"--data {path}: unknown format {kind or '(no suffix)'}; use .jsonl (fields source, "
                         "target) or .tsv (source<TAB>target)")
    with path.open(encoding="utf-8") as handle:
        for number, line in enumerate(handle, start=1):
            if line.strip():
                try:
                    yield number, _parse_line(line, kind, f"{path.name} line {number}")
                except BriskError as error:
                    yield number, error


def _parse_line(line: str, kind: str, where: str) -> Example:
    if kind == ".jsonl":
        try:
            item = json.loads(line)
        except json.JSONDecodeError as error:
            raise BriskError(f"{where}: not valid JSON ({error.msg})") from None
        if not isinstance(item, dict) or "source" not in item or "target" not in item:
            raise BriskError(f"{where}: needs an object with fields 'source' and 'target'")
        return _pair(item["source"], item["target"], where)
    parts = line.rstrip("\n").split("\t")
    if len(parts) != 2:
        raise BriskError(f"{where}: needs exactly one tab between source and target (found {len(parts) - 1})")
    return _pair(parts[0], parts[1], where)


def read_parallel(path: str | Path) -> list[Example]:
    """Examples from a .jsonl or .tsv file (see parse_parallel); the first bad line raises; blank lines are
    skipped."""
    examples: list[Example] = []
    for _, item in parse_parallel(path):
        if isinstance(item, BriskError):
            raise item
        examples.append(item)
    if not examples:
        raise BriskError(f"--data {Path(path).expanduser()} has no source/target pairs")
    return examples


@dataclass
class NumberedPair:
    """A source/target pair with the line of the data file it came from."""

    line: int
    example: Example


def read_pairs(path: str | Path) -> tuple[list[NumberedPair], list[BriskError]]:
    """Every good pair of a .jsonl/.tsv file with its line number, and the error of every bad line (each names
    its line), so a command can report them all, one line each."""
    good: list[NumberedPair] = []
    bad: list[BriskError] = []
    for number, item in parse_parallel(path):
        if isinstance(item, BriskError):
            bad.append(item)
        else:
            good.append(NumberedPair(number, item))
    return good, bad


def check_encodable(text, examples: Sequence[Example], instruction: str | None = None, name: str = "data") -> None:
    """Build every example's GPE layout once before training, so a word the tokenizer cannot encode is
    reported with its example number instead of failing inside the trainer."""
    from brisklm.streaming.gpe import build_layout

    for number, example in enumerate(examples, start=1):
        try:
            build_layout(text, example.meta["source_words"], example.meta["target_words"], instruction=instruction)
        except BriskError as error:
            raise BriskError(f"{name} pair {number}: {error}") from None
