"""CLI smoke tests for `brisk vision ...` through brisklm.cli.main (uses the zoo's shapes-llava)."""

from __future__ import annotations

import json

import numpy as np
from PIL import Image

from brisklm.cli import main
from brisklm.tasks.shapes_vqa import render


def _last_json(out: str) -> dict:
    return json.loads([line for line in out.splitlines() if line.startswith("{")][-1])


def test_vision_prune_and_answer(tmp_path, capsys) -> None:
    assert main(["vision", "prune", "--method", "fastv", "--keep", "4", "--n", "32"]) == 0
    shown = _last_json(capsys.readouterr().out)
    assert shown["method"] == "fastv" and 0 <= shown["accuracy"] <= 1 and shown["flops_ratio"] < 1
    assert main(["vision", "prune", "--method", "visipruner", "--n", "32"]) == 0
    assert "mean_fusion_layer" in _last_json(capsys.readouterr().out)
    image = render([{"shape": "circle", "color": "red", "row": 2, "col": 3}], 32)
    path = tmp_path / "scene.png"
    Image.fromarray(image).save(path)
    assert main(["vision", "answer", "--image", str(path), "--question", "what color is the circle ?",
                 "--method", "visipruner"]) == 0
    shown = _last_json(capsys.readouterr().out)
    assert isinstance(shown["answer"], str) and len(shown["visual_tokens_per_layer"]) == 6


def test_vision_cli_errors(tmp_path, capsys) -> None:
    assert main(["vision", "prune", "--method", "nope", "--n", "4"]) == 2
    assert "unknown method" in capsys.readouterr().err
    assert main(["vision", "prune", "--method", "fastv", "--n", "4"]) == 2  # no --keep
    assert "needs a budget" in capsys.readouterr().err
    assert main(["vision", "answer", "--image", str(tmp_path / "missing.png"), "--question", "what ?"]) == 2
    assert "does not exist" in capsys.readouterr().err
    path = tmp_path / "x.png"
    Image.fromarray(np.zeros((32, 32, 3), dtype=np.uint8)).save(path)
    assert main(["vision", "answer", "--image", str(path), "--question", "what is a zebra ?"]) == 2
    assert "unknown word" in capsys.readouterr().err
    assert main(["vision", "train", "--arch", "moe", "--out", str(tmp_path / "m")]) == 2


def test_vision_train_vica_smoke(tmp_path, capsys) -> None:
    out = tmp_path / "vica"
    assert main(["vision", "train", "--arch", "vica", "--out", str(out), "--steps", "2", "--layers", "1,4"]) == 0
    shown = _last_json(capsys.readouterr().out)
    assert shown["vica_layers"] == [1, 4]
    assert main(["vision", "answer", "--model", str(out), "--image", str(_png(tmp_path)), "--question",
                 "is there a red circle ?"]) == 0
    assert _last_json(capsys.readouterr().out)["arch"] == "vica"


def _png(tmp_path):
    path = tmp_path / "s.png"
    Image.fromarray(render([{"shape": "square", "color": "blue", "row": 1, "col": 1}], 32)).save(path)
    return path


def test_vision_eval_on_the_zoo_models(tmp_path, capsys) -> None:
    """The zoo models go through the same eval path (ShapesVQA by default): a scorer that never matched would give 0."""
    out = tmp_path / "eval"
    assert main(["vision", "eval", "--model", "shapes-vica", "--n", "32", "--methods", "vica,fastv", "--budgets", "4",
                 "--out", str(out)]) == 0
    runs = {r["run"]: r for r in json.loads((out / "results.json").read_text())["runs"]}
    assert set(runs) == {"dense", "vica", "fastv@4"}
    assert runs["dense"]["accuracy"] > 0.4 and runs["vica"]["accuracy"] > 0.4  # ~0.67 measured; a broken scorer gives 0
    assert runs["vica"]["flops_ratio"] < runs["fastv@4"]["flops_ratio"] < 1
