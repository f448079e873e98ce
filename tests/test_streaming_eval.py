"""`brisk stream eval`: SimulEval-format instances.log + scores.json on every fixture family, the word-by-word
stepper equal to the batch decoders, scores equal to SimulEval's formulas (and to SimulEval itself when it is
importable), and bad input reported one line each without losing the other lines."""

import json
import sys
from pathlib import Path

import pytest

from brisklm.cli import main
from brisklm.core.text import TextLayer
from brisklm.streaming.policies import gpe_wait_k
from brisklm.streaming.stepper import PolicySpec, run_stream
from brisklm.testing.checkpoints import FIXTURE_STYLES
from brisklm.tasks.tokenizer import build_word_tokenizer
from brisklm.tasks.translation import TranslationTask
from brisklm.zoo.architecture import new_model, tiny_llama_config

pytestmark = pytest.mark.usefixtures("one_thread")

# `make install` puts the pinned simuleval beside the environment (pip --no-deps --target): its tqdm==4.64.1 pin
# conflicts with datasets, so it cannot be a dependency. Appended, so every package it would pin stays ours.
SIMULEVAL_PACKAGES = Path(sys.prefix) / "simuleval-pkgs"
if SIMULEVAL_PACKAGES.is_dir() and str(SIMULEVAL_PACKAGES) not in sys.path:
    sys.path.append(str(SIMULEVAL_PACKAGES))

PAIRS = [("the quick brown fox", "der schnelle braune Fuchs"), ("hello world", "hallo Welt")]
FIELDS = {"index", "prediction", "delays", "elapsed", "prediction_length", "reference", "source", "source_length"}


@pytest.fixture(scope="module")
def word_checkpoint(tmp_path_factory):
    """A tiny word-level (zoo-style) checkpoint without a chat template."""
    tok = build_word_tokenizer(TranslationTask().vocabulary())
    config = tiny_llama_config(len(tok), pad_token_id=tok.pad_token_id, bos_token_id=tok.bos_token_id,
                               eos_token_id=tok.eos_token_id, hidden_size=32, num_hidden_layers=2,
                               intermediate_size=64)
    path = tmp_path_factory.mktemp("word-ckpt")
    new_model(config, 0).save_pretrained(path)
    tok.save_pretrained(path)
    return path


def write_jsonl(path, rows):
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows))
    return path


def load(path):
    from brisklm.zoo.store import load as zoo_load

    loaded = zoo_load(str(path))
    return loaded.model, TextLayer.for_model(loaded.model, loaded.tokenizer)


# ---------------------------------------------------------------------------------- SimulEval's formulas, again
def simuleval_reference(records):
    """SimulEval's documented scores, re-derived independently (numpy) from its docs: AL/LAAL average
    D_i - (i-1)|X|/|Y| up to the first D_i >= |X| (|Y| = reference words; LAAL max(|Y|, |Y*|)), DAL with
    D'_i = max(D_i, D'_{i-1} + |X|/|Y*|), AP = sum D / (|X||Y|); sentences without output are skipped."""
    import numpy as np
    import sacrebleu

    out = {"BLEU": sacrebleu.corpus_bleu([r["prediction"] for r in records],
                                         [[r["reference"] for r in records]], tokenize="13a").score}
    for suffix, key in (("", "delays"), ("_CA", "elapsed")):
        rows = {m: [] for m in ("AL", "LAAL", "DAL", "AP")}
        for r in records:
            d = np.asarray(r[key], dtype=float)
            if not len(d):
                continue
            x, y, hyp = float(r["source_length"]), float(len(r["reference"].split(" "))), float(len(d))
            stop = int(np.argmax(d >= x)) + 1 if (d >= x).any() else len(d)
            steps = np.arange(len(d))
            for name, ylen in (("AL", y), ("LAAL", max(y, hyp))):
                rows[name].append(d[0] if d[0] > x else float(np.mean(d[:stop] - steps[:stop] * x / ylen)))
            lifted = np.maximum.accumulate(d - steps * x / hyp) + steps * x / hyp
            rows["DAL"].append(float(np.mean(lifted - steps * x / hyp)))
            rows["AP"].append(float(d.sum() / (x * y)))
        out.update({m + suffix: float(np.mean(v)) for m, v in rows.items()})
    return out


