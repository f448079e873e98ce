"""The ICL coordinate system: accuracy and PIR in four quadrants (task recognised? similar demo present?).

Q1 recognised + similar, Q2 recognised only, Q3 neither, Q4 similar only. Manipulations: the similar demonstration
mislabelled (does the model copy it or follow its prior?), the shot count (do more shots help without a similar
example?) and, in Q3, how often the first demonstration's label is predicted. Prediction is the argmax over the
whole vocabulary at the last prompt token, read from the same recorded pass that gives PIR.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Sequence

import torch

from brisklm.analysis.lens import EncodedPrompts, decode_hidden, gather_positions, pad_right, run_recorded
from brisklm.analysis.pir import MODES, PirResult, concat_results, pir_from_output
from brisklm.analysis.user_tasks import UserTask, label_log_probs, task_examples
from brisklm.core.adapter import ModelAdapter
from brisklm.core.text import as_text_layer
from brisklm.errors import BriskError
from brisklm.tasks.base import Example
from brisklm.tasks.icl import TASK_SPECS, IclTask

QUADRANTS: dict[str, tuple[bool, bool]] = {"Q1": (True, True), "Q2": (True, False), "Q3": (False, False), "Q4": (False, True)}
RECOGNISABLE = tuple(n for n, s in TASK_SPECS.items() if s.recognisable)
ARBITRARY = tuple(n for n, s in TASK_SPECS.items() if not s.recognisable)
Progress = Callable[..., Any]


def _quiet(iterable, **_: Any):
    return iterable


@dataclass
class IclBatch:
    """Encoded ICL prompts with, per row (B,): label / query token positions and the relevant token ids.

    A position is the last token of its word (the one that has read the whole word); a word's id is its first token
    in mid-sentence form (what a next-token prediction of it is). On a word-level tokenizer both are the word's id.
    """

    enc: EncodedPrompts
    label_positions: torch.Tensor
    query_positions: torch.Tensor
    answer_ids: torch.Tensor
    task_ids: torch.Tensor
    first_label_ids: torch.Tensor
    similar_label_ids: torch.Tensor  # the label shown on the similar demonstration (-1 when there is none)


def task_word(example: Example) -> str:
    """The word naming an example's task: a user task's task_word, else the built-in input domain ('sentiment',
    'category'), also for arbitrary labels."""
    return example.meta.get("pir_word") or TASK_SPECS[example.meta["task"]].domain


def encode_icl(tokenizer, examples: Sequence[Example], label_index: int = -1) -> IclBatch:
    """Encode ICL examples; the PIR label is demonstration `label_index` (default: the last, as the public code)."""
    if not examples:
        raise BriskError("no ICL examples given")
    text = as_text_layer(tokenizer)
    rows, labels, queries, answers, tasks, firsts, similar = [], [], [], [], [], [], []
    for e in examples:
        positions = e.meta["label_positions"]
        if not -len(positions) <= label_index < len(positions):
            raise BriskError(f"label_index {label_index} is out of range for {len(positions)} demonstrations")
        row = [] if text.roles.bos_id is None else [text.roles.bos_id]
        ends = []  # ends[w]: position of the last token of prompt word w
        for segment in text.word_segments(e.prompt.split()):
            row += segment
            ends.append(len(row) - 1)
        rows.append(row)
        labels.append(ends[positions[label_index]])
        queries.append(ends[e.meta["query_position"]])
        answers.append(e.completion.split()[0])
        tasks.append(task_word(e))
        firsts.append(e.meta["demo_labels"][0].split()[0])  # (a label's first word: labels may be several words)
        idx = e.meta.get("similar_index")
        similar.append(None if idx is None else e.meta["demo_labels"][idx].split()[0])
    ids = lambda words: torch.tensor([text.first_token(w) for w in words], dtype=torch.long)  # noqa: E731
    sim = torch.tensor([-1 if w is None else text.first_token(w) for w in similar], dtype=torch.long)
    enc = pad_right(rows, text.roles.pad_id)
    return IclBatch(enc, torch.tensor(labels), torch.tensor(queries), ids(answers), ids(tasks), ids(firsts), sim)


@dataclass
class BatchAnalysis:
    """Predictions (B,) at the query and PIR results per mode for one batch."""

    predictions: torch.Tensor
    pir: dict[str, PirResult]


@torch.no_grad()
def analyse_batch(model, batch: IclBatch, modes: Sequence[str] = MODES) -> BatchAnalysis:
    """One recorded pass: next-token prediction at each query and PIR of the chosen label token."""
    adapter = ModelAdapter.from_model(model)
    out = run_recorded(model, batch.enc, record_attention="attn_contrib" in modes)
    queries = batch.query_positions.to(out.last_hidden.device)
    last = gather_positions(out.layer_hidden[-1], queries[:, None])[:, 0]  # (B, D)
    predictions = decode_hidden(adapter, last).argmax(dim=-1).cpu()  # compared with the host batch's answers
    pir = pir_from_output(adapter, out, batch.label_positions, batch.query_positions, batch.task_ids, tuple(modes))
    return BatchAnalysis(predictions, pir)


@dataclass
class ConditionResult:
    """Accuracy and behaviour rates of one condition, with PIR per mode over its prompts."""

    tasks: tuple[str, ...]
    shots: int
    with_similar: bool
    mislabel_similar: bool
    n: int
    accuracy: float
    copy_similar_rate: float | None
    first_label_rate: float
    in_label_space: float
    pir: dict[str, PirResult] = field(default_factory=dict)
    recognisable: bool | None = None  # whether every prompt's task is recognisable (None: a mix)

    def pir_mean(self, mode: str) -> float | None:
        return self.pir[mode].mean_pir() if mode in self.pir else None

    def pir_curve(self, mode: str) -> list[float] | None:
        return self.pir[mode].mean_curve() if mode in self.pir else None


def _is_user(tasks: Sequence) -> bool:
    return any(isinstance(t, UserTask) for t in tasks)


@torch.no_grad()
def evaluate_condition(model, tokenizer, tasks: Sequence, shots: int = 4, with_similar: bool = False,
                       mislabel_similar: bool = False, n: int = 64, seed: int = 0, batch_size: int = 64,
                       modes: Sequence[str] = MODES, rule_seed: int = 0) -> ConditionResult:
    """Sample n test prompts of one condition and measure accuracy, copying, first-label bias and PIR, batched.

    tasks: built-in task names (prediction = argmax over the whole vocabulary, compared with the label's first
    token) or `UserTask`s from a tasks file (prediction = the label with the highest whole-label log-probability,
    see `brisklm.analysis.user_tasks`).
    """
    if n < 1 or batch_size < 1:
        raise BriskError(f"n and batch_size must be >= 1 (got n={n}, batch_size={batch_size})")
    user = _is_user(tasks)
    if user:
        examples = task_examples(tasks, n, shots, with_similar, mislabel_similar, seed)
    else:
        task = IclTask(tuple(tasks), shots=shots, with_similar=with_similar, mislabel_similar=mislabel_similar,
                       rule_seed=rule_seed)
        examples = task.examples("test", n, seed=seed)
    text = as_text_layer(tokenizer)
    correct, copies, firsts, spaces, parts = [], [], [], [], {m: [] for m in modes}
    for start in range(0, n, batch_size):
        chunk = examples[start:start + batch_size]
        batch = encode_icl(tokenizer, chunk)
        result = analyse_batch(model, batch, modes)
        vocab_pred = result.predictions.tolist()
        spaces += [int(p) in {text.first_token(w.split()[0]) for w in e.meta["label_space"]}
                   for p, e in zip(vocab_pred, chunk)]
        if user:
            rows = [batch.enc.input_ids[i, :int(batch.enc.lengths[i])].tolist() for i in range(len(chunk))]
            scores = label_log_probs(model, text, rows, [e.meta["label_space"] for e in chunk], batch_size)
            predicted = [e.meta["label_space"][max(range(len(s)), key=lambda j: (s[j], -j))]
                         for s, e in zip(scores, chunk)]
            correct += [p == e.meta["label"] for p, e in zip(predicted, chunk)]
            firsts += [p == e.meta["demo_labels"][0] for p, e in zip(predicted, chunk)]
            copies += [e.meta["similar_index"] is not None and p == e.meta["demo_labels"][e.meta["similar_index"]]
                       for p, e in zip(predicted, chunk)]
        else:
            correct += (result.predictions == batch.answer_ids).tolist()
            firsts += (result.predictions == batch.first_label_ids).tolist()
            copies += (result.predictions == batch.similar_label_ids).tolist()
        for mode in modes:
            parts[mode].append(result.pir[mode])
    recognised = {bool(e.meta["recognisable"]) for e in examples}
    return ConditionResult(
        tasks=tuple(t.name if isinstance(t, UserTask) else t for t in tasks), shots=shots, with_similar=with_similar,
        mislabel_similar=mislabel_similar, n=n,
        accuracy=sum(correct) / n,
        copy_similar_rate=sum(copies) / n if with_similar else None,
        first_label_rate=sum(firsts) / n,
        in_label_space=sum(spaces) / n,
        pir={m: concat_results(parts[m]) for m in modes},
        recognisable=recognised.pop() if len(recognised) == 1 else None,
    )


@dataclass
class IclExperiment:
    """The coordinate-system experiment's rows (quadrants, mislabel, shots) and PIR curves per quadrant."""

    quadrants: dict[str, ConditionResult]
    mislabelled: dict[str, ConditionResult]
    shots: dict[str, dict[int, ConditionResult]]

    def quadrant_rows(self) -> list[dict[str, Any]]:
        """One table row per quadrant (plus the mislabelled-similar variants of Q1 and Q4)."""
        rows = []
        for name, res in [*self.quadrants.items(), *((f"{k} mislabelled", v) for k, v in self.mislabelled.items())]:
            rows.append({
                "quadrant": name, "tasks": "recognisable" if res.recognisable else "arbitrary",
                "similar demo": ("mislabelled" if res.mislabel_similar else "yes") if res.with_similar else "no",
                "shots": res.shots, "n": res.n, "accuracy": res.accuracy,
                "copies similar label": res.copy_similar_rate, "predicts first demo label": res.first_label_rate,
                "PIR residual": res.pir_mean("residual"), "PIR attn_contrib": res.pir_mean("attn_contrib"),
            })
        return rows

    def shot_rows(self) -> list[dict[str, Any]]:
        """Accuracy per shot count for the quadrants without a similar demonstration."""
        return [{"quadrant": q, "shots": k, "accuracy": r.accuracy, "predicts first demo label": r.first_label_rate}
                for q, by_shots in self.shots.items() for k, r in sorted(by_shots.items())]

    def to_json(self) -> dict[str, Any]:
        """JSON-able figures: the tables and the mean PIR curve per quadrant and mode."""
        curves = {q: {m: r.pir_curve(m) for m in r.pir} for q, r in self.quadrants.items()}
        return {"quadrants": self.quadrant_rows(), "shots": self.shot_rows(), "pir_curves": curves}


