"""`brisk stream train --objective proactive` and `brisk stream translate --policy entropy|attention|probe`."""

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
    path = tmp_path_factory.mktemp("proactive-ckpt")
    new_model(config, 0).save_pretrained(path)
    tok.save_pretrained(path)
    return path


@pytest.fixture(scope="module")
def trained(checkpoint, tmp_path_factory):
    out = tmp_path_factory.mktemp("proactive-trained") / "model"
    threads = torch.get_num_threads()
    try:
        assert main(["stream", "train", "--model", str(checkpoint), "--objective", "proactive", "--spsd", "1.0",
                     "--steps", "3", "--n-train", "64", "--n-probe", "32", "--probe-steps", "50", "--batch-size", "8",
                     "--out", str(out)]) == 0
    finally:
        torch.set_num_threads(threads)
    return out


@pytest.fixture(autouse=True)
def restore_threads():
    threads = torch.get_num_threads()
    yield
    torch.set_num_threads(threads)


def test_proactive_training_saves_model_and_probe(trained):
    assert (trained / "config.json").exists() and (trained / "proactive_probe.pt").exists()


@pytest.mark.parametrize("policy, threshold", [("entropy", "9"), ("attention", "0.2"), ("probe", "0.5")])
def test_translate_with_a_head_prints_words_and_delays(trained, capsys, monkeypatch, policy, threshold):
    monkeypatch.setattr(sys, "stdin", io.StringIO("kel ama mibo\nsefa tanu\n"))
    assert main(["stream", "translate", "--model", str(trained), "--policy", policy, "--threshold", threshold,
                 "--max-words", "8"]) == 0
    captured = capsys.readouterr()
    lines = [line for line in captured.out.splitlines() if line]
    assert 1 <= len(lines) <= 8
    delays = [int(line.split("delay=")[1]) for line in lines]
    assert delays == sorted(delays) and 1 <= delays[0] and delays[-1] <= 5
    assert f"{policy} head" in captured.err


@pytest.mark.parametrize("argv, message", [
    (["stream", "translate", "--policy", "probe", "--text", "kel"], "no decision probe"),
    (["stream", "translate", "--policy", "wait-k", "--threshold", "0.3", "--text", "kel"], "--threshold applies"),
    (["stream", "translate", "--policy", "entropy", "--threshold", "nan", "--text", "kel"], "NaN"),
    (["stream", "translate", "--policy", "entropy", "--text", ""], "empty"),
    (["stream", "train", "--spsd", "1", "--out", "OUT"], "--spsd applies"),
    (["stream", "train", "--objective", "proactive", "--spsd", "-1", "--out", "OUT", "--steps", "1"], "--spsd must be"),
])
def test_bad_input_is_one_line(checkpoint, tmp_path, capsys, argv, message):
    argv = [a.replace("OUT", str(tmp_path / "o")) for a in argv] + ["--model", str(checkpoint)]
    assert main(argv) == 2
    err = capsys.readouterr().err
    errors = [line for line in err.splitlines() if line.startswith("brisk: error")]
    assert len(errors) == 1 and message in errors[0] and "Traceback" not in err
