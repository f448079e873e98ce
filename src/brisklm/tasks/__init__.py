"""brisklm.tasks: a word-level HF tokenizer and deterministic synthetic tasks for the tiny model zoo."""

from __future__ import annotations

import inspect
from typing import Any

from brisklm.errors import BriskError
from brisklm.tasks.base import Example, Task, split_of
from brisklm.tasks.cot_arithmetic import CotArithmeticTask, is_correct
from brisklm.tasks.icl import IclTask
from brisklm.tasks.mixed_lm import MixedLMTask
from brisklm.tasks.shapes_vqa import ShapesVQATask
from brisklm.tasks.streaming_arithmetic import StreamingArithmeticTask
from brisklm.tasks.tokenizer import build_word_tokenizer, decode_ids, encode_words
from brisklm.tasks.translation import TranslationTask, translate

TASKS: dict[str, type[Task]] = {
    "translation": TranslationTask,
    "streaming_arithmetic": StreamingArithmeticTask,
    "cot_arithmetic": CotArithmeticTask,
    "shapes_vqa": ShapesVQATask,
    "icl": IclTask,
    "mixed_lm": MixedLMTask,
}


def get_task(name: str, **options: Any) -> Task:
    """Build a registered task by name; unknown names or options raise BriskError listing what is valid."""
    if name not in TASKS:
        raise BriskError(f"unknown task {name!r}: choose one of {', '.join(TASKS)}")
    cls = TASKS[name]
    accepted = [p for p in inspect.signature(cls.__init__).parameters if p != "self"]
    bad = [k for k in options if k not in accepted]
    if bad:
        raise BriskError(f"unknown option(s) {bad} for task {name!r}: valid options are {', '.join(accepted)}")
    return cls(**options)


__all__ = [
    "TASKS", "CotArithmeticTask", "Example", "IclTask", "MixedLMTask", "ShapesVQATask", "StreamingArithmeticTask",
    "Task", "TranslationTask", "build_word_tokenizer", "decode_ids", "encode_words", "get_task", "is_correct",
    "split_of", "translate",
]
