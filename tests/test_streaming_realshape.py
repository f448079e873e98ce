"""The real-shape section of `brisk bench streaming` (quick form: it runs and writes its keys; no timing claims),
the wait-k schedule shared by GPE and the re-encoding baselines, and `--section` merging into saved results."""

from __future__ import annotations

import json

import pytest
import torch

from brisklm.core.text import TextLayer
from brisklm.errors import BriskError
from brisklm.eval.bench import run_benchmark
from brisklm.eval.progress import quiet_progress
from brisklm.streaming import realshape as rs
from brisklm.streaming.bench import real_shape_key


@pytest.fixture(scope="module")
def small():
    from brisklm.core.realshape_bench import random_model

    model = random_model(rs.QUICK["shape"], torch.device("cpu"), torch.float32, 0)
    return model, TextLayer.for_model(model, rs.fixture_tokenizer())


def test_words_split_into_several_tokens(small):
    _, text = small
    segments = rs.word_segments(text, rs.corpus_words(20))
    assert sum(len(s) for s in segments) > 1.3 * len(segments)  # the section measures multi-token words


def test_schedule_follows_wait_k_by_words(small):
    _, text = small
    words = rs.corpus_words(3, target=True)
    ids = [t for seg in rs.word_segments(text, words) for t in seg]
    per_word = [len(seg) for seg in rs.word_segments(text, words)]
    reads = rs.schedule(text, ids, n=4, k=2)
    assert len(reads) == len(ids) + 1  # every token, then the end
    # word j (1-based) is written after min(k + j - 1, n) words; every token of a word sees what the next needs
    expected = [2] + [min(2 + j, 4) for j, size in enumerate(per_word, start=1) for _ in range(size)]
    assert reads == expected


@pytest.mark.parametrize("hf", [True, False])
def test_reencode_runner_counts_prefix_tokens(small, hf):
    model, text = small
    source, target_words = rs.corpus_words(5), rs.corpus_words(5, target=True)
    target = [t for seg in rs.word_segments(text, target_words) for t in seg]
    runner = rs.ReencodeRunner(model, text, source, target, k=2, hf=hf)
    forward, delays = runner.run()
    frame = rs.stream_frame(text)
    src = rs.word_segments(text, source, frame.first_at_start)
    expected, last = 0, None
    for i, p in enumerate(runner.reads):
        fixed = len(frame.prompt) + sum(len(s) for s in src[:p]) + len(frame.batch_separator)
        expected += fixed + i if p != last else 1
        last = p
    assert forward == expected
    gpe = rs.gpe_wait_k(model, text, [source], 2, batch_size=1, forced=[target])
    assert delays == gpe.outputs[0].delays
    assert gpe.forward_tokens < forward


def test_quick_section_writes_keys_and_keeps_the_others(tmp_path):
    results = tmp_path / "results"
    results.mkdir()
    (results / "streaming.json").write_text(json.dumps({"bleu": {"gpe": {"k3": 1.0}}, "meta": {"area": "streaming"}}))
    run_benchmark("streaming", quick=True, results_dir=results, progress=quiet_progress,
                  sections=("real_shape", "kv_cache_append_cost"))
    saved = json.loads((results / "streaming.json").read_text())
    assert saved["bleu"] == {"gpe": {"k3": 1.0}}  # earlier figures survive a section run
    assert set(saved["meta"]["sections"]) == {"real_shape", "kv_cache_append_cost"}
    section = saved["real_shape"]
    assert section["quick"] is True and section["device"] == "cpu"
    for n in ("n4", "n8"):
        row = section[n]
        assert row["same_schedule"] is True and row["baseline"] in rs.BASELINES
        assert row["forward_tokens"]["gpe"] < row["forward_tokens"][row["baseline"]]
        assert row["forward_tokens_ratio"] > 1 and row["wall_ratio"] > 0
        assert set(row["wall_s"]) == {"gpe", *rs.BASELINES}
        # re-encoding calls the model once per written token and the end; GPE also per read step
        assert row["model_calls"]["reencode_hf"] == row["model_calls"]["reencode_executor"] == row["target_tokens"] + 1
        assert row["model_calls"]["gpe"] > row["target_tokens"] + 1
    cost = saved["kv_cache_append_cost"]
    assert len(cost["us_per_token_layer_grown_buffer"]) == len(cost["us_per_token_layer_cat_per_token"]) == 5
    plots = tmp_path / "plots" / "streaming"
    assert (plots / "streaming_real_shape.png").exists() and (plots / "streaming_kv_append_cost.png").exists()


def test_unknown_section_is_a_clear_error(tmp_path):
    with pytest.raises(BriskError, match="no section 'nope'.*real_shape"):
        run_benchmark("streaming", quick=True, results_dir=tmp_path, sections=("nope",))
    with pytest.raises(BriskError, match="has no sections"):
        run_benchmark("core", quick=True, results_dir=tmp_path, sections=("real_shape",))


@pytest.mark.gpu
def test_quick_section_on_cuda_bf16(monkeypatch):
    if not torch.cuda.is_available():
        pytest.skip("needs CUDA")
    monkeypatch.setenv("BRISK_DEVICE", "cuda")
    monkeypatch.setenv("BRISK_DTYPE", "bfloat16")
    figures = rs.real_shape_figures(quick=True)
    assert figures["device"].startswith("cuda") and figures["dtype"] == "bfloat16"
    assert figures["n8"]["same_schedule"] and figures["n8"]["forward_tokens_ratio"] > 1
    assert real_shape_key(figures["device"], figures["dtype"]) == "real_shape_cuda_bfloat16"


def test_interleaved_medians_rotate_the_order_and_take_medians():
    from brisklm.core.timing import interleaved_medians

    order: list[str] = []
    fns = {name: (lambda name=name: order.append(name)) for name in ("a", "b", "c")}
    seconds = interleaved_medians(fns, repeats=3, warmup=1)
    assert order == ["a", "b", "c", "a", "b", "c", "b", "c", "a", "c", "a", "b"]  # warm-up, then rotated rounds
    assert set(seconds) == {"a", "b", "c"} and all(s >= 0 for s in seconds.values())
    with pytest.raises(BriskError, match="repeats"):
        interleaved_medians(fns, repeats=0)
