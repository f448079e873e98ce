"""`brisk stream train --lora`: peft adapters on the family's projections (fused ones too), saved alone (loaded by
stream eval/translate --model) or merged into the weights."""

import json

import pytest
import torch
from safetensors.torch import load_file

from brisklm.cli import main

pytestmark = pytest.mark.usefixtures("one_thread")

PAIRS = [("the quick brown fox", "der schnelle braune Fuchs"), ("hello world", "hallo Welt")]


def data_file(tmp_path):
    path = tmp_path / "d.jsonl"
    path.write_text("".join(json.dumps({"source": s, "target": t}) + "\n" for s, t in PAIRS))
    return path


def train(checkpoint, data, out, *extra):
    return main(["stream", "train", "--model", str(checkpoint), "--data", str(data), "--steps", "2",
                 "--batch-size", "2", "--lr", "1e-2", "--lora", "--out", str(out), *extra])


@pytest.mark.parametrize("style, module", [("qwen2", "q_proj"), ("phi3", "qkv_proj")])
def test_lora_adapter_trains_and_loads(fixture_checkpoints, tmp_path, capsys, style, module):
    data, out = data_file(tmp_path), tmp_path / "adapter"
    assert train(fixture_checkpoints(style), data, out) == 0
    assert (out / "adapter_config.json").exists() and not (out / "config.json").exists()
    assert module in json.loads((out / "adapter_config.json").read_text())["target_modules"]
    weights = load_file(str(out / "adapter_model.safetensors"))
    lora_b = [w for name, w in weights.items() if "lora_B" in name]
    assert lora_b and any(w.abs().sum() > 0 for w in lora_b)  # B starts at zero: it trained
    capsys.readouterr()
    assert main(["stream", "eval", "--model", str(out), "--data", str(data), "--limit", "1",
                 "--out", str(tmp_path / "eval")]) == 0
    assert "1 sentences of d.jsonl" in capsys.readouterr().out
    assert main(["stream", "translate", "--model", str(out), "--text", "hello world", "--max-words", "2"]) == 0
    assert "\tdelay=" in capsys.readouterr().out


def test_lora_merge_changes_only_the_targets(fixture_checkpoints, tmp_path):
    base = fixture_checkpoints("llama3")
    out = tmp_path / "merged"
    assert train(base, data_file(tmp_path), out, "--merge", "--lora-targets", "v_proj") == 0
    before, after = load_file(str(base / "model.safetensors")), load_file(str(out / "model.safetensors"))
    changed = {name for name in before if not torch.equal(before[name], after[name])}
    assert changed and all("v_proj" in name for name in changed)


@pytest.mark.parametrize("extra, message", [(["--merge"], "--merge applies to --lora"),
                                            (["--lora", "--lora-targets", "nope_proj"], "no such module"),
                                            (["--lora", "--lora-r", "0"], "--lora-r must be >= 1")])
def test_lora_bad_options_are_one_line(fixture_checkpoints, tmp_path, capsys, extra, message):
    argv = ["stream", "train", "--model", str(fixture_checkpoints("qwen2")), "--data", str(data_file(tmp_path)),
            "--steps", "1", "--out", str(tmp_path / "o"), *extra]
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert message in err and "Traceback" not in err
