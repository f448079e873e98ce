"""The translate-gpe zoo model: wait-k quality ordering, wait-k delays, and engine exactness after training."""

import pytest
import torch

from brisklm.eval.metrics import bleu
from brisklm.streaming.engine import reference_logits
from brisklm.streaming.policies import gpe_wait_k, reencode_wait_k
from brisklm.tasks.translation import TranslationTask
from brisklm.zoo.store import load


@pytest.fixture(scope="module")
def gpe():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield load("translate-gpe")  # fine-tuned from translate-offline once per BRISK_HOME
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def test_set():
    exs = TranslationTask().examples("test", 100, seed=0)
    return [e.meta["source_words"] for e in exs], [e.completion for e in exs]


def test_wait_k_bleu_grows_with_k(gpe, test_set):
    """Measured on 200 test sentences: wait-1 28, wait-3 78, wait-5 96 BLEU (a random model scores ~0).

    Wait-1 is mostly infeasible on this task (76% of target words need more source than wait-1 has read,
    24% at wait-3, 3% at wait-5), so only its order is checked; thresholds sit ~12 BLEU below measurements.
    """
    sources, refs = test_set
    scores = {k: bleu(gpe_wait_k(gpe.model, gpe.tokenizer, sources, k).hypotheses, refs) for k in (1, 3, 5)}
    assert scores[5] >= 85, scores
    assert scores[3] >= 65, scores
    assert scores[1] < scores[3] < scores[5], scores


def test_delays_follow_wait_k(gpe, test_set):
    sources, _ = test_set
    for out, src in zip(gpe_wait_k(gpe.model, gpe.tokenizer, sources[:20], 3).outputs, sources[:20]):
        assert out.words and out.delays[0] == min(3, len(src))
        assert out.delays == sorted(out.delays) and out.delays[-1] <= len(src)
        for j, d in enumerate(out.delays):  # wait-3 reads at least k+j-1 words (more only to avoid an early end)
            assert d >= min(3 + j, len(src))


def test_engine_is_exact_on_the_trained_model(gpe, test_set):
    sources, _ = test_set
    src = sources[:4]
    targets = [gpe.tokenizer.convert_tokens_to_ids(w.split()) for w in test_set[1][:4]]
    result = gpe_wait_k(gpe.model, gpe.tokenizer, src, 3, forced=targets, keep_logits=True)
    for s, t, out in zip(src, targets, result.outputs):
        assert (out.logits - reference_logits(gpe.model, gpe.tokenizer, s, t, 3)).abs().max().item() < 1e-4


@pytest.mark.slow
def test_gpe_needs_far_fewer_forward_tokens_than_reencoding(gpe):
    """Issue 3: at least 3x fewer forward tokens on 20-word sources, growing with length (measured 10x, 24x)."""
    off = load("translate-offline")
    ratios = []
    for n in (20, 40):
        sources = [e.meta["source_words"] for e in TranslationTask(min_len=n, max_len=n).examples("test", 8)]
        g = gpe_wait_k(gpe.model, gpe.tokenizer, sources, 3)
        r = reencode_wait_k(off.model, off.tokenizer, sources, 3)
        ratios.append(r.forward_tokens / g.forward_tokens)
    assert ratios[0] >= 3 and ratios[1] > ratios[0], ratios


@pytest.mark.slow
def test_gpe_within_one_and_a_half_bleu_of_strict_reencoding(gpe, test_set):
    """Issue 3: GPE close to re-encoding at the same wait-k schedule (measured on 300: +0.2 / +1.45 / -0.39 at
    k = 1 / 3 / 5); the adaptive re-encoder, which reads on when it predicts an early end, is not the same schedule."""
    sources, refs = test_set
    off = load("translate-offline")
    for k in (1, 3, 5):
        g = gpe_wait_k(gpe.model, gpe.tokenizer, sources, k)
        r = reencode_wait_k(off.model, off.tokenizer, sources, k, strict=True)
        assert bleu(g.hypotheses, refs) >= bleu(r.hypotheses, refs) - 1.5, k
