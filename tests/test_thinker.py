"""StreamingThinker: data layout, session == full masked pass, no re-encoding, depth segments, CLI (random models)."""

import io
import sys

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

from brisklm.cli import main
from brisklm.core import Plan, execute
from brisklm.errors import BriskError
from brisklm.streaming.thinker.data import (DEPTHS, streaming_cot, thinker_batch, thinker_labels, thinker_layout,
                                           thinker_task, thinker_tokenizer)
from brisklm.streaming.thinker.session import ThinkerSession, parse_answer, reference_logits, think, think_depths
from brisklm.streaming.thinker.train import train_thinker
from brisklm.streaming.thinker.cli import sentences
from brisklm.tasks import get_task
from brisklm.tasks.streaming_arithmetic import apply_op
from brisklm.zoo.architecture import new_model, tiny_llama_config
from brisklm.zoo.textlm import TrainOptions

TOL = 1e-4


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def task():
    return thinker_task()


@pytest.fixture(scope="module")
def tok(task):
    return thinker_tokenizer(task)


@pytest.fixture(scope="module")
def model(tok):
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=len(tok), hidden_size=64, intermediate_size=128, num_hidden_layers=3,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
                         initializer_range=0.2)  # large weights: any visibility or position error shows
    return LlamaForCausalLM(config).eval()


def forced_session(model, tok, example, depth, mode="streaming"):
    trace = streaming_cot(example, depth)
    session = ThinkerSession(model, tok, depth, mode=mode, keep_logits=True, forced=trace)
    session.read_question(example.meta["question"])
    for fact in example.meta["facts"]:
        session.read_fact(fact)
    session.finish()
    return trace, session


# ------------------------------------------------------------------------------------------ data
def test_units_skip_distractors_and_question_names_start(task):
    for e in task.examples("train", 40):
        trace = streaming_cot(e, "D1")
        assert trace.question[2] == "from" and trace.question_unit == ["find", e.meta["target"], ";"]
        assert len(trace.units) == len(trace.facts)
        for unit, fact, dis in zip(trace.units, trace.facts, e.meta["distractors"]):
            assert unit[-1] == ";"
            assert (unit == ["skip", ";"]) == dis
            if not dis:
                assert unit[:2] == [fact[0], "="] and unit[-2] == str(e.meta["values"][fact[0]])
                if len(fact) == 6:  # B = A + 4 . -> B = 3 + 4 = 7 ;
                    left = e.meta["values"][fact[2]]
                    assert unit[2:5] == [str(left), fact[3], fact[4]]
                    assert apply_op(left, fact[3], int(fact[4]), 10) == int(unit[-2])
        # relevance is decidable online: the first kept fact is the start named in the question
        first_kept = next(f for f, d in zip(trace.facts, e.meta["distractors"]) if not d)
        assert first_kept[0] == trace.question[3]


def test_depth_final_segments(task):
    for e in task.examples("train", 30, seed=3):
        answer, target = e.answer, e.meta["target"]
        kept = [w for u in e.meta["units"] if u != "skip" for w in u.split()]
        d1, d2, d3 = (streaming_cot(e, d).final for d in DEPTHS)
        assert d1 == ["D1", "answer", answer]
        assert d2 == ["D2", "combine", *kept, ";", "answer", answer]
        assert d3[1:len(d2) - 2] == d2[1:-2] and d3[-2:] == ["answer", answer] and d3[0] == "D3"
        check = d3[len(d2) - 2:-2]  # check C = 7 * 2 = 4 ;
        assert check[:3] == ["check", target, "="] and check[-2:] == [answer, ";"]
        rhs = check[3:-3]
        value = int(rhs[0]) if len(rhs) == 1 else apply_op(int(rhs[0]), rhs[1], int(rhs[2]), 10)
        assert str(value) == answer
        assert len(d1) < len(d2) < len(d3)


def test_bad_depth_and_task_without_start_are_refused(task):
    e = task.examples("train", 1)[0]
    with pytest.raises(BriskError, match="depth"):
        streaming_cot(e, "D4")
    plain = get_task("streaming_arithmetic").examples("train", 1)[0]
    with pytest.raises(BriskError, match="name_start"):
        streaming_cot(plain, "D1")


