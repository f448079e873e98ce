"""Pruning on real-convention checkpoints of every family: user calibration text through the text layer, every
static method and SkipGPT through the CLI, outputs that reload with from_pretrained and generate."""

import json

import pytest
import torch
from transformers import AutoModelForCausalLM

from brisklm.cli import main
from brisklm.core.text import as_text_layer
from brisklm.errors import BriskError
from brisklm.pruning.calibration import load_calibration
from brisklm.pruning.width import nm_violations, zero_fraction
from brisklm.testing.checkpoints import ENGLISH, FIXTURE_STYLES
from brisklm.zoo.store import load


def run(capsys, *argv):
    status = main([str(a) for a in argv])
    return status, capsys.readouterr()


@pytest.fixture(scope="module")
def text_file(tmp_path_factory):
    path = tmp_path_factory.mktemp("calib") / "text.txt"
    path.write_text("\n".join(ENGLISH * 3) + "\n")
    return path


def generate_json(capsys, model, *extra):
    status, out = run(capsys, "generate", "--model", model, "--prompt", "The quick brown fox", "--max-new-tokens", 4,
                      "--json", *extra)
    assert status == 0, out.err
    return json.loads(out.out)


@pytest.mark.parametrize("style", FIXTURE_STYLES)
def test_every_method_on_every_family_reloads_and_generates(style, fixture_checkpoints, text_file, tmp_path, capsys):
    model = fixture_checkpoints(style)
    common = ["--model", model, "--calib", text_file, "--seq-len", 32, "--calib-n", 8]
    runs = {
        "depth": ["prune", "depth", "--remove", 1, "--method", "sleb"],
        "nm": ["prune", "width", "--method", "wanda", "--nm", "2:4"],
        "structured": ["prune", "width", "--method", "structured", "--sparsity", 0.3, "--head-sparsity", 0.5],
        "skipgpt": ["prune", "skipgpt", "--sparsity", 0.25, "--steps", 2, "--train-n", 8],
    }
    for name, argv in runs.items():
        status, out = run(capsys, *argv, *common, "--out", tmp_path / name)
        assert status == 0, f"{name}: {out.err}"
        reloaded = AutoModelForCausalLM.from_pretrained(tmp_path / name)
        ids = torch.tensor([[1, 2, 3, 4, 5]])
        assert reloaded.generate(ids, max_new_tokens=2, do_sample=False, pad_token_id=0).shape == (1, 7)
        info = generate_json(capsys, tmp_path / name)
        assert info["new_tokens"] >= 1 and info["skipgpt"] == (name == "skipgpt")
    assert AutoModelForCausalLM.from_pretrained(tmp_path / "depth").config.num_hidden_layers == 2
    nm = AutoModelForCausalLM.from_pretrained(tmp_path / "nm")
    assert nm_violations(nm, 2, 4) == 0 and abs(zero_fraction(nm) - 0.5) < 1e-6
    narrow = AutoModelForCausalLM.from_pretrained(tmp_path / "structured").config
    assert narrow.num_attention_heads == 2 and narrow.num_key_value_heads == 2 and narrow.intermediate_size < 128
    report = json.loads((tmp_path / "skipgpt" / "routers.json").read_text())["info"]
    assert report["calib"] == str(text_file)
    assert generate_json(capsys, tmp_path / "skipgpt", "--dense")["skipgpt"] is False


def test_text_file_is_packed_into_full_sequences(fixture_checkpoints, text_file):
    tok = load(str(fixture_checkpoints("llama3"))).tokenizer
    text = as_text_layer(tok)
    data = load_calibration(tok, str(text_file), n=5, seq_len=40)
    assert len(data.features) == 5 and all(len(f["input_ids"]) == 40 for f in data.features)
    stream = text.plain_ids(text_file.read_text())  # the whole .txt is one document: [bos] text eos
    assert [i for f in data.features for i in f["input_ids"]] == stream[:200]
    assert data.features[0]["input_ids"][0] == text.roles.bos_id
    assert data.features[1]["labels"][1:] == data.features[1]["input_ids"][1:]
    everything = load_calibration(tok, str(text_file), n=10_000, seq_len=40)
    assert len(everything.features) == len(stream) // 40  # the tail shorter than a sequence is dropped


def test_jsonl_records_are_documents(fixture_checkpoints, tmp_path):
    tok = load(str(fixture_checkpoints("qwen2"))).tokenizer  # no BOS
    text = as_text_layer(tok)
    path = tmp_path / "c.jsonl"
    path.write_text("\n".join(json.dumps({"text": s, "id": i}) for i, s in enumerate(ENGLISH)) + "\n\n")
    data = load_calibration(tok, str(path), n=3, seq_len=16)
    expected = [i for s in ENGLISH for i in text.plain_ids(s)][:48]  # each record: text eos (no bos here)
    assert [i for f in data.features for i in f["input_ids"]] == expected
    assert text.roles.bos_id is None and text.roles.eos_id in expected
    per_record = load_calibration(tok, str(path), n=len(ENGLISH))  # seq_len None: one sequence per record
    assert [f["input_ids"] for f in per_record.features] == [text.plain_ids(s) for s in ENGLISH]


