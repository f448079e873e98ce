"""Latent CoT, fast tests: pause/Coconut/internalization sequences, Coconut's continuous-thought forward against
an explicit loop, its KV-cache decoding, the stage schedules, bad input, and the `brisk reason latent` CLI."""

from __future__ import annotations

import random

import pytest
import torch

from brisklm.errors import BriskError
from brisklm.reasoning.latent import (
    BOT, EOT, LATENT, PAUSE, LatentConfig, add_latent_tokens, coconut_features, coconut_forward, coconut_generate,
    coconut_latents, cot_of_example, explicit_features, internalize_features, pause_features, removed_tokens,
    smoothed_offset, split_cot, stage_features,
)
from brisklm.tasks.cot_arithmetic import CotArithmeticTask
from brisklm.tasks.tokenizer import build_word_tokenizer
from brisklm.zoo.architecture import new_model, tiny_llama_config
from brisklm.zoo.textlm import IGNORE, PadCollator

TASK = CotArithmeticTask(min_terms=3, max_terms=4, modulus=5)


def tiny(seed: int = 0, double: bool = True):
    tok = build_word_tokenizer(TASK.vocabulary())
    cfg = tiny_llama_config(len(tok), "tiny", pad_token_id=tok.pad_token_id, bos_token_id=tok.bos_token_id,
                            eos_token_id=tok.eos_token_id, hidden_size=32, num_hidden_layers=2,
                            num_attention_heads=2, num_key_value_heads=1, intermediate_size=64)
    model = new_model(cfg, seed)
    model = model.double() if double else model
    add_latent_tokens(model, tok)
    return model.eval(), tok


def words(tok, ids) -> list[str]:
    return tok.convert_ids_to_tokens(list(ids))


def supervised(tok, feature) -> list[str]:
    return words(tok, [t for t in feature["labels"] if t != IGNORE])


COT = split_cot("Q: 1 + 2 - 4 + 3 =", "1 + 2 = 3 ; 3 - 4 = 4 ; 4 + 3 = 2 ; answer 2")


def test_split_cot_and_task_examples():
    assert len(COT.steps) == 3 and COT.steps[1] == ("3", "-", "4", "=", "4", ";") and COT.tail == ("answer", "2")
    ex = TASK.examples("train", 1)[0]
    cot = cot_of_example(ex)
    assert " ".join(cot.cot_words + list(cot.tail)) == ex.meta["minimal_cot"]
    assert len(cot.steps) == len(ex.meta["steps"])
    with pytest.raises(BriskError, match="tail"):
        split_cot("Q:", "1 + 1 = 2 ;")


def test_pause_tokens_follow_the_prompt_and_get_no_loss():
    _, tok = tiny()
    for stage, rest in ((None, []), (3, []), (1, list(COT.steps[1]) + list(COT.steps[2])), (0, COT.cot_words)):
        f = pause_features(tok, COT, 4, stage)
        seq = words(tok, f["input_ids"])
        head = ["<bos>", *COT.prompt.split(), "<sep>"]
        assert seq[:len(head)] == head and seq[len(head):len(head) + 4] == [PAUSE] * 4
        assert seq.count(PAUSE) == 4
        assert all(label == IGNORE for label, w in zip(f["labels"], seq) if w == PAUSE)  # pauses: no loss
        assert supervised(tok, f) == rest + ["answer", "2", "<eos>"]  # exactly the rest of the CoT and the answer
        # position i predicts labels[i + 1]: the last pause predicts the first supervised token
        first = f["labels"].index(next(t for t in f["labels"] if t != IGNORE))
        assert seq[first - 1] == PAUSE
    with pytest.raises(BriskError, match="pauses"):
        pause_features(tok, COT, -1)


def test_coconut_stage_schedule_replaces_the_first_k_steps():
    _, tok = tiny()
    for c in (1, 2):
        for stage in range(5):
            f = coconut_features(tok, COT, stage, c)
            seq = words(tok, f["input_ids"])
            k = min(stage, 3)
            assert seq.count(LATENT) == c * k == coconut_latents(3, stage, c)
            b, e = seq.index(BOT), seq.index(EOT)
            assert seq[b + 1:e] == [LATENT] * (c * k) and seq[b - 1] == "<sep>"
            remaining = [w for step in COT.steps[k:] for w in step]
            assert supervised(tok, f) == remaining + ["answer", "2", "<eos>"]
            assert all(label == IGNORE for label in f["labels"][:e + 1])  # no loss on <bot>, thoughts, <eot>
    assert supervised(tok, explicit_features(tok, COT)) == COT.cot_words + ["answer", "2", "<eos>"]


def test_internalization_removes_exactly_the_scheduled_leading_tokens():
    _, tok = tiny()
    n = len(COT.cot_words)
    assert n == 18
    for delta in (1, 4, 6, 7):
        for stage in range(6):
            removed = removed_tokens(stage, delta, n)
            assert removed == min(stage * delta, n)
            f = internalize_features(tok, COT, removed)
            assert supervised(tok, f) == COT.cot_words[removed:] + ["answer", "2", "<eos>"]
            assert len(f["input_ids"]) == len(explicit_features(tok, COT)["input_ids"]) - removed
    config = LatentConfig(method="internalize", remove_per_stage=4, stages=5)
    feats = stage_features(tok, [COT], config, 2)
    assert supervised(tok, feats[0])[0] == COT.cot_words[8]  # stage 2 x 4 tokens removed, no smoothing
    # smoothing: P(o) ~ exp(-lambda o); lambda = 0 is uniform over 0..limit, a huge lambda never adds
    rng = random.Random(0)
    draws = [smoothed_offset(rng, 0.0, 3) for _ in range(4000)]
    assert set(draws) == {0, 1, 2, 3} and abs(draws.count(0) / 4000 - 0.25) < 0.03
    assert {smoothed_offset(rng, 50.0, 3) for _ in range(200)} == {0} and smoothed_offset(rng, None, 9) == 0
    draws = [smoothed_offset(rng, 1.0, 10) for _ in range(4000)]
    assert 0.55 < draws.count(0) / 4000 < 0.7  # 1 / sum(e^-o) = 0.632