def test_layout_mask_positions_and_labels(task, tok):
    e = task.examples("train", 1, seed=5)[0]
    trace = streaming_cot(e, "D2")
    layout = thinker_layout(tok, trace)
    n = len(trace.facts)
    assert len(layout.source) == n + 2 and len(layout.target) == n + 2
    batch = thinker_batch([layout], tok.pad_token_id, "streaming")
    s = len(layout.source_ids)
    vis, pos = batch["visibility"][0], batch["position_ids"][0]
    assert pos[:s].tolist() == list(range(s)) and pos[s:].tolist() == list(range(len(layout.target_ids)))
    seg_ends = torch.tensor([len(x) for x in layout.source]).cumsum(0).tolist()
    row = s
    for j, seg in enumerate(layout.target):
        for i in range(len(seg)):
            sees = n + 1 if j == n + 1 else (j + 1 if i == len(seg) - 1 else j)  # one-row shift on the last row
            assert vis[row, :s].sum().item() == seg_ends[sees], (j, i)
            row += 1
    assert not vis[:s, s:].any()
    labels = thinker_labels(layout)
    final_start = s + sum(len(x) for x in layout.target[:-1])
    assert labels[s] == -100 and labels[final_start] == -100 and labels[s + 1] == layout.input_ids[s + 1]
    assert sum(label != -100 for label in labels) == len(layout.target_ids) - 2
    full = thinker_batch([layout], tok.pad_token_id, "batch")
    assert full["visibility"][0].equal(torch.ones(s + len(layout.target_ids), s + len(layout.target_ids)).tril().bool())
    assert full["position_ids"][0].tolist() == list(range(len(layout.input_ids)))


# ------------------------------------------------------------------------------------------ session
@pytest.mark.parametrize("depth", DEPTHS)
def test_session_equals_full_masked_pass(model, tok, task, depth):
    for e in task.examples("test", 3, seed=1):
        trace, session = forced_session(model, tok, e, depth)
        got = torch.stack(session.logits)
        ref = reference_logits(model, tok, trace, "streaming")
        assert got.shape == ref.shape
        assert (got - ref).abs().max() < TOL
        # negative control: a plain causal pass (batch layout) is a different computation
        assert (got - reference_logits(model, tok, trace, "batch")).abs().max() > 1e-2


def test_negative_control_contiguous_positions_differ(model, tok, task):
    e = task.examples("test", 1, seed=2)[0]
    trace, session = forced_session(model, tok, e, "D2")
    layout = thinker_layout(tok, trace)
    batch = thinker_batch([layout], tok.pad_token_id, "streaming")
    from brisklm.core import MatrixVisibility

    s, t = len(layout.source_ids), len(layout.target_ids)
    plan = Plan(position_ids=torch.arange(s + t)[None], visibility=MatrixVisibility(batch["visibility"]))
    wrong = execute(model, batch["input_ids"], plan=plan).logits[0, s:s + t - 1]
    assert (torch.stack(session.logits) - wrong).abs().max() > 1e-2  # same mask, batch positions: not the same


def test_batch_session_equals_causal_pass(model, tok, task):
    e = task.examples("test", 1, seed=4)[0]
    trace, session = forced_session(model, tok, e, "D3", mode="batch")
    assert (torch.stack(session.logits) - reference_logits(model, tok, trace, "batch")).abs().max() < TOL


def test_input_is_never_reencoded(model, tok, task):
    e = task.examples("test", 1, seed=6)[0]
    trace, session = forced_session(model, tok, e, "D2")
    layout = thinker_layout(tok, trace)
    assert session.input_tokens_forwarded == len(layout.source_ids)
    assert session.reasoning_tokens_forwarded == len(layout.target_ids) - 1  # all but the final <eos>
    assert session.input_cache.get_seq_length(0) == len(layout.source_ids)
    assert session.reasoning_cache.get_seq_length(0) == len(layout.target_ids) - 1
    reads = [ev.tokens for ev in session.events if ev.kind == "read"]
    assert reads == [len(seg) for seg in layout.source]  # each input segment forwarded exactly once, in order


def test_reasoning_starts_as_soon_as_a_fact_arrives(model, tok, task):
    e = task.examples("test", 1, seed=7)[0]
    session = ThinkerSession(model, tok, "D1")
    first = session.read_question(e.meta["question"])
    assert len(first) == 1 and first[0].endswith(";")
    assert [ev.kind for ev in session.events][0] == "read" and session.events[1].kind == "write"
    for j, fact in enumerate(e.meta["facts"], start=1):
        before = len(session.events)
        units = session.read_fact(fact)
        assert len(units) == 1 and units[0].split()[-1] == ";"
        new = session.events[before:]
        assert new[0].kind == "read" and new[0].segment == j and all(ev.kind == "write" for ev in new[1:])
        assert len(new) >= 2  # reasoning on fact j happened before fact j+1 is read
    final, answer = session.finish()
    assert final.split()[0] == "D1" and session.result().answer == answer
    batch = ThinkerSession(model, tok, "D1", mode="batch")
    assert batch.read_question(e.meta["question"]) == [] and batch.read_fact(e.meta["facts"][0]) == []
    assert all(ev.kind == "read" for ev in batch.events)  # the baseline waits for the whole input


def test_session_errors_are_clear(model, tok, task):
    session = ThinkerSession(model, tok, "D2")
    with pytest.raises(BriskError, match="read_question"):
        session.read_fact("A = 3 .")
    with pytest.raises(BriskError, match="read_question"):
        session.finish()
    session.read_question("Q: C from A ?")
    with pytest.raises(BriskError, match="unknown word"):
        session.read_fact("A = banana .")
    session.finish()
    with pytest.raises(BriskError, match="finished"):
        session.read_fact("A = 3 .")
    with pytest.raises(BriskError, match="depth"):
        ThinkerSession(model, tok, "D9")
    other = get_task("streaming_arithmetic")
    from brisklm.tasks.tokenizer import build_word_tokenizer

    with pytest.raises(BriskError, match="thinker words"):
        ThinkerSession(model, build_word_tokenizer(other.vocabulary()), "D1")


