"""The zoo: deterministic training, HF save/load round trip, quality records, and clear errors for bad names."""

import json

import pytest
import torch

from brisklm.cli import main
from brisklm.errors import BriskError
from brisklm.zoo import registry, store
from brisklm.zoo.recipes import train_text_recipe
from brisklm.zoo.registry import ZooRecipe

MINI = ZooRecipe(
    name="test-mini-translate",
    description="a 30-step translation model for tests",
    task="translation",
    train=train_text_recipe,
    quality_metric="bleu",
    options=dict(n_train=300, n_test=20, evaluator="bleu", max_new_tokens=30,
                 train=dict(steps=30, batch_size=16, learning_rate=3e-3, log_every=10)),
)


@pytest.fixture
def home(tmp_path, monkeypatch):
    monkeypatch.setenv("BRISK_HOME", str(tmp_path / "home"))
    registry.register(MINI)
    yield tmp_path / "home"
    registry._RECIPES.pop(MINI.name, None)


def test_train_save_reload_and_quality_record(home):
    path = store.train(MINI.name)
    assert path == home / "zoo" / MINI.name
    quality = json.loads((path / "quality.json").read_text())
    assert quality["metric"] == "bleu" and 0.0 <= quality["bleu"] <= 100.0
    assert quality["train_steps"] == 30 and quality["parameters"] > 100_000
    loaded = store.load(str(path))  # a local checkpoint path
    by_name = store.load(MINI.name)  # the same model by zoo name, reloaded from disk (no retraining)
    assert by_name.path == path and loaded.quality == quality
    ids = torch.tensor([[2, 10, 11, 12, 4]])
    with torch.no_grad():
        assert torch.equal(loaded.model(ids).logits, by_name.model(ids).logits)
    assert loaded.tokenizer.convert_ids_to_tokens([0, 2, 3]) == ["<pad>", "<bos>", "<eos>"]


def test_training_is_deterministic_under_a_seed(home):
    a = store.load(str(store.train(MINI.name, seed=0))).model.state_dict()
    b = store.load(str(store.train(MINI.name, seed=0, force=True))).model.state_dict()
    c = store.load(str(store.train(MINI.name, seed=1))).model.state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert any(not torch.equal(a[k], c[k]) for k in a)


def test_missing_path_and_unknown_name_are_clear_errors(home, tmp_path):
    with pytest.raises(BriskError, match="does not exist"):
        store.resolve(str(tmp_path / "no" / "such" / "ckpt"))
    with pytest.raises(BriskError, match="neither a zoo model"):
        store.resolve("definitely-not-a-model")
    (tmp_path / "empty").mkdir()
    with pytest.raises(BriskError, match="no config.json"):
        store.resolve(str(tmp_path / "empty"))
    with pytest.raises(BriskError, match="not trained yet"):
        store.resolve(MINI.name, train_if_missing=False)


def test_cli_prints_one_line_errors(home, capsys):
    assert main(["zoo", "train", "nope"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err == ["brisk: error: no zoo model named 'nope'; known zoo models: " + ", ".join(registry.recipes())]


def test_cli_zoo_list_shows_quality(home, capsys):
    store.train(MINI.name)
    assert main(["zoo", "list"]) == 0
    line = [l for l in capsys.readouterr().out.splitlines() if l.startswith(MINI.name)][0]
    assert "bleu=" in line and "M params" in line


def test_wrong_tokenizer_is_refused(home):
    from brisklm.tasks.tokenizer import build_word_tokenizer
    from brisklm.zoo.store import check_tokenizer_fits

    model = store.load(str(store.train(MINI.name))).model
    big = build_word_tokenizer([f"w{i}" for i in range(500)])
    with pytest.raises(BriskError, match="tokenizer has 505 tokens"):
        check_tokenizer_fits(model, big)


def _record_threads(recipe, out_dir, seed):
    return {"threads": torch.get_num_threads(), "steps": recipe.options["steps"]}


def test_stale_fingerprint_retrains_and_training_uses_every_core(home, monkeypatch):
    import dataclasses
    import os

    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    parent = ZooRecipe("test-fp", "records its options", "translation", _record_threads, "steps", dict(steps=1))
    child = ZooRecipe("test-fp-child", "starts from test-fp", "translation", _record_threads, "steps",
                      dict(steps=1, init_from="test-fp"))
    registry.register(parent)
    registry.register(child)
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        path = store.train(parent.name)
        quality = store.read_quality(path)
        assert quality["fingerprint"] == store.fingerprint(parent.name) and store.is_trained(parent.name)
        assert quality["threads"] == os.cpu_count() and torch.get_num_threads() == 1  # all cores inside, restored after
        child_before = store.fingerprint(child.name)
        registry.register(dataclasses.replace(parent, options=dict(steps=2)))  # the recipe changed
        assert not store.is_trained(parent.name) and store.is_stale(parent.name)
        assert store.fingerprint(child.name) != child_before  # a model fine-tuned from it is stale too
        assert store.read_quality(store.train(parent.name))["steps"] == 2 and store.is_trained(parent.name)
        quality = store.read_quality(path)
        del quality["fingerprint"]  # a record written before fingerprints is never silently reused
        (path / store.QUALITY_FILE).write_text(json.dumps(quality))
        assert store.is_stale(parent.name) and not store.is_trained(parent.name)
    finally:
        torch.set_num_threads(threads)
        registry._RECIPES.pop(parent.name, None)
        registry._RECIPES.pop(child.name, None)
