"""SimulEval-format records (one per sentence, as in its `instances.log`) and their corpus scores.

Fields are SimulEval's: index, prediction, delays, elapsed, prediction_length, reference, source, source_length.
Units are words (SimulEval's default latency unit). `delays[i]` = source words read when target word i+1 was
started. `elapsed[i]` = delays[i] + the measured compute time until that word was complete, converted to source
words at `word_ms` per word: SimulEval's computation-aware convention for speech (source time consumed plus
compute time since the start) in text units, so `simuleval --score-only --computation-aware` reads the same
numbers from our log (SimulEval itself records no compute time for text input). brisklm adds `compute_ms`.

Scores are SimulEval's defaults, from eval/latency.py and eval/metrics.bleu: sacreBLEU (13a), and AL, LAAL,
DAL, AP averaged over sentences with at least one target word (SimulEval skips the others), AL/AP with the
reference length (`len(reference.split(" "))`), and the same four on `elapsed` as *_CA.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Iterable, Mapping, Sequence

from brisklm.errors import BriskError
from brisklm.eval.latency import LATENCY_METRICS, LatencyInstance, corpus_latency
from brisklm.eval.metrics import bleu

DEFAULT_WORD_MS = 300.0  # a speaking rate of 200 words/min (SimulEval's ATD also takes 300 ms per source word)


def record(index: int, source: Sequence[str], reference: str, words: Sequence[str], delays: Sequence[int],
           seconds: Sequence[float], word_ms: float = DEFAULT_WORD_MS) -> dict:
    """One sentence as a SimulEval instances.log record (plus brisklm's `compute_ms`)."""
    if word_ms <= 0:
        raise BriskError(f"--word-ms must be positive, got {word_ms}")
    compute_ms = [1000.0 * s for s in seconds]
    return {
        "index": index,
        "prediction": " ".join(words),
        "delays": list(delays),
        "elapsed": [d + c / word_ms for d, c in zip(delays, compute_ms)],
        "prediction_length": len(words),
        "reference": reference,
        "source": " ".join(source),
        "source_length": len(source),
        "compute_ms": compute_ms,
    }


def corpus_scores(records: Sequence[Mapping]) -> dict[str, float | None]:
    """BLEU, AL, LAAL, DAL, AP and AL_CA, LAAL_CA, DAL_CA, AP_CA of instances.log records, as SimulEval scores
    them (a latency is None when no sentence has a target word)."""
    if not records:
        raise BriskError("no sentences to score: the data has no usable source/target pairs")
    scores: dict[str, float | None] = {"BLEU": bleu([r["prediction"] for r in records],
                                                    [r["reference"] for r in records])}
    timed = [r for r in records if r["delays"]]
    for suffix, field in (("", "delays"), ("_CA", "elapsed")):
        instances = [LatencyInstance(r[field], int(r["source_length"]), len(r["reference"].split(" ")))
                     for r in timed]
        for metric in LATENCY_METRICS:
            scores[metric + suffix] = corpus_latency(instances, metric) if instances else None
    return scores


def read_log(path: str | Path) -> list[dict]:
    """The records of an instances.log file."""
    with Path(path).open(encoding="utf-8") as handle:
        return [json.loads(line) for line in handle if line.strip()]


def write_log(path: str | Path, records: Iterable[Mapping]) -> None:
    """One JSON line per record."""
    with Path(path).open("w", encoding="utf-8") as handle:
        for r in records:
            handle.write(json.dumps(r, ensure_ascii=False) + "\n")
