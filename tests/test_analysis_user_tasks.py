"""Analysis on user tasks and real-convention checkpoints: the tasks file, prompt building, whole-label scoring of
multi-token labels, positions on subword tokenizers, the readable logit lens, and `brisk analyze pir|icl|lens` end
to end on qwen2 (no BOS), llama3 (no pad, two eos), gemma2 and phi3 fixtures."""

from __future__ import annotations

import json

import pytest
import torch

from brisklm.errors import BriskError
from brisklm.analysis.user_tasks import label_log_probs, load_tasks, pick_task, task_examples

from conftest import run_cli

STYLES = ("qwen2", "llama3", "gemma2", "phi3")
POS = ["a great film", "truly lovely day", "happy ending", "nice work", "wonderful music", "fine weather"]
NEG = ["an awful film", "very sad news", "boring talk", "poor service", "ugly weather", "bad luck"]


def _tasks(labels=("positive", "negative"), second=("animal kingdom", "fruit")):
    animals, fruit = ["the cat", "a dog", "one horse", "a bird"], ["an apple", "a pear", "some grapes", "a lemon"]
    return [
        {"name": "sentiment", "task_word": "sentiment", "labels": list(labels), "recognisable": True,
         "examples": [{"input": x, "label": labels[0]} for x in POS] + [{"input": x, "label": labels[1]} for x in NEG]},
        {"name": "things", "task_word": "category", "labels": list(second), "recognisable": True,
         "examples": [{"input": x, "label": second[0]} for x in animals] + [{"input": x, "label": second[1]} for x in fruit]},
        {"name": "arbitrary", "task_word": "sentiment", "labels": ["foo", "bar"], "recognisable": False,
         "examples": [{"input": x, "label": "foo" if i % 2 else "bar"} for i, x in enumerate(POS + NEG)]},
    ]


def _file(tmp_path, data, name="t.json") -> str:
    path = tmp_path / name
    path.write_text(json.dumps(data) if not isinstance(data, str) else data)
    return str(path)


def _loaded(path):
    from brisklm.zoo.store import load

    return load(str(path), device="cpu")


def test_tasks_file_is_checked(tmp_path):
    tasks = load_tasks(_file(tmp_path, _tasks()))
    assert [t.name for t in tasks] == ["sentiment", "things", "arbitrary"]
    assert tasks[1].labels == ("animal kingdom", "fruit") and tasks[1].max_shots == 7 and not tasks[2].recognisable
    assert pick_task(tasks, "things") is tasks[1]
    bad = [
        (_tasks(labels=("positive", " ")), "label word is empty"),
        (_tasks(labels=("positive", "positive")), "identical"),
        (_tasks(second=("fruit", " fruit ")), "identical"),
        ([{**_tasks()[0], "task_word": "two words"}], "task_word must be one word"),
        ([{**_tasks()[0], "examples": [{"input": "x", "label": "neutral"}, {"input": "y", "label": "positive"}]}],
         "not in labels"),
        ([{**_tasks()[0], "labels": ["positive"]}], "at least two"),
        ([{"name": "x"}], "lacks task_word"),
        (_tasks() + _tasks()[:1], "unique"),
        ("[{", "not valid JSON"),
        ([], "non-empty JSON list"),
    ]
    for data, message in bad:
        with pytest.raises(BriskError, match=message):
            load_tasks(_file(tmp_path, data))
    with pytest.raises(BriskError, match="choose one with --task"):
        pick_task(tasks, None)
    with pytest.raises(BriskError, match="no task 'colour'"):
        pick_task(tasks, "colour")


