"""GPE training path: equals the plain LM loss when nothing is hidden; the streaming loss goes down."""

import tempfile

import pytest
import torch

from brisklm.errors import BriskError
from brisklm.streaming.gpe import build_layout, collate
from brisklm.streaming.train import GPECollator, parse_k_range, stream_features, streaming_loss, train_gpe
from brisklm.tasks.tokenizer import build_word_tokenizer
from brisklm.tasks.translation import TranslationTask
from brisklm.zoo.architecture import new_model, tiny_llama_config
from brisklm.zoo.textlm import TrainOptions


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def tok():
    return build_word_tokenizer(TranslationTask().vocabulary())


def small_model(tok, seed=0, init=0.02):
    config = tiny_llama_config(len(tok), pad_token_id=tok.pad_token_id, bos_token_id=tok.bos_token_id,
                               eos_token_id=tok.eos_token_id, hidden_size=64, num_hidden_layers=2,
                               intermediate_size=128, initializer_range=init)
    return new_model(config, seed)


def test_streaming_loss_equals_plain_lm_loss_when_everything_is_visible(tok):
    """k > |X| and contiguous positions make the streaming mask plain causal: same loss as model(labels=...)."""
    model = small_model(tok, init=0.2).eval()
    exs = TranslationTask(min_len=4, max_len=9).examples("train", 4)
    layouts = [build_layout(tok, e.meta["source_words"], e.meta["target_words"]) for e in exs]
    batch = collate(layouts, [100] * 4, tok.pad_token_id, mode="contiguous")
    ours = streaming_loss(model, batch)
    ref = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], labels=batch["labels"]).loss
    assert abs(ours.item() - ref.item()) < 1e-4
    # and the wait-1 mask with group positions is a different objective
    batch1 = collate(layouts, [1] * 4, tok.pad_token_id, mode="group")
    assert abs(streaming_loss(model, batch1).item() - ref.item()) > 1e-3


def test_gpe_training_lowers_the_streaming_loss(tok):
    torch.manual_seed(0)
    model = small_model(tok)
    exs = TranslationTask(min_len=4, max_len=10).examples("train", 400)
    held = GPECollator(tok, (1, 3), seed=1)(stream_features(exs[:32]))
    with torch.no_grad():
        before = streaming_loss(model.eval(), held).item()
    with tempfile.TemporaryDirectory() as tmp:
        stats = train_gpe(model, tok, exs, (1, 3), TrainOptions(steps=40, batch_size=16, learning_rate=3e-3,
                                                                log_every=1000), tmp)
    with torch.no_grad():
        after = streaming_loss(model, held).item()
    # measured: about 4.6 -> 2.7 nats; a broken mask/label alignment would not halve the gap to zero this fast
    assert after < before - 1.0, (before, after)
    assert stats["train_seconds"] > 0


def test_k_range_parsing():
    assert parse_k_range("3") == (3, 3)
    assert parse_k_range("1:5") == (1, 5)
    assert parse_k_range(2) == (2, 2)
    for bad in ("0", "5:1", "a:b", "1:2:3", "-1:3"):
        with pytest.raises(BriskError):
            parse_k_range(bad)