@pytest.mark.parametrize("content, message", [
    ('{"text": "one"}\n{"text": 3}\n', "line 2 has no string field 'text'"),
    ('{"text": "one"}\n\n{"text": "two"\n', "line 3 is not valid JSON"),
    ('["text"]\n', "line 1 has no string field 'text'"),
])
def test_bad_jsonl_names_the_line(fixture_checkpoints, tmp_path, content, message):
    tok = load(str(fixture_checkpoints("qwen2"))).tokenizer
    path = tmp_path / "bad.jsonl"
    path.write_text(content)
    with pytest.raises(BriskError, match=message):
        load_calibration(tok, str(path), seq_len=8)


def test_bad_calibration_input_is_one_line(fixture_checkpoints, tmp_path, capsys):
    model = fixture_checkpoints("mistral")
    short = tmp_path / "short.txt"
    short.write_text("The quick brown fox.\n")
    cases = [
        (["prune", "depth", "--remove", 1, "--calib", short], "shorter than one sequence of --seq-len 128"),
        (["prune", "depth", "--remove", 1, "--calib", tmp_path / "missing.jsonl"], "neither one of"),
        (["prune", "width", "--nm", "2:3"], "N:M 2:3 needs every projection's input size divisible by 3"),
        (["prune", "width", "--nm", "4:4"], "1 <= N < M"),
        (["prune", "width", "--method", "structured", "--sparsity", 0.3, "--head-sparsity", 0.9],
         "leaving a GQA group empty"),
        (["prune", "width", "--method", "structured", "--sparsity", 0.3, "--heads-per-group", 2],
         "would leave a GQA group empty"),
        (["generate", "--prompt", "hi", "--max-new-tokens", 0], "--max-new-tokens must be at least 1"),
    ]
    for argv, message in cases:
        out_args = [] if argv[0] == "generate" else ["--out", tmp_path / "o"]
        status, out = run(capsys, *argv, "--model", model, *out_args)
        last = out.err.strip().splitlines()[-1]
        assert status == 2 and last.startswith("brisk: error: ") and message in last, (argv, out.err)
        assert "Traceback" not in out.err


@pytest.mark.parametrize("style", ["phi3", "gemma3"])
def test_skipgpt_lora_stage_on_family_projection_names(style, fixture_checkpoints, text_file, tmp_path, capsys):
    """Stage 2 puts LoRA on the family's own projections (Phi3: fused qkv_proj / gate_up_proj), merges it, keeps
    the routers beside the merged checkpoint, and the result generates with them."""
    common = ["--calib", text_file, "--seq-len", 32, "--train-n", 8, "--steps", 2]
    status, out = run(capsys, "prune", "skipgpt", "--model", fixture_checkpoints(style), *common, "--out", tmp_path / "r")
    assert status == 0, out.err
    status, out = run(capsys, "prune", "skipgpt", "--model", tmp_path / "r", "--stage", "lora", *common,
                      "--out", tmp_path / "l")
    assert status == 0, out.err
    before = AutoModelForCausalLM.from_pretrained(tmp_path / "r")
    after = AutoModelForCausalLM.from_pretrained(tmp_path / "l")
    changed = {n.split(".")[-2] for n, p in after.named_parameters()
               if not torch.equal(p, dict(before.named_parameters())[n])}
    expected = {"qkv_proj", "gate_up_proj"} if style == "phi3" else {"q_proj", "v_proj", "gate_proj"}
    assert changed == expected
    assert json.loads((tmp_path / "l" / "routers.json").read_text())["info"]["stage"] == "lora"
    assert generate_json(capsys, tmp_path / "l", "--kv-policy", "evict")["skipgpt"] is True


@pytest.mark.parametrize("style, extra", [("qwen2", []), ("mistral", ["--system-prompt", "Be brief."]),
                                          ("gemma2", ["--no-chat-template"])])
def test_generate_equals_hf_generate_on_the_framed_prompt(style, extra, fixture_checkpoints, capsys):
    """`brisk generate` on a dense checkpoint == HF's own greedy generate on the text layer's framed prompt."""
    from brisklm.core.text import TextLayer

    path = fixture_checkpoints(style)
    info = generate_json(capsys, path, *extra)
    loaded = load(str(path))
    text = TextLayer.for_model(loaded.model, loaded.tokenizer, chat_template="--no-chat-template" not in extra,
                               system_prompt="Be brief." if "--system-prompt" in extra else None)
    prompt = text.prompt_ids("The quick brown fox")
    assert info["prompt_tokens"] == len(prompt)
    eos = list(dict.fromkeys([*text.roles.eos_ids, text.end_id]))
    ref = loaded.model.generate(torch.tensor([prompt]), max_new_tokens=4, do_sample=False, eos_token_id=eos,
                                pad_token_id=text.roles.pad_id)
    new, _ = text.cut_at_eos(ref[0, len(prompt):].tolist())
    assert info["completion"] == text.decode(new) and info["new_tokens"] == len(new)


def test_generate_system_prompt_needs_a_template(fixture_checkpoints, capsys):
    status, out = run(capsys, "generate", "--model", fixture_checkpoints("qwen2"), "--prompt", "hi", "--system-prompt",
                      "x", "--no-chat-template")
    assert status == 2 and "needs a chat template" in out.err.strip().splitlines()[-1]
