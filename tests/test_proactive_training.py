"""ProactiveLLM training: random monotone schedules, their masks, and the SPSD loss (exact properties)."""

import random

import pytest
import torch

from brisklm.errors import BriskError
from brisklm.streaming.gpe import build_layout, collate
from brisklm.streaming.proactive.train import (ProactiveCollator, ScheduleOptions, collate_views, full_schedule, row_sees,
                                         sample_schedule, spsd_from_logits, spsd_loss, train_proactive, view_logits)
from brisklm.streaming.train import stream_features, streaming_loss
from brisklm.tasks.tokenizer import build_word_tokenizer
from brisklm.tasks.translation import TranslationTask
from brisklm.zoo.architecture import new_model, tiny_llama_config
from brisklm.zoo.textlm import TrainOptions

TASK = TranslationTask(variable_lookahead=True)


@pytest.fixture(scope="module")
def tok():
    return build_word_tokenizer(TASK.vocabulary())


@pytest.fixture(scope="module")
def model(tok):
    config = tiny_llama_config(len(tok), pad_token_id=tok.pad_token_id, bos_token_id=tok.bos_token_id,
                               eos_token_id=tok.eos_token_id, hidden_size=32, num_hidden_layers=2,
                               intermediate_size=64)
    return new_model(config, 0).eval()


def test_schedules_are_monotone_and_cover_random_k_and_extra_reads():
    rng = random.Random(0)
    options = ScheduleOptions(k_min=1, k_max=5, p_extra=0.3, max_extra_step=2, p_full=0.1)
    first_lags, extras, full = set(), 0, 0
    for _ in range(2000):
        n, m = rng.randint(3, 20), rng.randint(2, 20)
        g = sample_schedule(rng, n, m, options)
        assert len(g) == m + 2 and g[-1] == n + 1
        assert all(a <= b for a, b in zip(g, g[1:])), g  # monotone
        assert all(1 <= x <= n + 1 for x in g)
        if g[0] == n + 1 and all(x == n + 1 for x in g):
            full += 1
            continue
        first_lags.add(g[1])  # target word 1 sees k (+ extra) words
        plain = [min(g[1] + j - 1, n + 1) for j in range(1, m + 1)]
        extras += any(x > p for x, p in zip(g[1:m + 1], plain))  # more than the fixed lag somewhere
    assert set(range(1, 6)) <= first_lags  # every k is drawn
    assert 150 < full < 250  # p_full = 0.1 of 2000
    assert extras > 800  # extra reads happen in many schedules


def test_schedule_options_are_validated():
    with pytest.raises(BriskError, match="k_min <= k_max"):
        ScheduleOptions(k_min=3, k_max=2)
    with pytest.raises(BriskError, match="probabilities"):
        ScheduleOptions(p_extra=1.5)


def test_wait_k_schedule_gives_the_gpe_wait_k_mask(tok):
    e = TASK.examples("train", 1, seed=3)[0]
    layout = build_layout(tok, e.meta["source_words"], e.meta["target_words"])
    n, m = layout.num_source_words, len(layout.target) - 2
    for k in (1, 2, 4):
        schedule = [max(1, min(k + j - 1, n + 1)) for j in range(m + 1)] + [n + 1]
        ours = collate_views([layout], [schedule], tok.pad_token_id)
        theirs = collate([layout], [k], tok.pad_token_id)
        assert torch.equal(ours["visibility"], theirs["visibility"])
        assert torch.equal(ours["position_ids"], theirs["position_ids"])
        assert torch.equal(ours["labels"], theirs["labels"])
    full = collate([layout], [10**6], tok.pad_token_id)["visibility"]
    assert torch.equal(collate_views([layout], [full_schedule(layout)], tok.pad_token_id)["teacher_visibility"], full)
    # the one-row shift: the last row of a segment sees what the next segment will see
    assert row_sees(layout, list(range(1, m + 2)) + [n + 1])[0] == 2