def run_icl_experiment(model, tokenizer, n: int = 64, shots: int = 4, shot_counts: Sequence[int] = (1, 2, 4, 8),
                       seed: int = 0, batch_size: int = 64, progress: Progress = _quiet,
                       tasks: Sequence[UserTask] | None = None) -> IclExperiment:
    """Run the four quadrants, the mislabelled-similar manipulation and the shot sweep on one model.

    tasks: user tasks (from a tasks file) instead of the built-in ones; the recognisable ones make Q1/Q2, the others
    Q3/Q4. Quadrants without tasks are left out, and shot counts above what a group's tasks hold are skipped.
    """
    if tasks is None:
        groups: dict[bool, Sequence] = {True: RECOGNISABLE, False: ARBITRARY}
    else:
        groups = {flag: [t for t in tasks if t.recognisable == flag] for flag in (True, False)}
        if not tasks:
            raise BriskError("the tasks file has no tasks")
    limit = {flag: min((t.max_shots for t in group), default=0) if tasks is not None else 11
             for flag, group in groups.items()}
    jobs: list[tuple[str, Any, dict[str, Any]]] = []
    for name, (recognised, similar) in QUADRANTS.items():
        if not groups[recognised]:
            continue
        jobs.append(("quadrant", name, dict(tasks=groups[recognised], shots=shots, with_similar=similar)))
        if similar:
            jobs.append(("mislabelled", name, dict(tasks=groups[recognised], shots=shots,
                                                     with_similar=True, mislabel_similar=True)))
    for name, flag in (("Q2", True), ("Q3", False)):
        for k in shot_counts:
            if k != shots and groups[flag] and k <= limit[flag]:
                jobs.append(("shots", (name, k), dict(tasks=groups[flag], shots=k)))
    quadrants: dict[str, ConditionResult] = {}
    mislabelled: dict[str, ConditionResult] = {}
    by_shots: dict[str, dict[int, ConditionResult]] = {"Q2": {}, "Q3": {}}
    for kind, key, kwargs in progress(jobs, desc="ICL conditions"):
        modes = MODES if kind == "quadrant" else ()
        res = evaluate_condition(model, tokenizer, n=n, seed=seed, batch_size=batch_size, modes=modes, **kwargs)
        if kind == "quadrant":
            quadrants[key] = res
        elif kind == "mislabelled":
            mislabelled[key] = res
        else:
            by_shots[key[0]][key[1]] = res
    for name in ("Q2", "Q3"):
        if shots in shot_counts and name in quadrants:
            by_shots[name][shots] = quadrants[name]
    by_shots = {name: rows for name, rows in by_shots.items() if rows}
    return IclExperiment(quadrants, mislabelled, by_shots)


