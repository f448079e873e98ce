"""`brisk inspect` on every real-convention fixture, and `brisk zoo fixture` writing one."""

import json

import pytest

from brisklm.cli import main
from brisklm.testing.checkpoints import FIXTURE_STYLES

FAMILY = {"qwen2": "qwen2", "qwen3": "qwen3", "llama3": "llama", "mistral": "mistral", "gemma2": "gemma2",
          "gemma3": "gemma3", "phi3": "phi3"}


@pytest.mark.parametrize("style", FIXTURE_STYLES)
def test_inspect_reports_family_roles_and_commands(fixture_checkpoints, style, capsys):
    path = fixture_checkpoints(style)
    assert main(["inspect", "--model", str(path), "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    config = json.loads((path / "config.json").read_text())
    assert report["family"] == FAMILY[style] and report["layers"] == config["num_hidden_layers"]
    assert (report["heads"], report["kv_heads"]) == (config["num_attention_heads"], config["num_key_value_heads"])
    assert report["chat_template"] is True and report["word_level"] is False
    config_eos = config["eos_token_id"] if isinstance(config["eos_token_id"], list) else [config["eos_token_id"]]
    assert set(config_eos) <= set(report["eos_ids"]) and report["pad_id"] is not None
    assert (report["bos_id"] is None) == (style in ("qwen2", "qwen3"))  # Qwen: no BOS
    windows = [w for w in report["windows"] if w is not None]
    assert bool(windows) == (style in ("mistral", "gemma2", "gemma3"))
    commands = report["commands"]
    assert commands["analyze lens"] is None  # runs on every family
    assert commands["vision answer"] is not None and "Llava" in commands["vision answer"]

    assert main(["inspect", "--model", str(path)]) == 0
    text = capsys.readouterr().out
    assert f"family        {FAMILY[style]}" in text and "can run (" in text


def test_inspect_on_a_zoo_word_level_checkpoint(tmp_path, capsys):
    from transformers import LlamaConfig, LlamaForCausalLM

    from brisklm.tasks.tokenizer import build_word_tokenizer  # the zoo's word-level tokenizer

    tok = build_word_tokenizer("the cat sat on a mat".split())
    model = LlamaForCausalLM(LlamaConfig(vocab_size=len(tok), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                         num_attention_heads=4, num_key_value_heads=2, eos_token_id=tok.eos_token_id))
    model.save_pretrained(tmp_path)
    tok.save_pretrained(tmp_path)
    assert main(["inspect", "--model", str(tmp_path), "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["word_level"] is True and report["commands"]["stream translate"] is None


def test_inspect_bad_path_is_one_line(tmp_path, capsys):
    assert main(["inspect", "--model", str(tmp_path / "missing")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "does not exist" in err[0]


def test_zoo_fixture_writes_an_inspectable_checkpoint(tmp_path, capsys):
    out = tmp_path / "gemma"
    assert main(["zoo", "fixture", "--style", "gemma2", "--out", str(out)]) == 0
    assert (out / "config.json").exists() and (out / "tokenizer.json").exists()
    capsys.readouterr()
    assert main(["inspect", "--model", str(out), "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["family"] == "gemma2"
    assert main(["zoo", "fixture", "--style", "gemma2", "--out", str(out)]) == 2  # not over a non-empty folder
    assert "not empty" in capsys.readouterr().err