def test_reference_formulas_on_known_cases():
    """The test's own formulas on hand-worked sentences (so the equality tests below compare two right things)."""
    wait2 = {"prediction": "a b c d", "reference": "a b c d", "source_length": 4, "delays": [2, 3, 4, 4],
             "elapsed": [2, 3, 4, 4]}
    scores = simuleval_reference([wait2])
    assert scores["AL"] == pytest.approx(2.0) and scores["LAAL"] == pytest.approx(2.0)
    assert scores["AP"] == pytest.approx(13 / 16) and scores["DAL"] == pytest.approx((2 + 2 + 2 + 2) / 4)
    offline = dict(wait2, delays=[4, 4, 4, 4], elapsed=[4, 4, 4, 4])
    assert simuleval_reference([offline])["AL"] == pytest.approx(4.0)
    assert simuleval_reference([offline])["DAL"] == pytest.approx((4 + 4 + 4 + 4) / 4)


# ---------------------------------------------------------------------------------- the stepper
@pytest.mark.parametrize("k", [1, 3])
def test_stepper_equals_batch_wait_k_on_a_subword_fixture(fixture_checkpoints, k):
    model, text = load(fixture_checkpoints("qwen2"))
    sources = [s.split() for s, _ in PAIRS]
    batch = gpe_wait_k(model, text, sources, k).outputs
    for source, expected in zip(sources, batch):
        stepper = run_stream(model, text, PolicySpec("wait-k", k), source)
        assert (stepper.output.words, stepper.output.delays) == (expected.words, expected.delays)
        assert len(stepper.times) == len(expected.words) and stepper.times == sorted(stepper.times)


@pytest.mark.parametrize("head, threshold", [("entropy", 10.0), ("attention", 0.3)])
def test_stepper_equals_adaptive_decode(word_checkpoint, head, threshold):
    from brisklm.streaming.proactive.heads import adaptive_decode, make_head

    model, text = load(word_checkpoint)
    sources = [s.split() for s in ("kel ama mibo sefa", "ama mibo kel")]
    rule = make_head(head)
    batch = adaptive_decode(model, text.tokenizer, sources, rule, threshold).outputs
    for source, expected in zip(sources, batch):
        stepper = run_stream(model, text, PolicySpec(head, threshold=threshold), source, head=rule)
        assert (stepper.output.words, stepper.output.delays) == (expected.words, expected.delays)
    assert any(len(set(o.delays)) > 1 for o in batch)  # the head wrote before the end of some source


# ---------------------------------------------------------------------------------- brisk stream eval
@pytest.mark.parametrize("style", FIXTURE_STYLES)
def test_eval_writes_simuleval_files_on_every_family(fixture_checkpoints, tmp_path, capsys, style):
    data = write_jsonl(tmp_path / "test.jsonl", [{"source": s, "target": t} for s, t in PAIRS])
    out = tmp_path / "eval"
    assert main(["stream", "eval", "--model", str(fixture_checkpoints(style)), "--data", str(data), "--k", "2",
                 "--out", str(out)]) == 0
    assert "2 sentences of test.jsonl: BLEU=" in capsys.readouterr().out
    records = [json.loads(line) for line in (out / "instances.log").read_text().splitlines()]
    scores = json.loads((out / "scores.json").read_text())
    assert [r["index"] for r in records] == [0, 1] and all(FIELDS <= set(r) for r in records)
    for r, (source, target) in zip(records, PAIRS):
        assert r["source"] == source and r["reference"] == target and r["source_length"] == len(source.split())
        assert r["prediction_length"] == len(r["prediction"].split()) == len(r["delays"]) == len(r["elapsed"])
        assert r["delays"] == sorted(r["delays"]) and r["delays"][0] == 2 and r["delays"][-1] <= r["source_length"]
        assert all(e > d for e, d in zip(r["elapsed"], r["delays"]))  # measured compute is added
    expected = simuleval_reference(records)
    assert {m: scores[m] for m in expected} == pytest.approx(expected, abs=1e-9)
    assert scores["policy"] == "wait-k" and scores["k"] == 2 and scores["skipped"] == []
    assert (out / "config.yaml").read_text() == "source_type: text\ntarget_type: text\n"


@pytest.mark.parametrize("argv", [["--policy", "offline"], ["--policy", "entropy", "--threshold", "10"]])
def test_eval_other_policies(word_checkpoint, tmp_path, capsys, argv):
    data = tmp_path / "test.tsv"
    data.write_text("kel ama mibo\tyelm flun\nama kel\ttov\n")
    out = tmp_path / "eval"
    assert main(["stream", "eval", "--model", str(word_checkpoint), "--data", str(data), "--out", str(out), *argv]) == 0
    records = [json.loads(line) for line in (out / "instances.log").read_text().splitlines()]
    if argv[1] == "offline":  # read everything, then write
        assert all(set(r["delays"]) == {r["source_length"]} for r in records)
    scores = json.loads((out / "scores.json").read_text())
    assert scores["policy"] == argv[1] and scores["AL"] == pytest.approx(simuleval_reference(records)["AL"])