def plot_experiment(exp: IclExperiment) -> Any:
    """A figure: PIR per layer (both modes) per quadrant, accuracy per quadrant, accuracy against shots."""
    from brisklm.eval.report import new_figure

    fig = new_figure(13.0, 3.6)
    axes = fig.subplots(1, 4)
    styles = {"Q1": "C0-", "Q2": "C0--", "Q3": "C3-", "Q4": "C3--"}
    for ax, mode in zip(axes[:2], MODES):
        for q, res in exp.quadrants.items():
            curve = res.pir_curve(mode)
            ax.plot(range(1, len(curve) + 1), curve, styles[q], marker="o", label=q)
        ax.set_title(f"inverse rank per layer ({mode})")
        ax.set_xlabel("layer")
        ax.set_ylim(0, 1.05)
        ax.legend(fontsize=7)
    names = list(exp.quadrants) + [f"{k}\nmislab." for k in exp.mislabelled]
    values = [r.accuracy for r in exp.quadrants.values()] + [r.accuracy for r in exp.mislabelled.values()]
    axes[2].bar(range(len(values)), values, color=[styles[q][:2] for q in exp.quadrants] + ["C7"] * len(exp.mislabelled))
    axes[2].set_xticks(range(len(values)), names, fontsize=7)
    axes[2].set_ylim(0, 1.05)
    axes[2].set_title("accuracy per quadrant")
    for q, by_shots in exp.shots.items():
        ks = sorted(by_shots)
        axes[3].plot(ks, [by_shots[k].accuracy for k in ks], styles[q], marker="o", label=q)
    axes[3].set_xlabel("shots")
    axes[3].set_ylim(0, 1.05)
    axes[3].set_title("accuracy vs shots (no similar demo)")
    axes[3].legend(fontsize=7)
    fig.tight_layout()
    return fig


def save_plot(exp: IclExperiment, path: Path) -> Path:
    """Write the experiment's figure as PNG."""
    path.parent.mkdir(parents=True, exist_ok=True)
    plot_experiment(exp).savefig(path)
    return path


@torch.no_grad()
def pir_for_task(model, tokenizer, task: "str | UserTask", n: int = 64, shots: int = 4, with_similar: bool = False,
                 seed: int = 0, batch_size: int = 64, modes: Sequence[str] = MODES) -> ConditionResult:
    """PIR (and accuracy) of one ICL task: a built-in name ('sentiment', 'sentiment_arbitrary') or a UserTask."""
    if not isinstance(task, UserTask) and task not in TASK_SPECS:
        raise BriskError(f"unknown ICL task {task!r}: choose from {', '.join(TASK_SPECS)}")
    return evaluate_condition(model, tokenizer, [task], shots=shots, with_similar=with_similar, n=n, seed=seed,
                              batch_size=batch_size, modes=modes)