def test_fork_per_depth_equals_fresh_sessions(model, tok, task):
    e = task.examples("test", 1, seed=8)[0]
    forked = think_depths(model, tok, e, DEPTHS, max_final_tokens=12)
    for depth in DEPTHS:
        fresh = think(model, tok, e, depth, max_final_tokens=12)
        assert forked[depth].units == fresh.units and forked[depth].final == fresh.final
        assert forked[depth].final.split()[0] == depth
        assert forked[depth].reasoning_tokens_forwarded == fresh.reasoning_tokens_forwarded


def test_parse_answer():
    assert parse_answer("D2 combine A = 3 ; answer 7".split()) == "7"
    assert parse_answer("D1 answer".split()) == "" and parse_answer([]) == ""


def test_training_lowers_the_streaming_loss(task, tok, tmp_path):
    from brisklm.streaming.train import streaming_loss
    from brisklm.streaming.thinker.data import ThinkerCollator

    config = tiny_llama_config(len(tok), pad_token_id=tok.pad_token_id, bos_token_id=tok.bos_token_id,
                               eos_token_id=tok.eos_token_id, hidden_size=64, num_hidden_layers=2, intermediate_size=128)
    model = new_model(config, 0)
    examples = task.examples("train", 64)
    probe = ThinkerCollator(tok, "streaming", seed=1)([dict(e.meta) for e in examples[:16]])
    with torch.no_grad():
        before = float(streaming_loss(model, probe))
    stats = train_thinker(model, tok, examples, TrainOptions(steps=30, batch_size=16, learning_rate=3e-3, log_every=100),
                          str(tmp_path))
    with torch.no_grad():
        after = float(streaming_loss(model, probe))
    assert stats["train_loss"] > 0 and after < 0.7 * before


# ------------------------------------------------------------------------------------------ CLI
@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory, tok):
    config = tiny_llama_config(len(tok), pad_token_id=tok.pad_token_id, bos_token_id=tok.bos_token_id,
                               eos_token_id=tok.eos_token_id, hidden_size=32, num_hidden_layers=2, intermediate_size=64)
    path = tmp_path_factory.mktemp("thinker-ckpt")
    new_model(config, 0).save_pretrained(path)
    tok.save_pretrained(path)
    return path


def test_sentences_split_question_then_facts():
    assert list(sentences(["Q: C from A ?  A = 3 .", "", "B = A + 4 . C = B * 2 ."])) == [
        "Q: C from A ?", "A = 3 .", "B = A + 4 .", "C = B * 2 ."]
    with pytest.raises(BriskError, match="does not end"):
        list(sentences(["Q: C from A ?", "A = 3"]))


def test_think_cli_prints_units_as_they_come(checkpoint, capsys, monkeypatch):
    monkeypatch.setattr(sys, "stdin", io.StringIO("Q: C from A ?\nA = 3 .\nE = 4 .\nC = A * 2 .\n"))
    assert main(["think", "--model", str(checkpoint), "--depth", "D1"]) == 0
    lines = [line for line in capsys.readouterr().out.splitlines() if line]
    labels = [line.split("]")[0] + "]" for line in lines[:-1]]
    assert labels == ["[question]", "[fact 1]", "[fact 2]", "[fact 3]", "[final D1]"]
    assert all(line.endswith(";") for line in lines[:4])
    assert lines[-1].startswith("answer") and lines[-2].split("] ")[1].split()[0] == "D1"


@pytest.mark.parametrize("argv, stdin, message", [
    (["--depth", "D7"], "Q: C from A ?\n", "depth"),
    ([], "Q: C from A ?\nA = blorp .\n", "unknown word"),
    ([], "", "no question"),
    ([], "Q: C from A ?\nA = 3\n", "does not end"),
])
def test_think_cli_bad_input_is_one_line(checkpoint, capsys, monkeypatch, argv, stdin, message):
    monkeypatch.setattr(sys, "stdin", io.StringIO(stdin))
    assert main(["think", "--model", str(checkpoint), *argv]) == 2
    err = capsys.readouterr().err
    errors = [line for line in err.splitlines() if line.startswith("brisk: error")]
    assert len(errors) == 1 and message in errors[0] and "Traceback" not in err


def test_think_runs_a_whole_example(model, tok, task):
    e = task.examples("test", 1)[0]
    result = think(model, tok, e, "D3", max_unit_tokens=5, max_final_tokens=10)
    assert len(result.units) == len(e.meta["facts"]) + 1
    assert all(len(u.split()) <= 6 for u in result.units)  # capped units are closed with ';'
