"""`brisk stream train --data`: your own parallel corpus (JSONL or TSV) on any checkpoint; bad lines named."""

import json

import pytest
import torch
from safetensors.torch import load_file

from brisklm.cli import main
from brisklm.errors import BriskError
from brisklm.streaming.data import read_parallel

PAIRS = [("the quick brown fox", "der schnelle braune Fuchs"), ("hello world", "hallo Welt"),
         ("streaming models read while writing", "Modelle lesen beim Schreiben")]

pytestmark = pytest.mark.usefixtures("one_thread")


def write_jsonl(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def test_read_parallel_jsonl_and_tsv(tmp_path):
    jsonl = write_jsonl(tmp_path / "d.jsonl", [{"source": s, "target": t} for s, t in PAIRS])
    tsv = tmp_path / "d.tsv"
    tsv.write_text("".join(f"{s}\t{t}\n" for s, t in PAIRS) + "\n")
    for path in (jsonl, tsv):
        examples = read_parallel(path)
        assert [e.meta["source_words"] for e in examples] == [s.split() for s, _ in PAIRS]
        assert [e.meta["target_words"] for e in examples] == [t.split() for _, t in PAIRS]


@pytest.mark.parametrize("name, text, message", [
    ("a.jsonl", '{"source": "a b", "target": "c"}\n{"source": "x"}\n', "a.jsonl line 2: needs an object"),
    ("b.jsonl", '{"source": "a", "target": "b"}\n\n{oops\n', "b.jsonl line 3: not valid JSON"),
    ("c.jsonl", '{"source": "  ", "target": "b"}\n', "c.jsonl line 1: the source is empty"),
    ("d.jsonl", '{"source": "a", "target": 3}\n', "d.jsonl line 1: field 'target' must be a string"),
    ("e.tsv", "a\tb\nno tab here\n", "e.tsv line 2: needs exactly one tab"),
    ("f.csv", "a,b\n", "unknown format .csv"),
    ("g.jsonl", "\n\n", "has no source/target pairs"),
])
def test_bad_lines_are_named(tmp_path, name, text, message):
    path = tmp_path / name
    path.write_text(text)
    with pytest.raises(BriskError, match=message):
        read_parallel(path)


@pytest.mark.parametrize("style, framing", [("qwen2", ["--no-chat-template"]),
                                            ("llama3", ["--instruction", "Translate:"])])
def test_train_on_your_data_then_translate(fixture_checkpoints, tmp_path, capsys, style, framing):
    data = write_jsonl(tmp_path / "d.jsonl", [{"source": s, "target": t} for s, t in PAIRS])
    out = tmp_path / "gpe"
    before = load_file(str(fixture_checkpoints(style) / "model.safetensors"))
    assert main(["stream", "train", "--model", str(fixture_checkpoints(style)), "--data", str(data), "--steps", "2",
                 "--batch-size", "2", "--lr", "1e-2", "--out", str(out), *framing]) == 0
    after = load_file(str(out / "model.safetensors"))
    assert any(not torch.equal(before[name], after[name]) for name in before)  # it trained
    assert "3 pairs of d.jsonl" in capsys.readouterr().out
    assert main(["stream", "translate", "--model", str(out), "--k", "2", "--max-words", "3",
                 "--text", "hello world", *framing]) == 0
    lines = [line for line in capsys.readouterr().out.splitlines() if "\tdelay=" in line]
    assert 1 <= len(lines) <= 3 and all(1 <= int(line.rsplit("=", 1)[1]) <= 2 for line in lines)


def test_unencodable_training_word_names_its_pair(fixture_checkpoints, tmp_path, capsys):
    data = write_jsonl(tmp_path / "d.jsonl", [{"source": "hello world", "target": "hallo"},
                                              {"source": "fine", "target": "日本"}])
    assert main(["stream", "train", "--model", str(fixture_checkpoints("mistral")), "--data", str(data),
                 "--steps", "1", "--out", str(tmp_path / "o")]) == 2
    err = capsys.readouterr().err
    assert "d.jsonl line 2" in err and "cannot encode" in err and "Traceback" not in err


def test_every_bad_training_line_is_reported_and_nothing_trained(fixture_checkpoints, tmp_path, capsys):
    data = write_jsonl(tmp_path / "d.jsonl", [{"source": "hello world", "target": "hallo"}, {"source": "x"},
                                              {"source": "fine", "target": "gut"}, {"source": " ", "target": "a"}])
    out = tmp_path / "o"
    assert main(["stream", "train", "--model", str(fixture_checkpoints("qwen2")), "--data", str(data),
                 "--steps", "1", "--out", str(out)]) == 2
    err = capsys.readouterr().err
    errors = [line for line in err.splitlines() if line.startswith("brisk: error")]
    assert len(errors) == 2 and "d.jsonl line 2: needs an object" in errors[0] and "Traceback" not in err
    assert "d.jsonl line 4: the source is empty" in errors[1] and "2 bad line(s)" in errors[1]
    assert not out.exists()
