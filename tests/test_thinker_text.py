"""StreamingThinker on any checkpoint and your data: the batched session equals one full masked pass per example,
batched free decoding equals single streams, JSONL errors name their line, `brisk think` / `think train` run on
the fixture families."""

import io
import json
import sys

import pytest
import torch

from brisklm.cli import main
from brisklm.core.text import TextLayer
from brisklm.errors import BriskError
from brisklm.streaming.thinker.text import (ThinkerExample, forced_targets, parse_answer,
                                            read_thinker_data, reference_logits, text_thinker_batch,
                                            text_thinker_layout, unit_end)
from brisklm.streaming.train import streaming_loss
from brisklm.zoo.store import load

pytestmark = pytest.mark.usefixtures("one_thread")
TOL = 1e-4
EXAMPLES = [
    ThinkerExample("How many apples does Tom have now?",
                   ["Tom has three apples.", "He buys two more apples.", "The sky is blue."], "5",
                   ["Tom starts with 3.", "3 + 2 = 5.", "Not relevant."], "Tom has 5 apples."),
    ThinkerExample("Where is the cat?", ["The cat sat in the kitchen."], "kitchen", ["The cat is in the kitchen."]),
    ThinkerExample("Who won?", ["Ann ran fast.", "Bob ran faster."], "Bob", ["Ann is fast.", "Bob beats Ann."],
                   "Bob was faster than Ann."),
]
ROWS = [{"question": e.question, "context": e.context, "answer": e.answer, "units": e.units,
         **({"final": e.final} if e.final else {})} for e in EXAMPLES]
CASES = [("qwen2", False), ("llama3", True), ("gemma2", True), ("mistral", True)]


@pytest.fixture(scope="module", params=CASES, ids=[f"{s}-{'chat' if c else 'plain'}" for s, c in CASES])
def checkpoint(request, fixture_checkpoints):
    style, chat = request.param
    loaded = load(str(fixture_checkpoints(style)))
    with torch.no_grad():  # larger weights: a visibility or position error shows in the logits
        for p in loaded.model.parameters():
            p.mul_(4.0 if p.dim() > 1 else 1.0)
    text = TextLayer.for_model(loaded.model, loaded.tokenizer, chat_template=chat)
    return loaded.model, text, unit_end(text)[1]


def run_batched(model, text, marker, examples, **kwargs):
    """One batched session over examples with different numbers of sentences (think_batched's round loop)."""
    from brisklm.streaming.thinker.text import think_batched

    (session,) = think_batched(model, text, examples, len(examples), marker, **kwargs)
    return session


@torch.no_grad()
def test_batched_session_equals_one_masked_pass_per_example(checkpoint):
    model, text, marker = checkpoint
    forced = forced_targets(text, EXAMPLES, marker)
    session = run_batched(model, text, marker, EXAMPLES, keep_logits=True, forced=forced)
    for b, e in enumerate(EXAMPLES):
        ref = reference_logits(model, text, e, marker)
        got = torch.stack(session.logits[b])
        assert got.shape == ref.shape
        assert (got - ref).abs().max() < TOL
    assert session.units[0][1] == "3 + 2 = 5." and parse_answer(session.finals[0]) == "5"
    # the input is encoded once: exactly the source tokens of the three layouts
    layouts = [text_thinker_layout(text, e, marker) for e in EXAMPLES]
    assert session.input_tokens_forwarded == sum(len(x.source_ids) for x in layouts)


@torch.no_grad()
def test_mask_is_needed_a_causal_pass_differs(checkpoint):
    from brisklm.core import MatrixVisibility, Plan, execute

    model, text, marker = checkpoint
    layout = text_thinker_layout(text, EXAMPLES[0], marker)
    batch = text_thinker_batch([layout], text.roles.pad_id)
    s_len, header = len(layout.source_ids), len(layout.target[0])
    # unit 1 must not see sentence 2, and the reasoning starts at position 0 (group positions)
    assert not batch["visibility"][0, s_len + header, s_len - 1] and batch["position_ids"][0, s_len] == 0
    causal = Plan(position_ids=batch["position_ids"], visibility=MatrixVisibility(batch["visibility"][0].tril()[None] | 
                  torch.ones_like(batch["visibility"]).tril().bool()))
    wrong = execute(model, batch["input_ids"], plan=causal).logits[0, s_len + header - 1:-1].float()
    assert (wrong - reference_logits(model, text, EXAMPLES[0], marker)).abs().max() > 1e-2  # a negative control


