"""`brisk stream translate|train`: words with delays, and one-line errors for bad input."""

import io
import sys

import pytest
import torch

from brisklm.cli import main
from brisklm.tasks.tokenizer import build_word_tokenizer
from brisklm.tasks.translation import TranslationTask
from brisklm.zoo.architecture import new_model, tiny_llama_config


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    tok = build_word_tokenizer(TranslationTask().vocabulary())
    config = tiny_llama_config(len(tok), pad_token_id=tok.pad_token_id, bos_token_id=tok.bos_token_id,
                               eos_token_id=tok.eos_token_id, hidden_size=32, num_hidden_layers=2,
                               intermediate_size=64)
    path = tmp_path_factory.mktemp("stream-ckpt")
    new_model(config, 0).save_pretrained(path)
    tok.save_pretrained(path)
    return path


@pytest.fixture(autouse=True)
def restore_threads():
    threads = torch.get_num_threads()
    yield
    torch.set_num_threads(threads)


def test_translate_prints_each_word_with_its_delay(checkpoint, capsys, monkeypatch):
    monkeypatch.setattr(sys, "stdin", io.StringIO("kel ama\nmibo sefa\n"))
    assert main(["stream", "translate", "--model", str(checkpoint), "--k", "2", "--max-words", "6"]) == 0
    lines = [line for line in capsys.readouterr().out.splitlines() if line]
    assert 1 <= len(lines) <= 6
    delays = [int(line.split("delay=")[1]) for line in lines]
    assert delays[0] == 2 and delays == sorted(delays) and delays[-1] <= 4


@pytest.mark.parametrize("argv, stdin, message", [
    (["--k", "0"], "kel", "k >= 1"),
    ([], "kel blorp", "unknown word"),
    ([], "", "empty"),
])
def test_translate_bad_input_is_one_line(checkpoint, capsys, monkeypatch, argv, stdin, message):
    monkeypatch.setattr(sys, "stdin", io.StringIO(stdin))
    assert main(["stream", "translate", "--model", str(checkpoint), *argv]) == 2
    err = capsys.readouterr().err
    errors = [line for line in err.splitlines() if line.startswith("brisk: error")]
    assert len(errors) == 1 and message in errors[0] and "Traceback" not in err


def test_train_writes_a_checkpoint(checkpoint, tmp_path, capsys):
    out = tmp_path / "gpe"
    assert main(["stream", "train", "--model", str(checkpoint), "--k-range", "1:3", "--steps", "2",
                 "--n-train", "64", "--batch-size", "8", "--out", str(out)]) == 0
    assert (out / "config.json").exists() and (out / "tokenizer.json").exists()
    assert main(["stream", "train", "--model", str(checkpoint), "--k", "2", "--k-range", "1:3", "--out", str(out)]) == 2
    assert "either --k" in capsys.readouterr().err


def test_translate_stops_a_runaway_model(checkpoint, capsys, monkeypatch):
    """A random model never writes <eos>; once the source is closed the output is capped at 2n+8 words."""
    monkeypatch.setattr(sys, "stdin", io.StringIO("kel\n"))
    assert main(["stream", "translate", "--model", str(checkpoint), "--k", "1"]) == 0
    lines = [line for line in capsys.readouterr().out.splitlines() if line]
    assert len(lines) == 10