def test_spsd_with_lambda_zero_is_the_streaming_ce(model, tok):
    examples = TASK.examples("train", 6, seed=1)
    batch = ProactiveCollator(tok, ScheduleOptions(p_full=0.0), seed=0)(stream_features(examples))
    out = spsd_loss(model, batch, lam=0.0)
    assert torch.allclose(out["loss"], streaming_loss(model, batch), atol=1e-6)
    assert torch.allclose(out["loss"], out["ce"])


def test_kl_is_zero_when_the_partial_view_is_the_full_view(model, tok):
    examples = TASK.examples("train", 4, seed=2)
    batch = ProactiveCollator(tok, ScheduleOptions(p_full=1.0), seed=0)(stream_features(examples))
    assert torch.equal(batch["visibility"], batch["teacher_visibility"])
    out = spsd_loss(model, batch, lam=1.0)
    assert float(out["kl"].detach()) < 1e-6 and torch.allclose(out["loss"], out["ce"], atol=1e-6)
    masked = ProactiveCollator(tok, ScheduleOptions(k_max=1, p_full=0.0), seed=0)(stream_features(examples))
    assert float(spsd_loss(model, masked, lam=1.0)["kl"].detach()) > 1e-4  # and positive when the views differ


def test_no_gradient_flows_into_the_full_context_view(model, tok):
    student = torch.randn(2, 5, 7, requires_grad=True)
    teacher = torch.randn(2, 5, 7, requires_grad=True)
    labels = torch.tensor([[-100, 1, 2, 3, -100], [-100, -100, 4, 5, 6]])
    spsd_from_logits(student, teacher, labels, lam=0.7, tau=2.0)["loss"].backward()
    assert teacher.grad is None and student.grad is not None and float(student.grad.abs().sum()) > 0
    # on the model: the SPSD gradient equals CE + lambda * KL with the teacher logits taken as constants
    examples = TASK.examples("train", 4, seed=5)
    batch = ProactiveCollator(tok, ScheduleOptions(p_full=0.0), seed=1)(stream_features(examples))
    model.zero_grad()
    spsd_loss(model, batch, lam=0.5)["loss"].backward()
    grads = [p.grad.clone() for p in model.parameters()]
    model.zero_grad()
    with torch.no_grad():
        constant = view_logits(model, batch, batch["teacher_visibility"]).clone()
    spsd_from_logits(view_logits(model, batch, batch["visibility"]), constant, batch["labels"], 0.5)["loss"].backward()
    for g, p in zip(grads, model.parameters()):
        assert torch.allclose(g, p.grad, atol=1e-6)
    model.zero_grad()


def test_spsd_hand_values():
    student = torch.tensor([[[0.0, 0.0], [0.0, 0.0]]])
    teacher = torch.tensor([[[0.0, 0.0], [2.0, 0.0]]])
    labels = torch.tensor([[-100, 0]])
    out = spsd_from_logits(student, teacher, labels, lam=2.0)
    p = torch.softmax(torch.tensor([0.0, 0.0]), 0)  # the teacher row that counts is row 0: uniform, like the student
    assert float(out["kl"]) == pytest.approx(0.0, abs=1e-7)
    assert float(out["ce"]) == pytest.approx(-float(p[0].log()), abs=1e-6)
    with pytest.raises(BriskError, match="lambda"):
        spsd_from_logits(student, teacher, labels, lam=-1.0)


def test_training_reduces_the_loss(tok):
    config = tiny_llama_config(len(tok), pad_token_id=tok.pad_token_id, bos_token_id=tok.bos_token_id,
                               eos_token_id=tok.eos_token_id, hidden_size=32, num_hidden_layers=2,
                               intermediate_size=64)
    fresh = new_model(config, 1)
    examples = TASK.examples("train", 64, seed=0)
    batch = ProactiveCollator(tok, seed=9)(stream_features(examples[:16]))
    with torch.no_grad():
        before = float(spsd_loss(fresh, batch, lam=1.0)["loss"])
    import tempfile

    with tempfile.TemporaryDirectory() as tmp:
        train_proactive(fresh, tok, examples, TrainOptions(steps=30, batch_size=16, learning_rate=3e-3), tmp,
                        spsd_lambda=1.0)
    with torch.no_grad():
        assert float(spsd_loss(fresh, batch, lam=1.0)["loss"]) < before - 0.3