@torch.no_grad()
def test_batched_free_decoding_equals_single_streams(checkpoint):
    model, text, marker = checkpoint
    batched = run_batched(model, text, marker, EXAMPLES, max_unit_tokens=5, max_final_tokens=6)
    for b, e in enumerate(EXAMPLES):
        single = run_batched(model, text, marker, [e], max_unit_tokens=5, max_final_tokens=6)
        assert single.units[0] == batched.units[b] and single.finals[0] == batched.finals[b]
    assert all(len(u) == len(e.context) for u, e in zip(batched.units, EXAMPLES))


def test_training_teaches_the_units_and_answers_read_while_streaming(fixture_checkpoints, tmp_path):
    """80 steps on three examples: the streaming loss falls, and free think-while-reading decoding (batched,
    through the session's own visibility) writes the trained units and answers; the untrained model does not."""
    from brisklm.streaming.thinker.text import TextThinkerCollator, train_thinker_text
    from brisklm.zoo.textlm import TrainOptions

    loaded = load(str(fixture_checkpoints("qwen2")))
    text = TextLayer.for_model(loaded.model, loaded.tokenizer)
    marker = unit_end(text)[1]
    batch = TextThinkerCollator(text, marker)([{"example": e} for e in EXAMPLES])
    with torch.no_grad():
        before = float(streaming_loss(loaded.model, batch))
        untrained = run_batched(loaded.model, text, marker, EXAMPLES, max_unit_tokens=16, max_final_tokens=32)
    assert untrained.answers != [e.answer for e in EXAMPLES]
    train_thinker_text(loaded.model, text, EXAMPLES, TrainOptions(steps=80, batch_size=3, learning_rate=3e-3),
                       str(tmp_path), marker)
    with torch.no_grad():
        after = float(streaming_loss(loaded.model, batch))
        trained = run_batched(loaded.model, text, marker, EXAMPLES, max_unit_tokens=16, max_final_tokens=32)
    assert after < before - 3.0
    assert trained.answers == [e.answer for e in EXAMPLES]
    exact = sum(u == t for got, e in zip(trained.units, EXAMPLES) for u, t in zip(got, e.units))
    assert exact >= 5  # of 6 units


@pytest.mark.parametrize("line, message", [
    ({"context": ["a b."], "answer": "1"}, "line 2: needs an object with fields 'question'"),
    ({"question": "q?", "context": ["a b."]}, "line 2: needs an object with fields 'question'"),
    ({"question": "q?", "answer": "1"}, "line 2: the example has no context"),
    ({"question": "q?", "context": [], "answer": "1"}, "line 2: the example has no context"),
    ({"question": "q?", "context": ["a.", "b."], "answer": "1", "units": ["x"]}, "line 2: 1 units for 2"),
    ({"question": "q?", "context": "a b.", "answer": "1"}, "line 2: field 'context' must be a list"),
])
def test_bad_jsonl_lines_name_their_line(tmp_path, line, message):
    path = tmp_path / "d.jsonl"
    path.write_text(json.dumps(ROWS[0]) + "\n" + json.dumps(line) + "\n")
    with pytest.raises(BriskError, match=message):
        read_thinker_data(path)


