"""ICL classification prompts 'input -> label ;' with recognisable (meaningful) and arbitrary-label tasks."""

from __future__ import annotations

import random
from dataclasses import dataclass

from brisklm.errors import BriskError
from brisklm.tasks.base import Example, Task, make_rng, sorted_vocab

ARROW, DEMO_END = "->", ";"
FILLERS = ("today", "here", "really", "very", "again", "so", "quite", "truly")
DOMAINS: dict[str, tuple[tuple[str, ...], tuple[str, ...]]] = {
    "sentiment": (("good", "great", "happy", "nice", "lovely", "fine"),
                  ("bad", "awful", "sad", "poor", "ugly", "boring")),
    "category": (("cat", "dog", "horse", "bird", "fish", "cow"),
                 ("apple", "pear", "grape", "lemon", "mango", "plum")),
}
STATEMENT_WORDS = ("of", "is")


@dataclass(frozen=True)
class IclTaskSpec:
    """One classification task: which input domain, which two label words, and whether labels carry meaning."""

    name: str
    domain: str
    labels: tuple[str, str]
    recognisable: bool


TASK_SPECS: dict[str, IclTaskSpec] = {
    "sentiment": IclTaskSpec("sentiment", "sentiment", ("positive", "negative"), True),
    "category": IclTaskSpec("category", "category", ("animal", "fruit"), True),
    "sentiment_arbitrary": IclTaskSpec("sentiment_arbitrary", "sentiment", ("foo", "bar"), False),
    "category_arbitrary": IclTaskSpec("category_arbitrary", "category", ("baz", "qux"), False),
}


def label_rule(spec: IclTaskSpec, rule_seed: int = 0) -> dict[str, str]:
    """Key word -> label: the meaningful grouping for recognisable tasks, a fixed random half/half split otherwise."""
    first, second = DOMAINS[spec.domain]
    if spec.recognisable:
        return {**{w: spec.labels[0] for w in first}, **{w: spec.labels[1] for w in second}}
    rng = make_rng("icl-rule", spec.name, rule_seed)
    words = list(first + second)
    while True:  # reject shuffles that reproduce the meaningful grouping
        rng.shuffle(words)
        group = set(words[: len(first)])
        if group not in (set(first), set(second)):
            break
    return {w: spec.labels[0] if w in group else spec.labels[1] for w in words}


def knowledge_statements() -> list[str]:
    """Sentences like 'sentiment of great is positive' that teach a from-scratch model the recognisable tasks."""
    out = []
    for spec in TASK_SPECS.values():
        if spec.recognisable:
            out += [f"{spec.name} of {word} is {label}" for word, label in sorted(label_rule(spec).items())]
    return out


class IclTask(Task):
    """k demonstrations 'filler key -> label ;' then a query 'filler key ->'; the completion is the query label."""

    name = "icl"

    def __init__(self, tasks: tuple[str, ...] = tuple(TASK_SPECS), shots: int = 4, with_similar: bool = False,
                 mislabel_similar: bool = False, rule_seed: int = 0) -> None:
        """Choose the tasks to mix, the number of shots, and whether a same-key demonstration (maybe mislabelled) appears."""
        bad = [t for t in tasks if t not in TASK_SPECS]
        if bad or not tasks:
            raise BriskError(f"unknown ICL task(s) {bad}: choose from {', '.join(TASK_SPECS)}")
        if not 1 <= shots <= 11:
            raise BriskError(f"shots must be in 1..11, got {shots}: each demonstration needs its own key word")
        if mislabel_similar and not with_similar:
            raise BriskError("mislabel_similar needs with_similar=True: there is no similar demonstration to mislabel")
        self.tasks, self.shots = tuple(tasks), shots
        self.with_similar, self.mislabel_similar, self.rule_seed = with_similar, mislabel_similar, rule_seed
        self.rules = {t: label_rule(TASK_SPECS[t], rule_seed) for t in self.tasks}

    def vocabulary(self) -> list[str]:
        """Fillers, key words, every task's labels and names (for knowledge statements), and markers."""
        labels = [w for spec in TASK_SPECS.values() for w in spec.labels]
        keys = [w for groups in DOMAINS.values() for group in groups for w in group]
        return sorted_vocab(FILLERS, keys, labels, TASK_SPECS, STATEMENT_WORDS, (ARROW, DEMO_END))

    def generate(self, rng: random.Random) -> Example:
        """Draw a task, a query key, k demonstration keys (one equal to the query when asked) and label them."""
        spec = TASK_SPECS[rng.choice(self.tasks)]
        rule = self.rules[spec.name]
        keys = sorted(rule)
        query_key = rng.choice(keys)
        demo_keys = rng.sample([k for k in keys if k != query_key], self.shots - int(self.with_similar))
        similar_index = None
        if self.with_similar:
            similar_index = rng.randrange(self.shots)
            demo_keys.insert(similar_index, query_key)
        words: list[str] = []
        label_positions, demo_labels = [], []
        for i, key in enumerate(demo_keys):
            label = rule[key]
            if i == similar_index and self.mislabel_similar:
                label = spec.labels[1] if label == spec.labels[0] else spec.labels[0]
            words += [rng.choice(FILLERS), key, ARROW]
            label_positions.append(len(words))
            words += [label, DEMO_END]
            demo_labels.append(label)
        words += [rng.choice(FILLERS), query_key, ARROW]
        label = rule[query_key]
        meta = {
            "task": spec.name, "recognisable": spec.recognisable, "label_space": list(spec.labels),
            "task_word": spec.domain if spec.recognisable else None, "label_positions": label_positions,
            "demo_keys": demo_keys, "demo_labels": demo_labels, "query_key": query_key,
            "query_position": len(words) - 1, "similar_index": similar_index,
            "mislabeled": self.mislabel_similar, "label": label,
        }
        return Example(prompt=" ".join(words), completion=label, answer=label, meta=meta)
