"""Answers and evaluation of every visual-token method on user data (a QA JSONL) or ShapesVQA.

`generate_answers` decodes through the shared generation loop (batched, greedy or sampled) with a method applied
during prefill; `evaluate` runs dense and each method at each budget over the same questions and reports accuracy
kept, the executor-counted prefill FLOPs ratio and the measured prefill / decode time against dense (one pass each,
same run); `plot` draws accuracy kept against the FLOPs ratio.
"""

from __future__ import annotations

import json
import re
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Sequence

import torch

from brisklm.core.adapter import ModelAdapter
from brisklm.core.flops import FlopsCounter
from brisklm.errors import BriskError
from brisklm.vision.common import flops_ratio
from brisklm.vision.processor import load_image
from brisklm.vision.prune import PruneSpec, prune_generate, prune_prefill
from brisklm.vision.vlm import LoadedVLM

LETTERS = "ABCDEFGHIJKLMNOPQRSTUVWXYZ"
CHOICE_INSTRUCTION = "Answer with the option's letter from the given choices directly."
PRUNING_METHODS = ("fastv", "pdrop", "visipruner")


@dataclass
class QAItem:
    """One question: its image(s), the text shown to the model, the expected answer (a letter for choices)."""

    images: list[Any]
    question: str
    answer: str
    choice: bool = False
    options: list[str] = field(default_factory=list)
    line: int = 0


def _choice_item(images, question: str, answer: str, options: list[str] | None, line: int) -> QAItem:
    """A multiple-choice item: the options listed under the question, the answer as an option letter."""
    if options is None:  # the question lists its own options; the answer is their letter
        return QAItem(images, question, answer.strip().upper(), True, [], line)
    if not 2 <= len(options) <= len(LETTERS) or not all(isinstance(o, str) and o.strip() for o in options):
        raise BriskError(f"line {line}: 'options' must be a list of 2 to {len(LETTERS)} non-empty strings")
    letters = LETTERS[:len(options)]
    if answer.strip().upper() in letters and len(answer.strip()) == 1:
        expected = answer.strip().upper()
    elif normalize(answer) in [normalize(o) for o in options]:
        expected = letters[[normalize(o) for o in options].index(normalize(answer))]
    else:
        raise BriskError(f"line {line}: answer {answer!r} is neither an option letter ({', '.join(letters)}) "
                         "nor one of the options")
    listed = "\n".join(f"{letter}. {option}" for letter, option in zip(letters, options))
    return QAItem(images, f"{question}\n{listed}\n{CHOICE_INSTRUCTION}", expected, True, list(options), line)


def read_qa(path: str | Path) -> list[QAItem]:
    """Read a QA JSONL: per line `image` (a path relative to the file, or a list of paths), `question`, `answer`,
    optionally `options` (multiple choice: scored by option letter). Bad lines name their line number."""
    path = Path(path)
    if not path.is_file():
        raise BriskError(f"data file {path} does not exist; pass a JSONL file with image, question and answer fields")
    items: list[QAItem] = []
    for number, raw in enumerate(path.read_text(encoding="utf-8").splitlines(), start=1):
        if not raw.strip():
            continue
        try:
            record = json.loads(raw)
        except json.JSONDecodeError as error:
            raise BriskError(f"{path}: line {number} is not valid JSON ({error.msg}); write one JSON object per line") from None
        if not isinstance(record, dict):
            raise BriskError(f"{path}: line {number} is not a JSON object; write {{\"image\": ..., \"question\": ..., "
                             "\"answer\": ...}")
        missing = [k for k in ("image", "question", "answer") if k not in record]
        if missing:
            raise BriskError(f"{path}: line {number} lacks the field(s) {', '.join(missing)}; every line needs "
                             "image, question and answer")
        names = record["image"] if isinstance(record["image"], list) else [record["image"]]
        if not names or not all(isinstance(n, str) and n for n in names) or not isinstance(record["question"], str):
            raise BriskError(f"{path}: line {number}: 'image' must be a path (or a list of paths) and 'question' a string")
        answer = str(record["answer"])
        try:
            images = [load_image(path.parent / name) for name in names]
        except BriskError as error:
            raise BriskError(f"{path}: line {number}: {error}") from None
        options = record.get("options")
        if options is not None and not isinstance(options, list):
            raise BriskError(f"{path}: line {number}: 'options' must be a list of strings")
        single_letter = len(answer.strip()) == 1 and answer.strip().isupper()
        try:
            items.append(_choice_item(images, record["question"], answer, options, number)
                         if options is not None or single_letter else
                         QAItem(images, record["question"], answer, False, [], number))
        except BriskError as error:
            raise BriskError(f"{path}: {error}") from None
    if not items:
        raise BriskError(f"{path} holds no questions; write one JSON object per line")
    return items