def test_cli_think_train_then_think_on_every_family(fixture_checkpoints, tmp_path, capsys, monkeypatch):
    data = tmp_path / "train.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in ROWS))
    for style in ("qwen2", "llama3", "gemma2", "mistral", "phi3"):
        out = tmp_path / style
        assert main(["think", "train", "--model", str(fixture_checkpoints(style)), "--data", str(data),
                     "--steps", "2", "--batch-size", "3", "--out", str(out)]) == 0
        assert json.loads((out / "thinker.json").read_text())["unit_end"] in ("\n", ";")
        capsys.readouterr()
        monkeypatch.setattr(sys, "stdin", io.StringIO("Where is the cat?\n\nThe cat sat in the kitchen.\nIt left.\n"))
        assert main(["think", "--model", str(out), "--max-unit-tokens", "4", "--max-final-tokens", "4"]) == 0
        lines = capsys.readouterr().out.splitlines()
        assert [line.split("]")[0] + "]" for line in lines[:3]] == ["[sentence 1]", "[sentence 2]", "[final]"]
        assert lines[3].startswith("answer")
    assert main(["think", "--model", str(tmp_path / "qwen2"), "--data", str(data), "--batch-size", "2",
                 "--max-unit-tokens", "4", "--max-final-tokens", "4"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert [line.split("\t")[0] for line in lines[:3]] == [f"train.jsonl line {i}" for i in (1, 2, 3)]
    assert lines[3].startswith("accuracy ") and lines[3].endswith("of 3)")


@pytest.mark.parametrize("argv, stdin, rows, message", [
    ([], "Where is the cat?\n", None, "no context"),
    ([], "", None, "no question"),
    (["--depth", "D1"], "q?\nA.\n", None, "--depth and --mode batch apply"),
    (["train", "--data", "DATA", "--out", "OUT"], "", [ROWS[0], {"question": "q?", "answer": "1"}],
     "line 2: the example has no context"),
    (["train", "--data", "DATA", "--out", "OUT"], "", [ROWS[0], {"context": ["a."], "answer": "1"}],
     "line 2: needs an object with fields 'question'"),
    (["train", "--data", "DATA", "--out", "OUT"], "", [{k: v for k, v in ROWS[1].items() if k != "units"}],
     "line 1: no 'units'"),
])
def test_cli_bad_input_is_one_line(fixture_checkpoints, tmp_path, capsys, monkeypatch, argv, stdin, rows, message):
    data = tmp_path / "d.jsonl"
    if rows is not None:
        data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    argv = [a.replace("DATA", str(data)).replace("OUT", str(tmp_path / "o")) for a in argv]
    monkeypatch.setattr(sys, "stdin", io.StringIO(stdin))
    model = ["--model", str(fixture_checkpoints("qwen2"))]
    assert main(["think", *model, *argv] if argv[:1] != ["train"] else ["think", *argv, *model]) == 2
    err = capsys.readouterr().err
    errors = [line for line in err.splitlines() if line.startswith("brisk: error")]
    assert len(errors) == 1 and message in errors[0] and "Traceback" not in err


def test_make_units_keeps_only_examples_the_teacher_answers_correctly(fixture_checkpoints, tmp_path, capsys,
                                                                      monkeypatch):
    import brisklm.streaming.thinker.units as units_module

    def teacher(model, text, prompts, max_new_tokens):  # a stub teacher: right about the cat, wrong about Bob
        if "Reasoning so far" in prompts[0]:
            return ["It went outside.\nAnswer: Garden." if "cat" in prompts[0] else "Answer: Ann"]
        return [f"Note: {p.split(chr(34))[1]}\nmore text" for p in prompts]

    monkeypatch.setattr(units_module, "generate_texts", teacher)
    rows = [{"question": "Where is the cat?", "context": ["The cat sat in the kitchen.", "Then it went out."],
             "answer": "garden"},
            {"question": "Who won?", "context": ["Ann ran fast.", "Bob ran faster."], "answer": "Bob"}, ROWS[2]]
    data, out = tmp_path / "in.jsonl", tmp_path / "out.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    assert main(["think", "make-units", "--teacher", str(fixture_checkpoints("qwen2")), "--data", str(data),
                 "--out", str(out)]) == 0
    assert "kept 2 of 3" in capsys.readouterr().out
    kept = read_thinker_data(out)
    assert [e.question for e in kept] == ["Where is the cat?", "Who won?"]  # Bob's teacher answer was wrong
    assert kept[0].units == ["Note: The cat sat in the kitchen.", "Note: Then it went out."]
    assert kept[0].final == "It went outside." and kept[1].units == ROWS[2]["units"]  # given units pass through


def test_teacher_generation_is_batched_exactly(fixture_checkpoints):
    from brisklm.streaming.thinker.units import generate_texts

    loaded = load(str(fixture_checkpoints("llama3")))
    text = TextLayer.for_model(loaded.model, loaded.tokenizer)
    prompts = ["Where is the cat?", "A much longer prompt about the cat in the kitchen and the garden"]
    assert generate_texts(loaded.model, text, prompts, 5) == [generate_texts(loaded.model, text, [p], 5)[0]
                                                              for p in prompts]


def test_make_units_with_a_random_teacher_is_one_error_line(fixture_checkpoints, tmp_path, capsys):
    data = tmp_path / "in.jsonl"
    data.write_text(json.dumps({"question": "Where is the cat?", "context": ["It sat."], "answer": "mat"}) + "\n")
    assert main(["think", "make-units", "--teacher", str(fixture_checkpoints("gemma2")), "--data", str(data),
                 "--out", str(tmp_path / "o.jsonl"), "--max-unit-tokens", "3", "--max-final-tokens", "3"]) == 2
    errors = [line for line in capsys.readouterr().err.splitlines() if line.startswith("brisk: error")]
    assert len(errors) == 1 and "quality check" in errors[0]
