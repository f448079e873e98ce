"""`brisk stream eval`: run a streaming policy over a test set one sentence at a time, as SimulEval would (source
words pushed one by one, each target word timed), and write `instances.log` + `scores.json` (+ SimulEval's
`config.yaml`, so `simuleval --score-only --output DIR` reads the folder).

Bad lines of the data (no source/target, an empty source, a word the tokenizer cannot encode) are reported one
line each, naming the line number; the other lines are still evaluated and the bad ones listed in scores.json.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Sequence

from brisklm.core.text import TextLayer
from brisklm.errors import BriskError
from brisklm.streaming.simul_scores import DEFAULT_WORD_MS, corpus_scores, record, write_log
from brisklm.streaming.stepper import PolicySpec, run_stream
from brisklm.streaming.data import NumberedPair


@dataclass
class EvalResult:
    """The instances.log records, the corpus scores and the lines that were skipped (with why)."""

    records: list[dict]
    scores: dict
    skipped: list[dict] = field(default_factory=list)


def check_source(text: TextLayer, words: Sequence[str], where: str, instruction: str | None = None) -> None:
    """Encode a source sentence once as the engine will (so an unencodable word is named before decoding)."""
    from brisklm.streaming.gpe import stream_frame, word_segments

    try:
        word_segments(text, list(words), stream_frame(text, instruction).first_at_start)
    except BriskError as error:
        raise BriskError(f"{where}: {error}") from None


def evaluate(model, text: TextLayer, lines: Sequence[NumberedPair], spec: PolicySpec, *, name: str = "data",
             word_ms: float = DEFAULT_WORD_MS, phi: int = 0, instruction: str | None = None, checkpoint=None,
             progress: Callable = lambda it, **kw: it,
             on_error: Callable[[BriskError], None] = lambda error: None) -> EvalResult:
    """Decode every line with `spec` (one stream at a time, timed) and score the corpus as SimulEval does."""
    import torch

    spec = spec.check()
    head = None
    if spec.name not in ("wait-k", "offline"):
        from brisklm.streaming.proactive.heads import make_head

        head = make_head(spec.name, checkpoint)
    records, skipped = [], []
    for item in progress(lines, desc=f"stream eval ({spec.name})", total=len(lines)):
        source, reference = item.example.meta["source_words"], " ".join(item.example.meta["target_words"])
        where = f"{name} line {item.line}"
        try:
            check_source(text, source, where, instruction)
            with torch.no_grad():
                stepper = run_stream(model, text, spec, source, phi=phi, instruction=instruction, head=head)
        except BriskError as error:
            error = error if str(error).startswith(where) else BriskError(f"{where}: {error}")
            on_error(error)
            skipped.append({"line": item.line, "error": str(error)})
            continue
        out = stepper.output
        records.append(record(len(records), source, reference, out.words, out.delays, stepper.times, word_ms))
    return EvalResult(records, corpus_scores(records) if records else {}, skipped)


def write_outputs(out: Path, result: EvalResult, meta: dict) -> Path:
    """instances.log, scores.json (scores + meta + skipped lines) and SimulEval's config.yaml in `out`."""
    out.mkdir(parents=True, exist_ok=True)
    write_log(out / "instances.log", result.records)
    scores = {**result.scores, **meta, "sentences": len(result.records), "skipped": result.skipped}
    (out / "scores.json").write_text(json.dumps(scores, indent=2) + "\n")
    (out / "config.yaml").write_text("source_type: text\ntarget_type: text\n")
    return out / "scores.json"
