"""Reasoning on real checkpoints and user data: JSONL loading, the verifier registry, chat-template framing,
the shared-tokenizer check, latent tokens through save/reload, batched Coconut decoding, and the CLI end to end
on real-convention fixtures (qwen2: no BOS; llama3: no pad, two eos; gemma2; phi3)."""

from __future__ import annotations

import json

import pytest
import torch

from brisklm.errors import BriskError
from brisklm.reasoning.data import ReasoningExample, load_jsonl
from brisklm.reasoning.verifiers import last_boxed, make_verifier

from conftest import run_cli

STYLES = ("qwen2", "llama3", "gemma2", "phi3")


def _write(path, rows) -> str:
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows))
    return str(path)


def _arith_rows(n: int = 12):
    rows = []
    for i in range(n):
        a, b, c = i % 7, (3 * i) % 5, (2 * i) % 4
        rows.append({"question": f"What is {a} + {b} + {c}?", "answer": str(a + b + c),
                     "steps": [f"{a} + {b} = {a + b}", f"{a + b} + {c} = {a + b + c}"]})
    return rows


# ---- verifiers --------------------------------------------------------------------------------------------------
def test_numeric_verifier_reads_last_number_and_gsm8k_marker():
    v = make_verifier("numeric")
    ex = ReasoningExample("q", "#### 1,000")
    assert v("so 3 + 4 = 7 and then 1000", ex)
    assert v("the answer is 1000.0", ex) and v("#### 1000 (not 5)", ex)  # '#### n' wins over a later number
    assert not v("1000 then 999", ex) and not v("no number here", ex)
    assert v("x = 3/4", ReasoningExample("q", "0.75"))  # exact fractions
    assert not v("answer 12", ReasoningExample("q", "1.2"))
    with pytest.raises(BriskError, match="cannot read the reference"):
        v.check_reference("seven")


def test_boxed_exact_and_regex_verifiers():
    assert last_boxed(r"a \boxed{1} then \boxed{\frac{1}{2}}") == r"\frac{1}{2}" and last_boxed(r"\boxed{1") is None
    boxed = make_verifier("boxed")
    assert boxed(r"so \boxed{ \frac{1}{2} }", ReasoningExample("q", r"\frac{1}{2}"))
    assert boxed(r"\boxed{2}", ReasoningExample("q", r"\boxed{2}")) and not boxed("2", ReasoningExample("q", "2"))
    exact = make_verifier("exact")
    assert exact("  Paris\n", ReasoningExample("q", "Paris")) and not exact("It is Paris", ReasoningExample("q", "Paris"))
    regex = make_verifier(r"regex:answer:\s*(\w+)")
    assert regex("think... answer: blue", ReasoningExample("q", "blue"))
    assert regex("answer: red. answer: blue", ReasoningExample("q", "answer: blue"))  # last match, reference parsed
    assert not regex("blue", ReasoningExample("q", "blue"))
    with pytest.raises(BriskError, match="regular expression"):
        make_verifier("regex:(")
    with pytest.raises(BriskError, match="unknown --verifier"):
        make_verifier("fuzzy")


