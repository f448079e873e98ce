"""Quality of ProactiveLLM on the trained zoo models (variable-lookahead translation, 60 test sentences).

Measured (seed 0): sufficiency AUROC entropy 0.978, probe 0.971, lag (the wait-k signal) 0.805; on the SPSD model
the entropy head at T=0.5 gives BLEU 97.1 at LAAL 2.22 and wait-3 gives 63.6 at LAAL 2.47; the probe head at
T=0.9 gives 97.3 at LAAL 2.47. Floors keep wide margins below these numbers.
"""

import pytest

from brisklm.streaming.proactive.heads import Head, auroc, load_probe, sufficiency_data
from brisklm.streaming.proactive.bench import evaluate
from brisklm.streaming.proactive_zoo import proactive_task


@pytest.fixture(scope="module")
def spsd():
    from brisklm.zoo.store import load

    return load("translate-proactive")


@pytest.fixture(scope="module")
def test_set():
    test = proactive_task().examples("test", 60, seed=0)
    return [e.meta["source_words"] for e in test], [e.completion for e in test], test


pytestmark = pytest.mark.usefixtures("one_thread")


def test_internal_signals_predict_that_the_partial_view_suffices(spsd, test_set):
    data = sufficiency_data(spsd.model, spsd.tokenizer, test_set[2], seed=2)
    assert 0.5 < float(data.label.mean()) < 0.99  # both classes are present in quantity
    scores = {k: auroc(v, data.label) for k, v in data.scores(load_probe(spsd.path)).items()}
    assert scores["entropy"] > 0.93 and scores["probe"] > 0.9
    assert scores["entropy"] > scores["lag"] + 0.1 and scores["probe"] > scores["lag"] + 0.1


def test_heads_beat_wait_k_at_no_more_latency(spsd, test_set):
    sources, refs, _ = test_set
    wait3 = evaluate(spsd.model, spsd.tokenizer, sources, refs, Head("lag"), 3.0)
    wait4 = evaluate(spsd.model, spsd.tokenizer, sources, refs, Head("lag"), 4.0)
    entropy = evaluate(spsd.model, spsd.tokenizer, sources, refs, Head("entropy"), 0.5)
    probe = evaluate(spsd.model, spsd.tokenizer, sources, refs, Head("probe", load_probe(spsd.path)), 0.9)
    assert entropy["laal"] <= wait3["laal"] and entropy["bleu"] >= wait3["bleu"] + 20
    assert probe["laal"] < wait4["laal"] and probe["bleu"] >= wait3["bleu"] + 20
    assert entropy["bleu"] >= 85 and probe["bleu"] >= 85
