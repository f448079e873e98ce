"""User ICL tasks for `brisk analyze pir|icl --tasks tasks.json`: loading, prompt building and label scoring.

The file is a JSON list of tasks:
  {"name": "sentiment", "task_word": "sentiment", "labels": ["positive", "negative"], "recognisable": true,
   "examples": [{"input": "a great film", "label": "positive"}, ...]}
A prompt is `input -> label ;` per demonstration, then `query ->` (the built-in tasks' format). Inputs and labels
may be several words and each word several tokens:
- a label is scored by its whole-label log-probability: the sum of log p(token | prompt, earlier label tokens) over
  all of its tokens, written after the arrow as the prompt writes them (mid-sentence form); the prediction is the
  label with the highest sum (ties: the first label in the file's order);
- PIR reads the label's last token (the one that has seen the whole label) and ranks the task word's first token.
"""

from __future__ import annotations

import json
import random
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import torch

from brisklm.analysis.lens import pad_right
from brisklm.core.adapter import ModelAdapter
from brisklm.core.device import model_device
from brisklm.core.executor import execute
from brisklm.core.text import TextLayer
from brisklm.errors import BriskError
from brisklm.tasks.base import Example, make_rng
from brisklm.tasks.icl import ARROW, DEMO_END


@dataclass(frozen=True)
class UserTask:
    """One classification task from a tasks file: labels in file order and (input, label) examples."""

    name: str
    task_word: str
    labels: tuple[str, ...]
    recognisable: bool
    examples: tuple[tuple[str, str], ...]

    @property
    def max_shots(self) -> int:
        """Demonstrations that fit: every demonstration and the query use different examples."""
        return len(self.examples) - 1


def _words(text: str) -> str:
    return " ".join(str(text).split())


def _task(record, index: int, where: str) -> UserTask:
    at = f"{where}: task {index + 1}"
    if not isinstance(record, dict):
        raise BriskError(f"{at} must be an object with name, task_word, labels, recognisable and examples")
    missing = [k for k in ("name", "task_word", "labels", "recognisable", "examples") if k not in record]
    if missing:
        raise BriskError(f"{at} lacks {', '.join(missing)}")
    name, word = _words(record["name"]), _words(record["task_word"])
    at = f"{where}: task {name!r}"
    if not name:
        raise BriskError(f"{where}: task {index + 1} has an empty name")
    if not word or len(word.split()) != 1:
        raise BriskError(f"{at}: task_word must be one word (the word PIR ranks), got {record['task_word']!r}")
    labels = record["labels"]
    if not isinstance(labels, list) or len(labels) < 2:
        raise BriskError(f"{at}: labels must be a list of at least two label words")
    labels = [_words(x) if isinstance(x, str) else "" for x in labels]
    if any(not x for x in labels):
        raise BriskError(f"{at}: a label word is empty; give every label a non-empty word")
    if len(set(labels)) != len(labels):
        same = sorted({x for x in labels if labels.count(x) > 1})
        raise BriskError(f"{at}: label words {same} are identical; every label needs its own word")
    if not isinstance(record["recognisable"], bool):
        raise BriskError(f"{at}: recognisable must be true or false")
    examples = record["examples"]
    if not isinstance(examples, list) or len(examples) < 2:
        raise BriskError(f"{at}: examples must list at least two {{\"input\", \"label\"}} objects")
    pairs = []
    for k, e in enumerate(examples, start=1):
        if not isinstance(e, dict) or not _words(e.get("input", "")) or not isinstance(e.get("label"), str):
            raise BriskError(f"{at}: example {k} needs a non-empty 'input' and a 'label'")
        if _words(e["label"]) not in labels:
            raise BriskError(f"{at}: example {k} has label {e['label']!r}, which is not in labels {labels}")
        pairs.append((_words(e["input"]), _words(e["label"])))
    return UserTask(name, word, tuple(labels), record["recognisable"], tuple(pairs))


def load_tasks(path: str | Path) -> list[UserTask]:
    """Read and check a tasks file (see the module docstring); every problem is a one-line BriskError."""
    path = Path(path)
    if not path.is_file():
        raise BriskError(f"tasks file {path} does not exist; pass a JSON list of tasks")
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as error:
        raise BriskError(f"{path}: not valid JSON ({error.msg}, line {error.lineno})") from None
    if not isinstance(data, list) or not data:
        raise BriskError(f"{path}: expected a non-empty JSON list of tasks")
    tasks = [_task(record, i, str(path)) for i, record in enumerate(data)]
    names = [t.name for t in tasks]
    if len(set(names)) != len(names):
        raise BriskError(f"{path}: task names must be unique, got {names}")
    return tasks