def shapes_items(n: int, seed: int = 0) -> list[QAItem]:
    """ShapesVQA test questions (the default data) as QA items."""
    from brisklm.tasks import get_task
    from brisklm.vision.zoo import TASK_OPTIONS

    if n < 1:
        raise BriskError(f"--n must be at least 1, got {n}")
    return [QAItem([e.meta["image"]], e.prompt, e.answer) for e in
            get_task("shapes_vqa", **TASK_OPTIONS).examples("test", n, seed=seed)]


# ----------------------------------------------------------------------------------------------- scoring


def normalize(text: str) -> str:
    """Lower case, single spaces, no surrounding quotes or trailing punctuation (what exact match compares)."""
    text = " ".join(str(text).lower().split())
    return text.strip("\"'`").rstrip(".!?,;:").strip()


def predicted_letter(prediction: str, options: Sequence[str] = ()) -> str | None:
    """The option letter a prediction gives: a leading letter ("B", "(B)", "B. cat"), or an option's text."""
    match = re.match(r"^\s*\(?([A-Za-z])(?:[\).:,]|\s|$)", prediction)
    if match:
        return match.group(1).upper()
    texts = [normalize(o) for o in options]
    return LETTERS[texts.index(normalize(prediction))] if normalize(prediction) in texts else None


def is_correct(prediction: str, item: QAItem) -> bool:
    """Exact match after `normalize`, or the option letter for multiple choice."""
    if item.choice:
        return predicted_letter(prediction, item.options) == item.answer
    return normalize(prediction) == normalize(item.answer)


# ----------------------------------------------------------------------------------------------- answering


def vica_layers(model) -> tuple[int, ...] | None:
    """A ViCA checkpoint's layers (config.vica_layers), or None for a dense LLaVA."""
    layers = getattr(model.config, "vica_layers", None)
    return None if layers is None else tuple(int(x) for x in layers)


def generation_options(loaded: LoadedVLM, temperature: float = 0.0, top_p: float = 1.0) -> dict[str, Any]:
    """GenerationConfig fields for the loop: every stop id of the text layer, its pad id, greedy or sampling."""
    roles = loaded.processor.text.roles
    options: dict[str, Any] = {"eos_token_id": list(loaded.processor.text.stop_ids), "pad_token_id": roles.pad_id}
    if temperature < 0 or not 0 < top_p <= 1:
        raise BriskError(f"--temperature must be >= 0 and --top-p in (0, 1]; got {temperature} and {top_p}")
    if temperature > 0:
        options.update(do_sample=True, temperature=temperature, top_p=top_p)
    else:
        options.update(do_sample=False)
    return options


def run_method(loaded: LoadedVLM, batch, spec: PruneSpec | str, max_new_tokens: int, **generation):
    """(B, new) answer ids and the method's record (None for ViCA): prefill under the method, then decoding."""
    from brisklm.vision.vica import vica_generate

    if spec == "vica":
        layers = vica_layers(loaded.model)
        if layers is None:
            raise BriskError("method vica needs a ViCA checkpoint (vica_layers in its config); train one with "
                             "`brisk vision train --arch vica --base MODEL`")
        return vica_generate(loaded.model, batch.to(loaded.model.device), layers, max_new_tokens, **generation), None
    return prune_generate(loaded.model, batch, spec, max_new_tokens, **generation)