def test_prompts_point_at_labels_and_query(tmp_path):
    task = load_tasks(_file(tmp_path, _tasks()))[1]
    for e in task_examples([task], 20, shots=3, with_similar=True, mislabel_similar=True, seed=1):
        words = e.prompt.split()
        assert words[e.meta["query_position"]] == "->" and e.meta["query_position"] == len(words) - 1
        for pos, label in zip(e.meta["label_positions"], e.meta["demo_labels"]):
            assert words[pos] == label.split()[-1] and words[pos + 1] == ";"  # the label's last word
        i = e.meta["similar_index"]
        query_input = " ".join(words[e.meta["label_positions"][-1] + 2:-1])
        similar_input_end = e.meta["label_positions"][i] - len(e.meta["demo_labels"][i].split())  # the arrow
        assert " ".join(words[:similar_input_end]).endswith(query_input)
        assert e.meta["demo_labels"][i] != e.meta["label"]  # mislabelled: another label of the task
    with pytest.raises(BriskError, match="needs 9 examples"):
        task_examples([task], 4, shots=8)


def test_whole_label_scores_are_the_sum_of_token_log_probs(fixture_checkpoints):
    from brisklm.core.text import TextLayer

    loaded = _loaded(fixture_checkpoints("qwen2"))
    text = TextLayer.for_model(loaded.model, loaded.tokenizer, chat_template=False)
    prompt = text.encode("a great film -> positive ; an awful film ->")
    labels = ["animal kingdom", "positive", "fruit"]
    scores = label_log_probs(loaded.model, text, [prompt, prompt[:-3]], [labels, labels[:1]], batch_size=2)
    pieces = [text.encode(label, at_start=False) for label in labels]
    assert len(pieces[0]) >= 2  # a multi-token label: a first-token score would differ from the whole-label one
    for row, row_labels, got in ((prompt, labels, scores[0]), (prompt[:-3], labels[:1], scores[1])):
        for label, value in zip(row_labels, got):
            ids = text.encode(label, at_start=False)
            with torch.no_grad():
                logits = loaded.model(input_ids=torch.tensor([row + ids])).logits[0].float()
            logp = torch.log_softmax(logits, -1)
            expected = sum(float(logp[len(row) - 1 + k, t]) for k, t in enumerate(ids))
            assert value == pytest.approx(expected, abs=1e-4)
    with torch.no_grad():
        first_only = float(torch.log_softmax(loaded.model(input_ids=torch.tensor([prompt])).logits[0, -1].float(), -1)
                           [pieces[0][0]])
    assert scores[0][0] < first_only - 1e-3  # later tokens count too


def test_predictions_follow_whole_label_scores_when_labels_share_a_first_token(fixture_checkpoints, tmp_path):
    from brisklm.analysis.icl import encode_icl, evaluate_condition
    from brisklm.core.text import as_text_layer

    loaded = _loaded(fixture_checkpoints("llama3"))
    text = as_text_layer(loaded.tokenizer)
    labels = ("animal kingdom", "animal farm")  # same first word, so the same first token
    assert text.first_token("animal") == text.encode("animal farm", at_start=False)[0]
    tasks = load_tasks(_file(tmp_path, [{**_tasks(second=labels)[1]}]))
    result = evaluate_condition(loaded.model, loaded.tokenizer, tasks, shots=3, n=12, seed=3, batch_size=5, modes=())
    examples = task_examples(tasks, 12, shots=3, seed=3)
    batch = encode_icl(loaded.tokenizer, examples)
    rows = [batch.enc.input_ids[i, :int(batch.enc.lengths[i])].tolist() for i in range(12)]
    scores = label_log_probs(loaded.model, text, rows, [list(labels)] * 12)
    expected = [labels[0] if a >= b else labels[1] for a, b in scores]
    assert expected != [labels[0]] * 12  # first-token scoring ties on every prompt (and would pick labels[0])
    assert result.accuracy == pytest.approx(sum(p == e.meta["label"] for p, e in zip(expected, examples)) / 12)
    assert result.first_label_rate == pytest.approx(
        sum(p == e.meta["demo_labels"][0] for p, e in zip(expected, examples)) / 12)