def test_simuleval_scores_our_log_the_same(fixture_checkpoints, tmp_path):
    """SimulEval's own scorers on our instances.log give scores.json (needs simuleval; see the README)."""
    pytest.importorskip("simuleval", reason="simuleval is not installed (it pins tqdm==4.64.1, which conflicts "
                                            "with brisklm and datasets; see README streaming section)")
    from simuleval.evaluator.instance import LogInstance
    from simuleval.evaluator.scorers.latency_scorer import ALScorer, APScorer, DALScorer, LAALScorer
    from simuleval.evaluator.scorers.quality_scorer import SacreBLEUScorer

    data = write_jsonl(tmp_path / "test.jsonl", [{"source": s, "target": t} for s, t in PAIRS])
    out = tmp_path / "eval"
    assert main(["stream", "eval", "--model", str(fixture_checkpoints("llama3")), "--data", str(data),
                 "--out", str(out)]) == 0
    instances = {}
    for line in (out / "instances.log").read_text().splitlines():
        instance = LogInstance(line)
        instances[instance.index] = instance
    scores = json.loads((out / "scores.json").read_text())
    theirs = {"BLEU": SacreBLEUScorer()(instances)}
    for name, scorer in (("AL", ALScorer), ("LAAL", LAALScorer), ("DAL", DALScorer), ("AP", APScorer)):
        theirs[name] = scorer()(instances)
        theirs[name + "_CA"] = scorer(computation_aware=True)(instances)
    assert {m: scores[m] for m in theirs} == pytest.approx(theirs, abs=1e-9)


def test_our_agent_under_simulevals_evaluator(word_checkpoint, tmp_path, monkeypatch):
    """SimulEval's evaluator running BriskStreamingAgent records what `brisk stream eval` records."""
    pytest.importorskip("simuleval", reason="simuleval is not installed (see README streaming section)")
    from simuleval.evaluator import build_evaluator
    from simuleval.utils.agent import build_system_args

    monkeypatch.setattr("sys.argv", ["simuleval"])  # SimulEval also parses the process's own arguments
    sources, targets = ["kel ama mibo sefa", "ama kel"], ["yelm flun tov", "gorl"]
    (tmp_path / "src.txt").write_text("".join(s + "\n" for s in sources))
    (tmp_path / "ref.txt").write_text("".join(t + "\n" for t in targets))
    data = write_jsonl(tmp_path / "d.jsonl", [{"source": s, "target": t} for s, t in zip(sources, targets)])
    system, args = build_system_args({"agent_class": "brisklm.streaming.simuleval_agent.BriskStreamingAgent",
                                      "source": str(tmp_path / "src.txt"), "target": str(tmp_path / "ref.txt"),
                                      "output": str(tmp_path / "se"), "model": str(word_checkpoint), "k": 2,
                                      "no_progress_bar": True})
    build_evaluator(args)(system)
    assert main(["stream", "eval", "--model", str(word_checkpoint), "--data", str(data), "--k", "2",
                 "--out", str(tmp_path / "ours")]) == 0
    theirs = [json.loads(x) for x in (tmp_path / "se" / "instances.log").read_text().splitlines()]
    ours = [json.loads(x) for x in (tmp_path / "ours" / "instances.log").read_text().splitlines()]
    assert [(r["prediction"], r["delays"]) for r in theirs] == [(r["prediction"], r["delays"]) for r in ours]


# ---------------------------------------------------------------------------------- bad input
def errors_of(err: str) -> list[str]:
    assert "Traceback" not in err
    return [line for line in err.splitlines() if line.startswith("brisk: error")]


def test_bad_lines_are_reported_and_the_others_evaluated(fixture_checkpoints, tmp_path, capsys):
    rows = [{"source": "hello world", "target": "hallo Welt"},
            {"source": "no target here"},  # line 2: no target
            {"source": "   ", "target": "leer"},  # line 3: empty source
            {"source": "fine 日本", "target": "gut"},  # line 4: the tokenizer cannot encode it
            {"source": "the quick brown fox", "target": "der schnelle braune Fuchs"}]
    data = write_jsonl(tmp_path / "test.jsonl", rows)
    out = tmp_path / "eval"
    assert main(["stream", "eval", "--model", str(fixture_checkpoints("mistral")), "--data", str(data),
                 "--out", str(out)]) == 2
    errors = errors_of(capsys.readouterr().err)
    assert any("test.jsonl line 2: needs an object with fields 'source' and 'target'" in e for e in errors)
    assert any("test.jsonl line 3: the source is empty" in e for e in errors)
    assert any("test.jsonl line 4:" in e and "cannot encode" in e for e in errors)
    assert len(errors) == 4  # three bad lines, then the summary
    records = [json.loads(line) for line in (out / "instances.log").read_text().splitlines()]
    assert [r["source"] for r in records] == ["hello world", "the quick brown fox"]
    assert [s["line"] for s in json.loads((out / "scores.json").read_text())["skipped"]] == [2, 3, 4]


