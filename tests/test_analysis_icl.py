"""The ICL coordinate-system experiment: encoding, batching, CLI errors, and the effects on the icl-lm zoo model."""

import json

import pytest
import torch

from brisklm.analysis.icl import (
    ARBITRARY,
    RECOGNISABLE,
    encode_icl,
    evaluate_condition,
    pir_for_task,
    run_icl_experiment,
)
from brisklm.cli import main
from brisklm.errors import BriskError
from brisklm.tasks.icl import IclTask
from brisklm.tasks.tokenizer import build_word_tokenizer
from brisklm.zoo.architecture import new_model, tiny_llama_config


@pytest.fixture(scope="module")
def tokenizer():
    return build_word_tokenizer(IclTask().vocabulary())


@pytest.fixture(scope="module")
def random_model(tokenizer):
    config = tiny_llama_config(len(tokenizer), "tiny", num_hidden_layers=2)
    return new_model(config, 0).eval()


def test_encode_icl_points_at_labels_and_query(tokenizer):
    examples = IclTask(shots=3, with_similar=True, mislabel_similar=True).examples("test", 5, seed=1)
    batch = encode_icl(tokenizer, examples)
    ids = batch.enc.input_ids
    for i, e in enumerate(examples):
        words = tokenizer.convert_ids_to_tokens(ids[i].tolist())
        assert words[0] == "<bos>"
        assert words[int(batch.label_positions[i])] == e.meta["demo_labels"][-1]
        assert words[int(batch.query_positions[i])] == "->"
        assert int(batch.query_positions[i]) == int(batch.enc.lengths[i]) - 1
        shown = e.meta["demo_labels"][e.meta["similar_index"]]
        assert shown != e.completion  # mislabelled similar demonstration
        assert tokenizer.convert_ids_to_tokens([int(batch.similar_label_ids[i])]) == [shown]
    first = encode_icl(tokenizer, examples, label_index=0)
    assert all(tokenizer.convert_ids_to_tokens([int(ids[i, first.label_positions[i]])])[0] == e.meta["demo_labels"][0]
               for i, e in enumerate(examples))
    with pytest.raises(BriskError, match="label_index"):
        encode_icl(tokenizer, examples, label_index=3)


def test_condition_batched_equals_one_by_one(random_model, tokenizer):
    kw = dict(tasks=RECOGNISABLE + ARBITRARY, shots=3, with_similar=True, n=6, seed=2)
    a = evaluate_condition(random_model, tokenizer, batch_size=6, **kw)
    b = evaluate_condition(random_model, tokenizer, batch_size=1, **kw)
    assert a.accuracy == b.accuracy and a.copy_similar_rate == b.copy_similar_rate
    for mode in a.pir:
        assert torch.equal(a.pir[mode].ranks, b.pir[mode].ranks)


def test_experiment_structure_on_random_model(random_model, tokenizer):
    exp = run_icl_experiment(random_model, tokenizer, n=4, shot_counts=(1, 4))
    rows = exp.quadrant_rows()
    assert [r["quadrant"] for r in rows] == ["Q1", "Q2", "Q3", "Q4", "Q1 mislabelled", "Q4 mislabelled"]
    assert sorted(exp.shots["Q2"]) == [1, 4] and sorted(exp.shots["Q3"]) == [1, 4]
    curves = exp.to_json()["pir_curves"]
    assert len(curves["Q1"]["residual"]) == 2 and len(curves["Q1"]["attn_contrib"]) == 2
    json.dumps(exp.to_json())


def test_bad_inputs_raise(random_model, tokenizer):
    with pytest.raises(BriskError, match="unknown ICL task"):
        pir_for_task(random_model, tokenizer, "trec")
    with pytest.raises(BriskError, match="n and batch_size"):
        evaluate_condition(random_model, tokenizer, RECOGNISABLE, n=0)


def test_cli_user_errors_are_one_line(capsys):
    assert main(["analyze", "icl", "--shot-counts", "0,4"]) == 2
    assert "--shot-counts" in capsys.readouterr().err
    assert main(["analyze", "pir", "--model", "no-such-model", "--task", "sentiment"]) == 2
    assert "neither a zoo model" in capsys.readouterr().err


# ------------------------------------------------------------------ trained zoo model (trained once per session)
@pytest.fixture(scope="module")
def icl_lm():
    from brisklm.zoo.store import load

    return load("icl-lm")


@pytest.fixture(scope="module")
def experiment(icl_lm):
    with torch.no_grad():
        return run_icl_experiment(icl_lm.model, icl_lm.tokenizer, n=128, shot_counts=())


def test_quadrant_accuracies_on_icl_lm(experiment):
    acc = {r["quadrant"]: r for r in experiment.quadrant_rows()}
    # Measured on the seed-0 model (n=128): Q1 1.00, Q2 1.00, Q3 0.43, Q4 0.68, Q4 mislabelled copies 0.79.
    # Thresholds leave room for retraining on another machine (thread counts change the float sums).
    assert acc["Q2"]["accuracy"] >= 0.9  # recognised from the prior, no similar demo needed
    assert acc["Q1"]["accuracy"] >= 0.9
    assert 0.25 <= acc["Q3"]["accuracy"] <= 0.75  # neither: chance between two labels
    assert acc["Q4"]["accuracy"] >= acc["Q3"]["accuracy"] + 0.1  # a same-key demo is copied (partly learned)
    assert acc["Q4 mislabelled"]["copies similar label"] >= 0.6  # copies a wrong label it cannot check
    assert acc["Q1 mislabelled"]["accuracy"] >= 0.8  # recognised task: the prior overrides the wrong label


def test_pir_higher_for_recognisable_tasks(experiment):
    """Measured PIR (residual) Q2 0.268 vs Q3 0.186 (x1.44); attn_contrib 0.926 vs 0.738 (x1.25): higher, not >>."""
    q = experiment.quadrants
    for mode in ("residual", "attn_contrib"):
        rec, arb = q["Q2"].pir_mean(mode), q["Q3"].pir_mean(mode)
        assert rec >= 1.1 * arb, (mode, rec, arb)


def test_cli_pir_and_icl_on_zoo_model(icl_lm, tmp_path, capsys):
    assert main(["analyze", "pir", "--task", "sentiment", "--n", "16", "--json", str(tmp_path / "p.json")]) == 0
    out = capsys.readouterr().out
    assert "PIR[residual]" in out and "PIR[attn_contrib]" in out
    assert set(json.loads((tmp_path / "p.json").read_text())["pir"]) == {"residual", "attn_contrib"}
    assert main(["analyze", "icl", "--n", "8", "--shot-counts", "", "--out", str(tmp_path / "icl")]) == 0
    assert (tmp_path / "icl" / "icl_coordinates.png").stat().st_size > 1000
    assert main(["analyze", "lens", "--prompt", "truly great -> positive ; so sad ->", "-k", "2"]) == 0
    assert "L4:" in capsys.readouterr().out


def test_demo_section_and_bench_registration(icl_lm, tmp_path):
    from brisklm.analysis.demo import demo_sections
    from brisklm.eval.bench import get_benchmark
    from brisklm.eval.report import DemoContext

    sections = demo_sections(DemoContext(out_dir=tmp_path, quick=True))
    assert len(sections) == 1 and "PIR residual" in sections[0].html and "<img" in sections[0].html
    assert (tmp_path / "figures" / "analysis-icl-coordinates.png").exists()
    assert callable(get_benchmark("analysis"))