def test_label_positions_are_the_last_token_of_each_label_on_a_subword_tokenizer(fixture_checkpoints, tmp_path):
    from brisklm.analysis.icl import encode_icl
    from brisklm.core.text import as_text_layer

    loaded = _loaded(fixture_checkpoints("gemma2"))
    text = as_text_layer(loaded.tokenizer)
    tasks = load_tasks(_file(tmp_path, _tasks()))
    examples = task_examples(tasks[1:2], 6, shots=2, seed=0)
    batch = encode_icl(loaded.tokenizer, examples, label_index=0)
    for i, e in enumerate(examples):
        label_ids = text.encode(e.meta["demo_labels"][0], at_start=False)
        pos = int(batch.label_positions[i])
        assert batch.enc.input_ids[i, pos - len(label_ids) + 1:pos + 1].tolist() == label_ids
        assert int(batch.task_ids[i]) == text.first_token("category")


def test_lens_shows_readable_subword_tokens(fixture_checkpoints, capsys):
    from brisklm.cli import main

    for style in ("qwen2", "mistral"):
        assert main(["analyze", "lens", "--model", str(fixture_checkpoints(style)), "--prompt", "The quick brown fox",
                     "--no-chat-template", "-k", "3", "--device", "cpu", "--tokens"]) == 0
        out = capsys.readouterr().out
        tokens = out.splitlines()[0]
        assert "␣quick" in tokens and "␣brown" in tokens and "Ġ" not in out and "▁" not in out, out
        assert len([line for line in out.splitlines() if line.strip().startswith("L")]) == 3


# ---- CLI end to end ---------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def tasks_file(tmp_path_factory):
    return _file(tmp_path_factory.mktemp("analysis-tasks"), _tasks())


@pytest.mark.parametrize("style", STYLES)
def test_cli_pir_icl_lens_on_user_tasks(style, fixture_checkpoints, tasks_file, capsys, tmp_path):
    model = str(fixture_checkpoints(style))
    out = run_cli(["analyze", "pir", "--model", model, "--tasks", tasks_file, "--task", "things", "--n", "6",
                "--shots", "3", "--device", "cpu", "--json", str(tmp_path / "pir.json")], capsys)
    assert "task things: 6 prompts, 3 shots" in out and "PIR[residual]" in out and "PIR[attn_contrib]" in out
    assert json.loads((tmp_path / "pir.json").read_text())["task"] == "things"
    out = run_cli(["analyze", "icl", "--model", model, "--tasks", tasks_file, "--n", "4", "--shots", "3",
                "--shot-counts", "1,8", "--device", "cpu", "--out", str(tmp_path / "icl")], capsys)
    figures = json.loads((tmp_path / "icl" / "icl.json").read_text())
    assert [r["quadrant"] for r in figures["quadrants"]][:4] == ["Q1", "Q2", "Q3", "Q4"]
    assert {(r["quadrant"], r["shots"]) for r in figures["shots"]} == {("Q2", 1), ("Q3", 1), ("Q3", 8)}  # 8 > things' 7
    out = run_cli(["analyze", "lens", "--model", model, "--prompt", "a great film -> positive ; boring talk ->",
                "--device", "cpu"], capsys)
    assert [line.split(":")[0].strip() for line in out.splitlines()] == ["emb", "L1", "L2", "L3"]
    assert "Ġ" not in out and "▁" not in out


@pytest.mark.parametrize("argv, message", [
    (["pir", "--tasks", "EMPTY"], "label word is empty"),
    (["icl", "--tasks", "SAME"], "identical"),
    (["pir", "--tasks", "GOOD"], "choose one with --task"),
    (["pir", "--tasks", "GOOD", "--task", "things", "--shots", "8"], "needs 9 examples"),
    (["pir"], "choose a task"),
])
def test_cli_bad_tasks_are_one_line(argv, message, fixture_checkpoints, tasks_file, tmp_path, capsys):
    from brisklm.cli import main

    files = {"EMPTY": _file(tmp_path, _tasks(labels=("positive", "")), "e.json"),
             "SAME": _file(tmp_path, _tasks(labels=("positive", "positive")), "s.json"), "GOOD": tasks_file}
    argv = [files.get(a, a) for a in argv]
    assert main(["analyze", *argv, "--model", str(fixture_checkpoints("qwen2")), "--device", "cpu"]) == 2
    err = capsys.readouterr().err
    assert message in err and err.count("\n") == 1 and "Traceback" not in err
