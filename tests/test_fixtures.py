"""Real-convention fixtures: each style saves, reloads through brisklm's loader, and generates."""

import json
import time

import pytest
import torch

from brisklm.testing.checkpoints import FIXTURE_STYLES, build_checkpoint
from brisklm.zoo.store import load

MODEL_TYPES = {"qwen2": "qwen2", "qwen3": "qwen3", "llama3": "llama", "mistral": "mistral", "gemma2": "gemma2",
               "gemma3": "gemma3_text", "phi3": "phi3"}


@pytest.mark.parametrize("style", FIXTURE_STYLES)
def test_fixture_loads_and_generates(fixture_checkpoints, style):
    path = fixture_checkpoints(style)
    config = json.loads((path / "config.json").read_text())
    assert config["model_type"] == MODEL_TYPES[style]
    assert (path / "generation_config.json").exists() and (path / "tokenizer.json").exists()
    loaded = load(str(path))
    tok, model = loaded.tokenizer, loaded.model
    assert tok.chat_template and len(tok) == model.get_input_embeddings().num_embeddings
    ids = tok("The quick brown fox", return_tensors="pt")["input_ids"]
    assert ids.shape[1] > 4  # words split into several tokens
    out = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=5, do_sample=False,
                         pad_token_id=tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id)
    assert out.shape[1] > ids.shape[1] and torch.equal(out[:, : ids.shape[1]], ids)


def test_fixture_conventions(fixture_checkpoints):
    qwen = json.loads((fixture_checkpoints("qwen2") / "tokenizer_config.json").read_text())
    assert qwen.get("bos_token") is None and qwen["eos_token"] == "<|im_end|>" and qwen["pad_token"] == "<|endoftext|>"
    llama = json.loads((fixture_checkpoints("llama3") / "config.json").read_text())
    rope = llama.get("rope_parameters") or llama.get("rope_scaling")
    assert rope["rope_type"] == "llama3" and isinstance(llama["eos_token_id"], list) and len(llama["eos_token_id"]) == 2
    assert llama.get("pad_token_id") is None
    mistral = load(str(fixture_checkpoints("mistral")))
    assert mistral.model.config.sliding_window == 4
    assert any(t.startswith("▁") for t in mistral.tokenizer.convert_ids_to_tokens(mistral.tokenizer("a cat sat")["input_ids"]))
    gemma = load(str(fixture_checkpoints("gemma2"))).model.config
    assert gemma.attn_logit_softcapping and gemma.final_logit_softcapping and gemma.sliding_window == 4


def test_builder_is_deterministic_and_fast(tmp_path, fixture_checkpoints):
    fixture_checkpoints("qwen2")  # tokenizer trained (cached in-process)
    start = time.perf_counter()
    a = build_checkpoint("phi3", tmp_path / "a", seed=3)
    elapsed = time.perf_counter() - start
    b = build_checkpoint("phi3", tmp_path / "b", seed=3)
    assert (a / "tokenizer.json").read_text() == (b / "tokenizer.json").read_text()
    wa, wb = load(str(a)).model.state_dict(), load(str(b)).model.state_dict()
    assert all(torch.equal(wa[k], wb[k]) for k in wa)
    assert elapsed < 2.0


@pytest.mark.parametrize("style", FIXTURE_STYLES)
def test_analyze_lens_runs_on_every_style(fixture_checkpoints, style, capsys):
    from brisklm.cli import main

    path = str(fixture_checkpoints(style))
    assert main(["analyze", "lens", "--model", path, "--prompt", "The quick brown fox", "-k", "3"]) == 0
    framed = capsys.readouterr().out.splitlines()
    assert [line.split(":")[0].strip() for line in framed] == ["emb", "L1", "L2", "L3"]
    assert main(["analyze", "lens", "--model", path, "--prompt", "The quick brown fox", "--no-chat-template"]) == 0
    plain = capsys.readouterr().out.splitlines()
    assert len(plain) == 4 and plain != framed  # the chat frame ends elsewhere than the raw prompt
    assert main(["analyze", "lens", "--model", path, "--prompt", "a fox", "--system-prompt", "Be brief."]) == 0
    assert main(["analyze", "lens", "--model", path, "--prompt", "a fox", "--no-chat-template",
                 "--system-prompt", "Be brief."]) == 2
    assert "system prompt needs a chat template" in capsys.readouterr().err


@pytest.mark.parametrize("style", ["qwen2", "gemma2"])
def test_icl_encoding_on_subword_fixture(fixture_checkpoints, style):
    from brisklm.analysis.icl import encode_icl, evaluate_condition
    from brisklm.tasks.icl import IclTask

    loaded = load(str(fixture_checkpoints(style)))
    tok = loaded.tokenizer
    examples = IclTask(shots=3, with_similar=True).examples("test", 4, seed=1)
    batch = encode_icl(tok, examples)
    for i, e in enumerate(examples):
        row = batch.enc.input_ids[i, : int(batch.enc.lengths[i])].tolist()
        assert row[-1] == row[int(batch.query_positions[i])]  # the query is the prompt's last token
        upto = tok.decode(row[: int(batch.label_positions[i]) + 1])
        label_word = e.prompt.split()[e.meta["label_positions"][-1]]
        assert upto.endswith(label_word)
        assert tok.decode([int(batch.answer_ids[i])]).strip() and e.completion.startswith(
            tok.decode([int(batch.answer_ids[i])]).strip())
    res = evaluate_condition(loaded.model, tok, ("sentiment",), shots=2, n=4, batch_size=2)
    assert 0.0 <= res.accuracy <= 1.0 and res.pir["residual"].ranks.shape[0] == 4


def test_live_decode_on_a_subword_tokenizer_is_head_decode(fixture_checkpoints):
    """The word-level live decoder hands a subword checkpoint to head_decode (decisions at word starts only)."""
    from brisklm.core.text import TextLayer
    from brisklm.streaming.proactive.heads import Head, live_decode
    from brisklm.streaming.proactive.subword import head_decode

    loaded = load(str(fixture_checkpoints("llama3")))
    words = ["the", "lazy", "dog"]
    live = live_decode(loaded.model, loaded.tokenizer, words, Head("entropy"), 4.0)
    text = TextLayer.for_model(loaded.model, loaded.tokenizer)
    direct = head_decode(loaded.model, text, [words], Head("entropy"), 4.0)
    assert live.words and live.words == direct.outputs[0].words
    assert live.delays == direct.outputs[0].delays


def test_calibration_text_file_on_subword_fixture(fixture_checkpoints, tmp_path):
    from brisklm.core.text import as_text_layer
    from brisklm.pruning.calibration import hf_forward, load_calibration, token_metrics
    from brisklm.testing.checkpoints import ENGLISH

    loaded = load(str(fixture_checkpoints("llama3")))
    file = tmp_path / "calib.txt"
    file.write_text("\n".join(ENGLISH) + "\n")
    data = load_calibration(loaded.tokenizer, str(file), n=len(ENGLISH))
    roles = as_text_layer(loaded.tokenizer).roles
    first = data.features[0]["input_ids"]
    assert first[0] == roles.bos_id and first[-1] == roles.eos_id and len(first) > len(ENGLISH[0].split()) + 2
    metrics = token_metrics(hf_forward(loaded.model), data, roles.pad_id)
    assert metrics["perplexity"] > 1.0