def pick_task(tasks: Sequence[UserTask], name: str | None) -> UserTask:
    """The task called `name` (or the only task when name is None)."""
    if name is None:
        if len(tasks) == 1:
            return tasks[0]
        raise BriskError(f"the tasks file has {len(tasks)} tasks; choose one with --task ({', '.join(t.name for t in tasks)})")
    for task in tasks:
        if task.name == name:
            return task
    raise BriskError(f"no task {name!r} in the tasks file; it has {', '.join(t.name for t in tasks)}")


def _other_label(task: UserTask, label: str) -> str:
    """The mislabelled choice: the next label in file order (cyclic)."""
    return task.labels[(task.labels.index(label) + 1) % len(task.labels)]


def task_examples(tasks: Sequence[UserTask], n: int, shots: int = 4, with_similar: bool = False,
                  mislabel_similar: bool = False, seed: int = 0) -> list[Example]:
    """n ICL prompts drawn from the tasks (a random task each), with the meta the analysis reads."""
    if not tasks:
        raise BriskError("no tasks to draw prompts from")
    if mislabel_similar and not with_similar:
        raise BriskError("mislabel_similar needs with_similar=True: there is no similar demonstration to mislabel")
    small = [t.name for t in tasks if shots > t.max_shots]
    if shots < 1 or small:
        raise BriskError(f"--shots {shots} needs {shots + 1} examples per task (demonstrations and the query differ); "
                         f"task(s) {small} have fewer: add examples or lower --shots")
    rng: random.Random = make_rng("user-icl", seed, shots, with_similar, mislabel_similar)
    out = []
    for _ in range(n):
        task = rng.choice(list(tasks))
        query = rng.randrange(len(task.examples))
        others = [i for i in range(len(task.examples)) if i != query]
        demos = rng.sample(others, shots - int(with_similar))
        similar_index = None
        if with_similar:
            similar_index = rng.randrange(shots)
            demos.insert(similar_index, query)
        words: list[str] = []
        label_positions, demo_labels = [], []
        for j, i in enumerate(demos):
            source, label = task.examples[i]
            if j == similar_index and mislabel_similar:
                label = _other_label(task, label)
            words += source.split() + [ARROW] + label.split()
            label_positions.append(len(words) - 1)  # the label's last word
            words.append(DEMO_END)
            demo_labels.append(label)
        source, label = task.examples[query]
        words += source.split() + [ARROW]
        meta = {"task": task.name, "recognisable": task.recognisable, "label_space": list(task.labels),
                "task_word": task.task_word, "pir_word": task.task_word, "label_positions": label_positions,
                "demo_labels": demo_labels, "query_position": len(words) - 1, "similar_index": similar_index,
                "mislabeled": mislabel_similar, "label": label, "user_task": True}
        out.append(Example(prompt=" ".join(words), completion=label, answer=label, meta=meta))
    return out


@torch.no_grad()
def label_log_probs(model, text: TextLayer, rows: Sequence[Sequence[int]],
                    label_spaces: Sequence[Sequence[str]], batch_size: int = 64) -> list[list[float]]:
    """For each prompt row (ids) and each of its labels: sum over the label's tokens of log p(token | everything
    before it), the label written after the prompt in mid-sentence form. One pass per (row, label) pair, batched."""
    adapter = ModelAdapter.from_model(model)
    device = model_device(model)
    jobs = []  # (row index, prompt length, label ids)
    for r, (row, labels) in enumerate(zip(rows, label_spaces)):
        for label in labels:
            jobs.append((r, list(row), [i for seg in text.word_segments(label.split(), at_start=False) for i in seg]))
    scores: list[list[float]] = [[] for _ in rows]
    for start in range(0, len(jobs), batch_size):
        chunk = jobs[start:start + batch_size]
        enc = pad_right([row + label for _, row, label in chunk], text.roles.pad_id)
        out = execute(model, enc.input_ids.to(device), attention_mask=enc.attention_mask.to(device), logits_rows="none")
        for k, (r, row, label) in enumerate(chunk):
            where = torch.arange(len(row) - 1, len(row) + len(label) - 1, device=device)  # rows that predict the label
            logp = torch.log_softmax(adapter.logits(out.last_hidden[k, where]).float(), dim=-1)  # (n, V)
            target = torch.tensor(label, device=device)
            scores[r].append(float(logp.gather(1, target[:, None]).sum()))
    return scores