def generate_answers(loaded: LoadedVLM, images: Sequence[Any], questions: Sequence[str], spec: PruneSpec | str,
                     max_new_tokens: int = 16, **generation) -> tuple[list[str], Any]:
    """Decoded answers of a batch of (image(s), question) rows with `spec` ("vica" for a ViCA checkpoint)."""
    batch = loaded.processor(images, questions)
    ids, record = run_method(loaded, batch, spec, max_new_tokens, **generation)
    return [loaded.processor.decode(row) for row in ids.tolist()], record


def _prefill(loaded: LoadedVLM, batch, spec: PruneSpec | str, flops: FlopsCounter):
    """Run the method's prefill, counting its executor FLOPs; the pruning record (None for ViCA)."""
    if spec == "vica":
        from brisklm.vision.vica import vica_prefill

        vica_prefill(loaded.model, batch.to(loaded.model.device), vica_layers(loaded.model), flops=flops)
        return None
    return prune_prefill(loaded.model, batch, spec, flops=flops)[1]


# ----------------------------------------------------------------------------------------------- evaluation


def resolve_budgets(values: Sequence[str | float | int], visual_tokens: int) -> list[int]:
    """Budgets as kept visual tokens: an integer is a count, a number in (0, 1) a fraction of `visual_tokens`."""
    out = []
    for value in values:
        try:
            number = float(value)
        except (TypeError, ValueError):
            raise BriskError(f"budget {value!r} is not a number; pass kept visual tokens (12) or a fraction (0.25)") from None
        if 0 < number < 1:
            keep = max(1, round(number * visual_tokens))
        elif number >= 1 and number == int(number):
            keep = int(number)
        else:
            raise BriskError(f"budget {value!r} must be a count >= 1 or a fraction in (0, 1)")
        if keep > visual_tokens:
            raise BriskError(f"budget {keep} is larger than the {visual_tokens} visual tokens of a prompt; "
                             f"choose at most {visual_tokens}")
        out.append(keep)
    return out


def method_runs(methods: Sequence[str], budgets: Sequence[int], model, layer: int = 2) -> list[tuple[str, Any]]:
    """(label, spec) of every method at every budget; dense first (the reference), ViCA (no budget) once."""
    known = ("dense", *PRUNING_METHODS, "vica")
    bad = [m for m in methods if m not in known]
    if bad:
        raise BriskError(f"unknown method(s) {', '.join(bad)}: choose from {', '.join(known)}")
    runs: list[tuple[str, Any]] = [("dense", PruneSpec(method="dense"))]
    for method in methods:
        if method in PRUNING_METHODS:
            runs += [(f"{method}@{keep}", PruneSpec(method=method, keep=keep, layer=layer)) for keep in budgets]
        elif method == "vica":
            if vica_layers(model) is None:
                raise BriskError("method vica needs a ViCA checkpoint (vica_layers in its config); drop it from "
                                 "--methods or pass a model trained with `brisk vision train --arch vica`")
            runs.append(("vica", "vica"))
    return runs


