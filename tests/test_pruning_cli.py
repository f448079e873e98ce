"""`brisk prune ...` on a small random checkpoint: outputs reload with from_pretrained; bad input is one line."""

import json

import pytest
import torch
from transformers import AutoModelForCausalLM, GPT2Config, GPT2LMHeadModel

from brisklm.cli import main
from brisklm.pruning.hardware import decode_cost
from brisklm.tasks import get_task
from brisklm.zoo.architecture import new_model, tiny_llama_config
from brisklm.zoo.recipes import build_tokenizer_for


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    tok = build_tokenizer_for(get_task("mixed_lm"))
    cfg = tiny_llama_config(len(tok), "tiny", pad_token_id=tok.pad_token_id, bos_token_id=tok.bos_token_id,
                            eos_token_id=tok.eos_token_id)
    path = tmp_path_factory.mktemp("base")
    new_model(cfg, 0).save_pretrained(path)
    tok.save_pretrained(path)
    return path


def run(capsys, *argv):
    status = main([str(a) for a in argv])
    return status, capsys.readouterr()


def test_prune_depth_and_width_write_reloadable_checkpoints(checkpoint, tmp_path, capsys):
    status, _ = run(capsys, "prune", "depth", "--model", checkpoint, "--remove", 1, "--method", "sleb",
                    "--calib-n", 16, "--out", tmp_path / "d")
    assert status == 0
    assert AutoModelForCausalLM.from_pretrained(tmp_path / "d").config.num_hidden_layers == 3
    assert json.loads((tmp_path / "d" / "pruning.json").read_text())["method"] == "sleb"
    status, _ = run(capsys, "prune", "width", "--model", checkpoint, "--method", "structured", "--sparsity", 0.3,
                    "--heads-per-group", 1, "--calib", "shifted", "--calib-n", 16, "--out", tmp_path / "w")
    assert status == 0
    cfg = AutoModelForCausalLM.from_pretrained(tmp_path / "w").config
    assert cfg.num_attention_heads == 2 and cfg.intermediate_size < 352


def test_prune_skipgpt_cli_routers_then_lora(checkpoint, tmp_path, capsys):
    status, out = run(capsys, "prune", "skipgpt", "--model", checkpoint, "--sparsity", 0.25, "--steps", 4,
                      "--train-n", 32, "--router", "lowrank", "--rank", 4, "--out", tmp_path / "r")
    assert status == 0, out.err
    assert (tmp_path / "r" / "routers.json").exists()
    status, out = run(capsys, "prune", "skipgpt", "--model", tmp_path / "r", "--stage", "lora", "--steps", 2,
                      "--train-n", 32, "--out", tmp_path / "l")
    assert status == 0, out.err
    assert AutoModelForCausalLM.from_pretrained(tmp_path / "l").config.num_hidden_layers == 4
    status, out = run(capsys, "prune", "skipgpt", "--model", checkpoint, "--stage", "lora", "--out", tmp_path / "x")
    assert status == 2 and "run --stage routers first" in out.err


@pytest.mark.parametrize("argv, message", [
    (["prune", "width", "--sparsity", "1.5"], "strictly between 0 and 1"),
    (["prune", "skipgpt", "--sparsity", "0"], "strictly between 0 and 1"),
    (["prune", "depth", "--remove", "9"], "cannot remove 9 layers from a 4-layer model"),
    (["prune", "depth", "--remove", "1", "--calib", "SHORT"], "shorter than one sequence of --seq-len 128"),
    (["prune", "depth", "--remove", "1", "--calib", "SHORT", "--seq-len", "0"], "need at least 4 sequences"),
])
def test_bad_input_is_one_line(checkpoint, tmp_path, capsys, argv, message):
    short = tmp_path / "short.txt"
    short.write_text("copy a b | a b .\n")
    argv = [a if a != "SHORT" else str(short) for a in argv]
    status, out = run(capsys, *argv, "--model", checkpoint, "--out", tmp_path / "o")
    assert status == 2
    last = out.err.strip().splitlines()[-1]  # (weight-loading progress bars may come first)
    assert last.startswith("brisk: error: ") and message in last and "Traceback" not in out.err


def test_unsupported_family_is_refused(tmp_path, capsys, checkpoint):
    path = tmp_path / "gpt2"
    GPT2LMHeadModel(GPT2Config(n_layer=2, n_embd=32, n_head=2, vocab_size=97)).save_pretrained(path)
    (path / "tokenizer.json").write_text((checkpoint / "tokenizer.json").read_text())
    for name in ("tokenizer_config.json", "special_tokens_map.json"):
        if (checkpoint / name).exists():
            (path / name).write_text((checkpoint / name).read_text())
    status, out = run(capsys, "prune", "depth", "--model", path, "--remove", 1, "--out", tmp_path / "o")
    assert status == 2 and "not supported" in out.err


def test_cost_model_counts_union_of_batch_and_kv_policies():
    dims = dict(hidden_size=64, num_heads=4, num_kv_heads=2, head_dim=16, intermediate_size=128)
    dense = torch.ones(3, 1, 10, dtype=torch.bool)
    full = decode_cost(dense, dense, dims, "full", prompt_len=5)
    assert full["bytes_per_token"] == pytest.approx(full["dense_bytes_per_token"] + 3 * 4 * 64)  # routers only
    g = torch.Generator().manual_seed(0)
    attn = torch.rand(3, 8, 10, generator=g) > 0.5
    mlp = torch.rand(3, 8, 10, generator=g) > 0.5
    one = decode_cost(attn[:, :1], mlp[:, :1], dims, "evict", prompt_len=5)
    eight = decode_cost(attn, mlp, dims, "evict", prompt_len=5)
    # Batch 1 skips whole weight reads; at batch 8 some token nearly always executes: smaller weight saving.
    assert one["weight_bytes_per_token"] < full["weight_bytes_per_token"]
    w1 = one["weight_bytes_per_token"] / full["weight_bytes_per_token"]
    w8 = eight["weight_bytes_per_token"] * 8 / full["weight_bytes_per_token"]
    assert w8 > w1
    reuse = decode_cost(attn[:, :1], mlp[:, :1], dims, "reuse", prompt_len=5, buffer_entries=1000)
    small = decode_cost(attn[:, :1], mlp[:, :1], dims, "reuse", prompt_len=5, buffer_entries=1)
    assert reuse["history_buffer_hit_rate"] > small["history_buffer_hit_rate"]
    assert reuse["kv_bytes_per_token"] <= small["kv_bytes_per_token"]
