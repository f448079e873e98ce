"""Decision heads on the GPE engine: valid READ/WRITE traces, threshold extremes, live == batch, probe labels."""

import math

import pytest
import torch

from brisklm.errors import BriskError
from brisklm.streaming.engine import reference_logits
from brisklm.streaming.proactive.heads import (Head, LinearProbe, adaptive_decode, always_write, auroc, entropy_of,
                                     live_decode, load_probe, make_head, never_write, save_probe, sufficiency_data,
                                     train_probe)
from brisklm.streaming.policies import OFFLINE_K, gpe_wait_k, target_limit
from brisklm.streaming.proactive.train import ScheduleOptions
from brisklm.tasks.tokenizer import build_word_tokenizer
from brisklm.tasks.translation import TranslationTask
from brisklm.zoo.architecture import new_model, tiny_llama_config

TASK = TranslationTask(variable_lookahead=True, min_len=4, max_len=12)


@pytest.fixture(scope="module")
def tok():
    return build_word_tokenizer(TASK.vocabulary())


@pytest.fixture(scope="module")
def model(tok):
    config = tiny_llama_config(len(tok), pad_token_id=tok.pad_token_id, bos_token_id=tok.bos_token_id,
                               eos_token_id=tok.eos_token_id, hidden_size=32, num_hidden_layers=2,
                               intermediate_size=64)
    return new_model(config, 0).eval()


@pytest.fixture(scope="module")
def sources():
    return [e.meta["source_words"] for e in TASK.examples("test", 8, seed=4)]


@pytest.fixture(scope="module")
def heads(model):
    torch.manual_seed(0)
    probe = LinearProbe(model.config.hidden_size)
    return {"entropy": Head("entropy"), "attention": Head("attention"), "probe": Head("probe", probe),
            "lag": Head("lag")}


def check_trace(out, trace):
    """Monotone delays within 1..n, every write's delay = reads before it, whole source + end read first."""
    n = out.source_words
    assert out.delays == sorted(out.delays) and all(1 <= d <= n for d in out.delays)
    assert trace.count("W") == len(out.words)
    reads, delays = 0, []
    for action in trace:
        if action == "R":
            reads += 1
        else:
            delays.append(min(reads, n))
    assert delays == out.delays
    if not out.truncated:
        assert trace.count("R") == n + 1  # every word and the end marker were read before the stream finished


def mid_threshold(model, tok, head):
    data = sufficiency_data(model, tok, TASK.examples("train", 8, seed=1))
    signal = {"entropy": data.entropy, "attention": data.attention, "lag": data.lag}.get(head.name)
    if head.name == "probe":
        signal = head.probe.score(data.hidden)
    return float(signal.median())


@pytest.mark.parametrize("name", ["entropy", "attention", "probe", "lag"])
def test_each_head_gives_valid_read_write_sequences(model, tok, sources, heads, name):
    head = heads[name]
    result = adaptive_decode(model, tok, sources, head, mid_threshold(model, tok, head), batch_size=3)
    assert len(result.outputs) == len(sources)
    for out, trace, src in zip(result.outputs, result.actions, sources):
        assert out.source_words == len(src)
        check_trace(out, trace)
        assert len(out.words) <= target_limit(len(src))


@pytest.mark.parametrize("name", ["entropy", "attention", "probe", "lag"])
def test_threshold_extremes_are_wait_everything_and_write_asap(model, tok, sources, heads, name):
    head = heads[name]
    offline = gpe_wait_k(model, tok, sources, OFFLINE_K)
    waiting = adaptive_decode(model, tok, sources, head, never_write(head))
    for out, ref, trace, src in zip(waiting.outputs, offline.outputs, waiting.actions, sources):
        assert out.words == ref.words and out.delays == [len(src)] * len(out.words)
        assert trace.startswith("R" * (len(src) + 1))
    asap = adaptive_decode(model, tok, sources, head, always_write(head))
    for out, trace, src in zip(asap.outputs, asap.actions, sources):
        check_trace(out, trace)
        assert out.delays == [min(j, len(src)) for j in range(1, len(out.words) + 1)]


def test_lag_head_is_wait_k(model, tok, sources):
    for k in (1, 3):
        out = adaptive_decode(model, tok, sources, Head("lag"), float(k)).outputs
        for o, src in zip(out, sources):
            assert o.delays == [min(k + j - 1, len(src)) for j in range(1, len(o.delays) + 1)]