def evaluate(loaded: LoadedVLM, items: Sequence[QAItem], runs: Sequence[tuple[str, Any]], batch_size: int = 16,
             max_new_tokens: int = 16, progress: Callable | None = None, **generation) -> list[dict[str, Any]]:
    """Per run: accuracy, accuracy kept, prefill FLOPs ratio (executor-counted; `analytic_flops_ratio` is the
    methods' own LM-prefill count from `vision.common.flops_ratio`), prefill seconds and decode
    seconds per step, and their ratios to dense (the first run). Decode = generation time minus the timed prefill,
    divided by the decode steps (runs may stop after different numbers of tokens)."""
    if batch_size < 1:
        raise BriskError(f"--batch-size must be at least 1, got {batch_size}")
    batches = [items[i:i + batch_size] for i in range(0, len(items), batch_size)]
    adapter = ModelAdapter.from_model(loaded.model)
    if batches:  # one untimed dense prefill first, so the first timed run does not pay for warm-up
        warm = batches[0]
        _prefill(loaded, loaded.processor([it.images for it in warm], [it.question for it in warm]),
                 PruneSpec(method="dense"), FlopsCounter())
    bar = progress(total=len(runs) * len(batches), unit="batch") if progress else None
    results: list[dict[str, Any]] = []
    for label, spec in runs:
        correct, flops, prefill_s, decode_s, steps, visual, analytic = 0, FlopsCounter(), 0.0, 0.0, 0, [], []
        for chunk in batches:
            if bar is not None:
                bar.set_description(label)
            batch = loaded.processor([it.images for it in chunk], [it.question for it in chunk])
            start = time.perf_counter()
            prefill_record = _prefill(loaded, batch, spec, flops)
            this_prefill = time.perf_counter() - start
            if prefill_record is not None:  # the methods' own analytic count (common.flops_ratio), batch-weighted
                analytic.append(len(chunk) * flops_ratio(prefill_record, adapter, batch.attention_mask.sum(dim=1)))
            start = time.perf_counter()
            ids, record = run_method(loaded, batch, spec, max_new_tokens, **generation)
            prefill_s += this_prefill
            decode_s += max(time.perf_counter() - start - this_prefill, 0.0)  # the loop's prefill, then decoding
            steps += max(ids.shape[1] - 1, 0)
            answers = [loaded.processor.decode(row) for row in ids.tolist()]
            correct += sum(is_correct(a, it) for a, it in zip(answers, chunk))
            if record is not None and record.visual:
                visual.append(record.equivalent_tokens())
            if bar is not None:
                bar.update(1)
        results.append({"run": label, "method": label.split("@")[0],
                        "keep": getattr(spec, "keep", None) if spec != "vica" else None,
                        "accuracy": correct / len(items), "prefill_flops": flops.total(),
                        "prefill_s": prefill_s, "decode_s": decode_s, "decode_steps": steps,
                        "decode_s_per_step": decode_s / steps if steps else None,
                        "equivalent_visual_tokens": sum(visual) / len(visual) if visual else None,
                        "analytic_flops_ratio": sum(analytic) / len(items) if analytic else None})
    if bar is not None:
        bar.close()
    dense = results[0]
    for r in results:
        r["accuracy_kept"] = r["accuracy"] / dense["accuracy"] if dense["accuracy"] else None  # undefined at 0
        r["flops_ratio"] = r["prefill_flops"] / dense["prefill_flops"]
        r["prefill_time_ratio"] = r["prefill_s"] / dense["prefill_s"]
        per_step, dense_step = r["decode_s_per_step"], dense["decode_s_per_step"]
        r["decode_time_ratio"] = per_step / dense_step if per_step is not None and dense_step else None
    return results


def plot(results: Sequence[dict[str, Any]], path: str | Path, title: str = "") -> Path:
    """Accuracy kept against the prefill FLOPs ratio, one line per method across budgets (PNG)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    kept = all(r["accuracy_kept"] is not None for r in results)  # dense at 0 accuracy: plot plain accuracy
    key = "accuracy_kept" if kept else "accuracy"
    fig, ax = plt.subplots(figsize=(5.5, 4))
    for method in dict.fromkeys(r["method"] for r in results):
        rows = sorted((r for r in results if r["method"] == method), key=lambda r: r["flops_ratio"])
        ax.plot([r["flops_ratio"] for r in rows], [r[key] for r in rows], marker="o", label=method)
        for r in rows:
            if r["keep"] is not None:
                ax.annotate(str(r["keep"]), (r["flops_ratio"], r[key]), fontsize=7,
                            textcoords="offset points", xytext=(3, 3))
    ax.set_xlabel("prefill FLOPs / dense")
    ax.set_ylabel("accuracy / dense" if kept else "accuracy (dense scored 0)")
    ax.set_title(title or "visual-token methods (labels: kept tokens)", fontsize=9)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path