def _explicit_loop_logits(model, ids: list[int], latent_id: int) -> torch.Tensor:
    """Reference: grow the input-embedding sequence token by token; a <latent> slot gets the last hidden state."""
    embed = model.get_input_embeddings()
    seq = embed(torch.tensor([ids[:1]]))
    for token in ids[1:]:
        if token == latent_id:
            last = model.base_model(inputs_embeds=seq).last_hidden_state[:, -1:]  # (1, 1, D)
            seq = torch.cat([seq, last], 1)
        else:
            seq = torch.cat([seq, embed(torch.tensor([[token]]))], 1)
    return model(inputs_embeds=seq).logits[0]


def test_coconut_forward_equals_the_explicit_hidden_state_loop():
    model, tok = tiny(3)
    latent_id = tok.convert_tokens_to_ids(LATENT)
    cots = [cot_of_example(e) for e in TASK.examples("train", 4, seed=1)]
    feats = [coconut_features(tok, c, stage, thoughts) for c, stage, thoughts in zip(cots, (0, 1, 2, 3), (1, 2, 1, 2))]
    batch = PadCollator(tok.pad_token_id)(feats)
    with torch.no_grad():
        logits = coconut_forward(model, batch["input_ids"], batch["attention_mask"], latent_id)
        plain = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    for i, f in enumerate(feats):
        n = len(f["input_ids"])
        with torch.no_grad():
            ref = _explicit_loop_logits(model, f["input_ids"], latent_id)
        torch.testing.assert_close(logits[i, :n], ref, rtol=1e-9, atol=1e-10)
        has_latent = latent_id in f["input_ids"]
        after = f["input_ids"].index(tok.convert_tokens_to_ids(EOT))
        # the thoughts change what follows them (so the test can tell continuous thoughts from token embeddings)
        assert has_latent == (not torch.allclose(logits[i, after:n], plain[i, after:n])), i
    # gradients reach the weights through the thoughts: the loss at the answer depends on every pass
    model.zero_grad()
    coconut_forward(model, batch["input_ids"], batch["attention_mask"], latent_id)[:, -1].sum().backward()
    assert model.model.layers[0].self_attn.q_proj.weight.grad.abs().sum() > 0


def test_coconut_kv_cache_decoding_matches_the_training_forward():
    model, tok = tiny(5)
    latent_id = tok.convert_tokens_to_ids(LATENT)
    cots = [cot_of_example(e) for e in TASK.examples("test", 6, seed=2)]
    latents = [coconut_latents(len(c.steps), 2, 1) for c in cots]
    out = coconut_generate(model, tok, [c.prompt for c in cots], latents, max_new_tokens=5)
    for c, n, (text, count) in zip(cots, latents, out):
        head = tok.convert_tokens_to_ids(["<bos>", *c.prompt.split(), "<sep>", BOT] + [LATENT] * n + [EOT])
        gen = tok.convert_tokens_to_ids(text.split()) if text else []
        assert count == len(gen) + int(len(gen) < 5)  # <eos> counted when it came within the cap
        ids = torch.tensor([head + gen])
        with torch.no_grad():
            logits = coconut_forward(model, ids, None, latent_id)[0]
        greedy = logits[len(head) - 1:].argmax(-1).tolist()
        assert greedy[:len(gen)] == gen


def test_latent_config_rejects_bad_settings():
    for bad, message in ((dict(method="quiet"), "--method"), (dict(stages=0), "--stages"),
                         (dict(thoughts=0), "--thoughts"), (dict(smoothing=-1.0), "--smoothing")):
        with pytest.raises(BriskError, match=message):
            LatentConfig(**bad).check()
    model, tok = tiny()
    ids = torch.tensor([[tok.convert_tokens_to_ids(LATENT), 5]])
    with pytest.raises(BriskError, match="first token"):
        coconut_forward(model, ids, None, tok.convert_tokens_to_ids(LATENT))


@pytest.mark.parametrize("method", ["pause", "coconut", "internalize"])
def test_cli_latent_smoke(method, tmp_path, capsys):
    from brisklm.cli import main

    model, tok = tiny(1, double=False)
    fresh = build_word_tokenizer(TASK.vocabulary())  # a plain task checkpoint, as the zoo saves it
    model.resize_token_embeddings(len(fresh))
    model.save_pretrained(tmp_path / "m")
    fresh.save_pretrained(tmp_path / "m")
    out = tmp_path / "out"
    rc = main(["reason", "latent", "--method", method, "--model", str(tmp_path / "m"), "--stage0-steps", "2",
               "--stages", "2", "--steps-per-stage", "2", "--batch-size", "8", "--train", "32", "--eval", "8",
               "--out", str(out)])
    text = capsys.readouterr().out
    assert rc == 0, text
    assert "explicit minimal CoT (stage 0)" in text and f"{method} stage 2" in text and '"accuracy"' in text
    assert (out / "latent.json").exists() and (out / "tokenizer.json").exists()


def test_cli_latent_rejects_bad_method(capsys):
    from brisklm.cli import main

    assert main(["reason", "latent", "--method", "telepathy"]) == 2
    err = capsys.readouterr().err
    assert "--method" in err and err.count("\n") == 1