def test_python_verifier(tmp_path, monkeypatch):
    (tmp_path / "my_checks.py").write_text("def same_length(text, answer):\n    return len(text) == len(answer)\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    v = make_verifier("python:my_checks:same_length")
    assert v("abc", ReasoningExample("q", "xyz")) and not v("ab", ReasoningExample("q", "xyz"))
    with pytest.raises(BriskError, match="no function"):
        make_verifier("python:my_checks:missing")
    with pytest.raises(BriskError, match="cannot import"):
        make_verifier("python:no_such_module_here:f")


# ---- data -------------------------------------------------------------------------------------------------------
def test_load_jsonl_fields_and_line_numbered_errors(tmp_path):
    good = _write(tmp_path / "d.jsonl", [{"question": " What is 2+2? ", "answer": 4, "steps": ["2 + 2 = 4"]}, "",
                                          {"prompt": "Name a colour.", "answer": "red"}])
    rows = load_jsonl(good)
    assert [(r.prompt, r.answer, r.steps) for r in rows] == [("What is 2+2?", "4", ("2 + 2 = 4",)),
                                                              ("Name a colour.", "red", None)]
    assert rows[0].completion == "2 + 2 = 4 4" and rows[1].meta["line"] == 3
    cases = [([{"question": "q"}], "line 1: missing 'answer'"),
             ([{"question": "q", "answer": "1"}, {"answer": "2"}], "line 2: missing 'question'"),
             (["{not json"], "line 1: not valid JSON"),
             ([{"question": "q", "answer": "1", "steps": "1 = 1"}], "'steps' must be a list"),
             ([{"question": "q", "answer": ""}], "'answer' must be a non-empty")]
    for rows_in, message in cases:
        with pytest.raises(BriskError, match=message):
            load_jsonl(_write(tmp_path / "bad.jsonl", rows_in))
    with pytest.raises(BriskError, match="line 2: the numeric verifier cannot read"):
        load_jsonl(_write(tmp_path / "v.jsonl", [{"question": "q", "answer": "3"}, {"question": "q", "answer": "x"}]),
                   make_verifier("numeric"))
    with pytest.raises(BriskError, match="line 3: latent CoT needs"):
        load_jsonl(good, need_steps=True)
    with pytest.raises(BriskError, match="does not exist"):
        load_jsonl(tmp_path / "nothing.jsonl")


# ---- framing, tokenizers, latent tokens -------------------------------------------------------------------------
def _loaded(path):
    from brisklm.zoo.store import load

    return load(str(path), device="cpu")


def test_rollouts_use_the_chat_template_with_system_prompt_and_count_model_tokens(fixture_checkpoints):
    from brisklm.core.text import TextLayer
    from brisklm.reasoning.rollout import sample_rollouts

    loaded = _loaded(fixture_checkpoints("llama3"))
    text = TextLayer.for_model(loaded.model, loaded.tokenizer, system_prompt="Answer briefly.")
    batch = sample_rollouts(loaded.model, text, ["What is 2 + 3?", "Name a colour."], 3, 7, seed=0)
    framed = loaded.tokenizer.apply_chat_template(
        [{"role": "system", "content": "Answer briefly."}, {"role": "user", "content": "What is 2 + 3?"}],
        add_generation_prompt=True, tokenize=True)
    framed = framed["input_ids"] if hasattr(framed, "keys") else framed
    assert batch.rollouts[0].prompt_ids == list(framed)
    assert all(len(r.completion_ids) + int(r.finished) <= 7 for r in batch.rollouts)  # the budget is in model tokens
    assert all(r.length == len(r.completion_ids) + int(r.finished) for r in batch.rollouts)
    stops = set(text.roles.eos_ids) | {text.end_id}
    assert not any(set(r.completion_ids) & stops for r in batch.rollouts)


def test_distillation_refuses_different_tokenizers_and_cuts_padded_vocabularies(fixture_checkpoints):
    from brisklm.reasoning.distill import check_shared_tokenizer, shared_width

    qwen, gemma = _loaded(fixture_checkpoints("qwen2")), _loaded(fixture_checkpoints("gemma2"))
    check_shared_tokenizer(qwen.tokenizer, qwen.tokenizer)
    with pytest.raises(BriskError, match="tokenizers differ"):
        check_shared_tokenizer(qwen.tokenizer, gemma.tokenizer)
    s, t = shared_width(torch.zeros(2, 3, 10), torch.zeros(2, 3, 12))
    assert s.shape == t.shape == (2, 3, 10)


@pytest.mark.parametrize("style", ["qwen2", "phi3"])
def test_latent_tokens_survive_save_and_reload(style, fixture_checkpoints, tmp_path):
    from brisklm.reasoning.latent import BOT, EOT, LATENT_TOKENS, PAUSE, add_latent_tokens, coconut_features, cot_of_example

    loaded = _loaded(fixture_checkpoints(style))
    before = len(loaded.tokenizer)
    add_latent_tokens(loaded.model, loaded.tokenizer)
    ids = {t: loaded.tokenizer.convert_tokens_to_ids(t) for t in LATENT_TOKENS}
    assert len(loaded.tokenizer) == before + 4 and loaded.model.get_input_embeddings().num_embeddings >= before + 4
    assert loaded.model.get_output_embeddings().weight.shape[0] == loaded.model.get_input_embeddings().num_embeddings
    loaded.model.save_pretrained(tmp_path / "m")
    loaded.tokenizer.save_pretrained(tmp_path / "m")
    again = _loaded(tmp_path / "m")
    assert {t: again.tokenizer.convert_tokens_to_ids(t) for t in LATENT_TOKENS} == ids
    torch.testing.assert_close(again.model.get_input_embeddings().weight, loaded.model.get_input_embeddings().weight)
    # one token each, never split by the subword tokenizer; forced as ids with no space token between them
    assert again.tokenizer(f"{PAUSE}", add_special_tokens=False)["input_ids"] == [ids[PAUSE]]
    example = ReasoningExample("What is 1 + 2 + 3?", "6", ("1 + 2 = 3", "3 + 3 = 6"))
    feature = coconut_features(again.tokenizer, cot_of_example(example), stage=2, thoughts=2)
    row = feature["input_ids"]
    start = row.index(ids[BOT])
    assert row[start:start + 6] == [ids[BOT]] + [ids["<latent>"]] * 4 + [ids[EOT]]
    assert all(label == -100 for label in feature["labels"][:start + 6])


def test_coconut_decoding_is_batched_over_prompts_of_different_lengths(fixture_checkpoints):
    from brisklm.reasoning.latent import add_latent_tokens, coconut_generate

    loaded = _loaded(fixture_checkpoints("qwen2"))
    add_latent_tokens(loaded.model, loaded.tokenizer)
    prompts = ["What is 1 + 2?", "Compute 12 plus 7 and then subtract 3 from the result, please.", "2 + 2?"]
    latents = [2, 2, 1]
    together = coconut_generate(loaded.model, loaded.tokenizer, prompts, latents, max_new_tokens=6)
    alone = [coconut_generate(loaded.model, loaded.tokenizer, [p], [n], max_new_tokens=6)[0]
             for p, n in zip(prompts, latents)]
    assert together == alone
    assert len({t for t, _ in together}) > 1  # different prompts, different continuations (the test can fail)


# ---- CLI end to end on every fixture style ----------------------------------------------------------------------
@pytest.fixture(scope="module")
def data_file(tmp_path_factory):
    return _write(tmp_path_factory.mktemp("reason-data") / "d.jsonl", _arith_rows())


@pytest.mark.parametrize("style", STYLES)
def test_cli_opsft_on_user_data(style, fixture_checkpoints, data_file, capsys):
    out = run_cli(["reason", "opsft", "--model", str(fixture_checkpoints(style)), "--data", data_file, "--rounds", "1",
                "--prompts", "2", "--samples", "2", "--budget", "8", "--max-new-tokens", "8", "--eval", "2",
                "--device", "cpu", "--system", "Think step by step."], capsys)
    assert "before: " in out and "after: " in out and '"accuracy"' in out


@pytest.mark.parametrize("style", STYLES)
def test_cli_distill_on_user_data(style, fixture_checkpoints, data_file, capsys, tmp_path):
    from brisklm.testing.checkpoints import build_checkpoint

    student = build_checkpoint(style, tmp_path / "student", seed=1)  # same tokenizer, other weights
    out = run_cli(["reason", "distill", "--teacher", str(fixture_checkpoints(style)), "--student", str(student),
                "--data", data_file, "--rounds", "2", "--prompts", "2", "--samples", "1", "--max-new-tokens", "8",
                "--eval", "2", "--kl", "mix:0.5", "--curriculum", "entropy", "--device", "cpu"], capsys)
    assert "student before" in out and "student after" in out and '"entropy"' in out


@pytest.mark.parametrize("style", STYLES)
def test_cli_latent_coconut_on_user_data(style, fixture_checkpoints, data_file, capsys, tmp_path):
    out = run_cli(["reason", "latent", "--method", "coconut", "--model", str(fixture_checkpoints(style)),
                "--data", data_file, "--stage0-steps", "1", "--stages", "2", "--steps-per-stage", "1",
                "--batch-size", "4", "--eval", "3", "--device", "cpu", "--out", str(tmp_path / "out")], capsys)
    assert "coconut stage 2" in out and '"mean_latent_positions": 4.0' in out  # 2 steps replaced: 2 thoughts + bot/eot
    again = _loaded(tmp_path / "out")
    assert "<latent>" in again.tokenizer.get_vocab()


@pytest.mark.parametrize("argv, message", [
    (["--data", "BAD"], "line 2: missing 'answer'"),
    (["--data", "GOOD", "--verifier", "boxed:x"], "unknown --verifier"),
    (["--data", "NUM"], "line 1: the numeric verifier cannot read"),
    (["--data", "GOOD", "--sampling", "beam"], "--sampling"),
])
def test_cli_bad_data_is_one_line(argv, message, fixture_checkpoints, data_file, tmp_path, capsys):
    from brisklm.cli import main

    files = {"BAD": _write(tmp_path / "bad.jsonl", [{"question": "q", "answer": "1"}, {"question": "q"}]),
             "NUM": _write(tmp_path / "num.jsonl", [{"question": "q", "answer": "seven"}]), "GOOD": data_file}
    argv = [files.get(a, a) for a in argv]
    assert main(["reason", "opsft", "--model", str(fixture_checkpoints("qwen2")), "--device", "cpu", *argv]) == 2
    err = capsys.readouterr().err
    assert message in err and err.count("\n") == 1 and "Traceback" not in err


def test_cli_distill_refuses_a_student_with_another_tokenizer(fixture_checkpoints, data_file, capsys):
    from brisklm.cli import main

    assert main(["reason", "distill", "--teacher", str(fixture_checkpoints("qwen2")), "--student",
                 str(fixture_checkpoints("gemma2")), "--data", data_file, "--device", "cpu"]) == 2
    err = capsys.readouterr().err
    assert "tokenizers differ" in err and err.count("\n") == 1


def test_internalization_and_pause_read_the_steps_of_user_data(fixture_checkpoints):
    from brisklm.core.text import as_text_layer
    from brisklm.reasoning.latent import (
        PAUSE, add_latent_tokens, cot_of_example, internalize_features, pause_features,
    )

    loaded = _loaded(fixture_checkpoints("phi3"))
    add_latent_tokens(loaded.model, loaded.tokenizer)
    text = as_text_layer(loaded.tokenizer)
    example = ReasoningExample("What is 4 + 5 + 6?", "15", ("4 + 5 = 9", "9 + 6 = 15"))
    cot = cot_of_example(example)
    assert cot.steps == (("4", "+", "5", "=", "9"), ("9", "+", "6", "=", "15")) and cot.tail == ("15",)

    def supervised(feature):
        return [t for t in feature["labels"] if t != -100]

    for removed, words in ((0, "4 + 5 = 9 9 + 6 = 15 15"), (5, "9 + 6 = 15 15"), (99, "15")):
        assert supervised(internalize_features(loaded.tokenizer, cot, removed)) == text.encode(words) + [text.end_id]
    pause = pause_features(loaded.tokenizer, cot, pauses=3, stage=1)
    pause_id = loaded.tokenizer.convert_tokens_to_ids(PAUSE)
    assert pause["input_ids"].count(pause_id) == 3 and supervised(pause) == text.encode("9 + 6 = 15 15") + [text.end_id]


@pytest.mark.parametrize("method", ["pause", "internalize"])
def test_cli_latent_other_methods_with_eval_data(method, fixture_checkpoints, data_file, tmp_path, capsys):
    eval_file = _write(tmp_path / "e.jsonl", _arith_rows(3))
    out = run_cli(["reason", "latent", "--method", method, "--model", str(fixture_checkpoints("llama3")),
                "--data", data_file, "--eval-data", eval_file, "--stage0-steps", "0", "--stages", "1",
                "--steps-per-stage", "1", "--batch-size", "4", "--device", "cpu", "--remove-per-stage", "5",
                "--pauses", "2"], capsys)
    assert f"{method} stage 1" in out and '"samples": 3' in out and "no --eval-data" not in out


@pytest.mark.parametrize("prefix, kl", [("teacher", "forward"), ("teacher", "reverse"), ("student", "forward"),
                                        ("student", "reverse")])
def test_cli_distill_every_objective_on_user_data(prefix, kl, fixture_checkpoints, data_file, capsys, tmp_path):
    from brisklm.testing.checkpoints import build_checkpoint

    student = build_checkpoint("qwen2", tmp_path / "student", seed=2)
    out = run_cli(["reason", "distill", "--teacher", str(fixture_checkpoints("qwen2")), "--student", str(student),
                "--data", data_file, "--rounds", "1", "--prompts", "2", "--samples", "1", "--max-new-tokens", "6",
                "--eval", "2", "--prefix", prefix, "--kl", kl, "--device", "cpu", "--verifier", "exact"], capsys)
    assert "student after" in out


def test_sampling_from_the_checkpoint_generation_config(fixture_checkpoints):
    from transformers import GenerationConfig

    from brisklm.reasoning.rollout import sample_rollouts

    loaded = _loaded(fixture_checkpoints("qwen2"))
    greedy = GenerationConfig(do_sample=False)
    one = sample_rollouts(loaded.model, loaded.tokenizer, ["What is 2 + 3?"] * 3, 2, 6, seed=0, generation_config=greedy)
    two = sample_rollouts(loaded.model, loaded.tokenizer, ["What is 2 + 3?"] * 3, 2, 6, seed=9, generation_config=greedy)
    assert len({tuple(r.completion_ids) for r in one.rollouts + two.rollouts}) == 1  # greedy: its settings were used
    top1 = GenerationConfig(do_sample=True, top_k=1, temperature=5.0)
    hot = sample_rollouts(loaded.model, loaded.tokenizer, ["What is 2 + 3?"] * 3, 2, 6, seed=1, generation_config=top1)
    assert [r.completion_ids for r in hot.rollouts] == [r.completion_ids for r in one.rollouts]  # top_k=1 is greedy
    plain = sample_rollouts(loaded.model, loaded.tokenizer, ["What is 2 + 3?"] * 3, 2, 6, seed=1, temperature=5.0)
    assert len({tuple(r.completion_ids) for r in plain.rollouts}) > 1  # plain sampling at T=5 varies


def test_external_rollouts_are_filtered_like_on_policy_samples(fixture_checkpoints, tmp_path, capsys):
    from brisklm.core.text import as_text_layer
    from brisklm.reasoning.data import load_rollouts
    from brisklm.reasoning.opsft import rollout_features

    loaded = _loaded(fixture_checkpoints("llama3"))
    text = as_text_layer(loaded.tokenizer)
    rows = [{"question": "What is 2 + 3?", "answer": "5", "completion": "2 + 3 = 5, so 5"},          # kept
            {"question": "What is 2 + 3?", "answer": "5", "completion": "2 + 3 = 6, so 6"},          # wrong
            {"question": "What is 2 + 3?", "answer": "5", "completion": "so 5", "finished": False},  # cut off
            {"prompt": "What is 1 + 1?", "answer": "2", "completion": "one plus one is two, which is 2 " * 3}]  # long
    path = _write(tmp_path / "r.jsonl", rows)
    rollouts = load_rollouts(path, make_verifier("numeric"))
    budget = len(text.encode("2 + 3 = 5, so 5")) + 1  # exactly fits the first (the end token counts)
    features, lengths = rollout_features(text, rollouts, make_verifier("numeric"), budget)
    assert len(features) == 1 and lengths[0] == budget and lengths[3] > budget
    head = text.prompt_ids("What is 2 + 3?")
    assert features[0]["input_ids"] == head + text.encode("2 + 3 = 5, so 5") + [text.end_id]
    assert features[0]["labels"][:len(head)] == [-100] * len(head)
    assert len(rollout_features(text, rollouts, make_verifier("numeric"), budget - 1)[0]) == 0
    with pytest.raises(BriskError, match="line 1: missing 'completion'"):
        load_rollouts(_write(tmp_path / "bad.jsonl", [{"question": "q", "answer": "1"}]))
    out = run_cli(["reason", "opsft", "--model", str(fixture_checkpoints("llama3")), "--rollouts", path,
                "--eval-data", path, "--prompts", "1", "--samples", "2", "--rounds", "5", "--budget", str(budget),
                "--max-new-tokens", "6", "--device", "cpu"], capsys)
    assert "before: " in out and "after: " in out
