"""Every evaluation metric in one import: BLEU here, latency and accuracy re-exported from their modules."""

from __future__ import annotations

from typing import Sequence

from brisklm.errors import BriskError
from brisklm.eval.accuracy import accuracy_under_budget, exact_match_accuracy, mean_pass_at_k, pass_at_k
from brisklm.eval.latency import (
    LATENCY_METRICS,
    LatencyInstance,
    average_lagging,
    average_proportion,
    corpus_latency,
    differentiable_average_lagging,
    length_adaptive_average_lagging,
)

__all__ = [
    "LATENCY_METRICS",
    "LatencyInstance",
    "accuracy_under_budget",
    "average_lagging",
    "average_proportion",
    "bleu",
    "corpus_latency",
    "differentiable_average_lagging",
    "exact_match_accuracy",
    "length_adaptive_average_lagging",
    "mean_pass_at_k",
    "pass_at_k",
]


def bleu(hypotheses: Sequence[str], references: Sequence[str]) -> float:
    """Corpus BLEU (sacreBLEU, 13a tokenizer, one reference per hypothesis), as SimulEval reports it."""
    import sacrebleu

    if len(hypotheses) != len(references):
        raise BriskError(
            f"{len(hypotheses)} hypotheses but {len(references)} references; pass one reference per hypothesis"
        )
    if not hypotheses:
        raise BriskError("bleu needs at least one hypothesis; pass a non-empty list")
    return float(sacrebleu.corpus_bleu(list(hypotheses), [list(references)], tokenize="13a").score)