@pytest.mark.parametrize("name", ["entropy", "attention", "probe"])
def test_live_decoding_matches_batched_decoding(model, tok, sources, heads, name):
    head = heads[name]
    threshold = mid_threshold(model, tok, head)
    batched = adaptive_decode(model, tok, sources[:4], head, threshold, batch_size=4).outputs
    for src, ref in zip(sources[:4], batched):
        seen = []
        out = live_decode(model, tok, iter(src), head, threshold, on_write=lambda w, d: seen.append((w, d)))
        assert out.words == ref.words and out.delays == ref.delays
        assert seen == list(zip(ref.words, ref.delays))


def test_probe_labels_are_partial_argmax_equals_full_argmax(model, tok):
    examples = TASK.examples("train", 5, seed=7)
    k = 2
    data = sufficiency_data(model, tok, examples, ScheduleOptions(k_min=k, k_max=k, p_extra=0.0, p_full=0.0))
    expected, lags = [], []
    for e in examples:
        src, tgt = e.meta["source_words"], tok.convert_tokens_to_ids(e.meta["target_words"])
        n, m = len(src), len(tgt)
        partial = gpe_wait_k(model, tok, [src], k, forced=[tgt], keep_logits=True).outputs[0].logits  # engine rows
        full = reference_logits(model, tok, src, tgt, OFFLINE_K)
        for j in range(1, m + 1):  # target word j is predicted with min(k + j - 1, n + 1) segments visible
            sees = min(k + j - 1, n + 1)
            if sees > n:
                continue
            row = partial[j - 1].clone()
            if sees < n:
                row[tok.eos_token_id] = -math.inf
            expected.append(float(row.argmax() == full[j - 1].argmax()))
            lags.append(float(sees - (j - 1)))
    assert data.label.tolist() == expected
    assert data.lag.tolist() == lags
    assert data.hidden.shape == (len(expected), model.config.hidden_size)
    assert torch.all(data.attention >= 0) and torch.all(data.attention <= 1 + 1e-5)


def test_auroc_hand_cases():
    assert auroc(torch.tensor([0.1, 0.2, 0.8, 0.9]), torch.tensor([0, 0, 1, 1])) == 1.0
    assert auroc(torch.tensor([0.9, 0.8, 0.2, 0.1]), torch.tensor([0, 0, 1, 1])) == 0.0
    assert auroc(torch.tensor([0.5, 0.5, 0.5]), torch.tensor([0, 1, 1])) == 0.5
    assert auroc(torch.tensor([0.1, 0.4, 0.35, 0.8]), torch.tensor([0, 0, 1, 1])) == 0.75
    assert math.isnan(auroc(torch.tensor([0.1, 0.2]), torch.tensor([1, 1])))


def test_entropy_ignores_masked_entries():
    logits = torch.tensor([[0.0, 0.0, -math.inf], [0.0, 0.0, 0.0]])
    assert entropy_of(logits).tolist() == pytest.approx([math.log(2), math.log(3)])


def test_probe_trains_saves_and_loads(model, tok, tmp_path):
    data = sufficiency_data(model, tok, TASK.examples("train", 40, seed=2))
    probe = train_probe(data, steps=30)
    save_probe(probe, tmp_path)
    again = load_probe(tmp_path)
    assert torch.allclose(probe.score(data.hidden), again.score(data.hidden))
    assert make_head("probe", tmp_path).probe is not None
    with pytest.raises(BriskError, match="no decision probe"):
        load_probe(tmp_path / "nothing")


def test_bad_head_inputs_raise(model, tok, sources):
    with pytest.raises(BriskError, match="unknown decision head"):
        make_head("coinflip")
    with pytest.raises(BriskError, match="needs a trained probe"):
        Head("probe")
    with pytest.raises(BriskError, match="min_lag"):
        adaptive_decode(model, tok, sources, Head("entropy"), 1.0, min_lag=0)
    with pytest.raises(BriskError, match="empty"):
        adaptive_decode(model, tok, [[]], Head("entropy"), 1.0)
    with pytest.raises(BriskError, match="empty"):
        live_decode(model, tok, iter([]), Head("entropy"), 1.0)