def test_forced_chat_template_without_one_is_one_line(word_checkpoint, tmp_path, capsys):
    data = write_jsonl(tmp_path / "d.jsonl", [{"source": "kel ama", "target": "tov"}])
    assert main(["stream", "eval", "--model", str(word_checkpoint), "--data", str(data), "--out",
                 str(tmp_path / "o"), "--chat-template"]) == 2
    errors = errors_of(capsys.readouterr().err)
    assert len(errors) == 1 and "--chat-template was passed but this tokenizer has no chat template" in errors[0]


def test_forced_chat_template_is_used_where_there_is_one(fixture_checkpoints, tmp_path, capsys):
    data = write_jsonl(tmp_path / "d.jsonl", [{"source": "hello world", "target": "hallo Welt"}])
    assert main(["stream", "eval", "--model", str(fixture_checkpoints("qwen2")), "--data", str(data), "--out",
                 str(tmp_path / "o"), "--chat-template", "--limit", "1"]) == 0


@pytest.mark.parametrize("argv, message", [
    (["--policy", "wait-k", "--threshold", "0.5"], "--threshold applies to"),
    (["--k", "0"], "k >= 1"),
    (["--word-ms", "0"], "--word-ms must be positive"),
])
def test_bad_options_are_one_line(word_checkpoint, tmp_path, capsys, argv, message):
    data = write_jsonl(tmp_path / "d.jsonl", [{"source": "kel", "target": "tov"}])
    assert main(["stream", "eval", "--model", str(word_checkpoint), "--data", str(data), "--out", str(tmp_path / "o"),
                 *argv]) == 2
    errors = errors_of(capsys.readouterr().err)
    assert len(errors) == 1 and message in errors[0]


def test_no_usable_line_is_one_error(word_checkpoint, tmp_path, capsys):
    data = write_jsonl(tmp_path / "d.jsonl", ['{"target": "tov"}'])
    assert main(["stream", "eval", "--model", str(word_checkpoint), "--data", str(data), "--out",
                 str(tmp_path / "o")]) == 2
    errors = errors_of(capsys.readouterr().err)
    assert len(errors) == 2 and "d.jsonl line 1" in errors[0] and "no usable source/target pairs" in errors[1]


def test_translate_uses_the_same_driver(fixture_checkpoints, capsys):
    """`stream translate` (words pushed as they arrive, the end known only at EOF) prints gpe_wait_k's words."""
    path = fixture_checkpoints("gemma2")
    model, text = load(path)
    expected = gpe_wait_k(model, text, [["hello", "world", "again"]], 2).outputs[0]
    assert main(["stream", "translate", "--model", str(path), "--k", "2", "--text", "hello world again"]) == 0
    lines = [line.rsplit("\t", 1) for line in capsys.readouterr().out.splitlines() if "\tdelay=" in line]
    assert [(w, int(d.split("=")[1])) for w, d in lines] == list(zip(expected.words, expected.delays))


@pytest.mark.parametrize("policy", ["entropy", "attention"])
def test_heads_on_a_subword_checkpoint_match_head_decode(fixture_checkpoints, tmp_path, policy):
    """The word-by-word stepper takes a head's decisions at word starts only, exactly as head_decode does."""
    from brisklm.streaming.proactive.heads import make_head
    from brisklm.streaming.proactive.subword import head_decode
    from brisklm.zoo.store import load

    loaded = load(str(fixture_checkpoints("qwen2")))
    text = TextLayer.for_model(loaded.model, loaded.tokenizer)
    source = ["the", "quick", "brown", "fox", "jumps"]
    threshold = {"entropy": 4.0, "attention": 0.3}[policy]
    spec = PolicySpec(policy, threshold=threshold)
    stepper = run_stream(loaded.model, text, spec, source, head=make_head(policy, None), max_words=8)
    expected = head_decode(loaded.model, text, [source], make_head(policy, None), threshold, max_words=8)
    assert stepper.output.words and stepper.output.words == expected.outputs[0].words
    assert stepper.output.delays == expected.outputs[0].delays
