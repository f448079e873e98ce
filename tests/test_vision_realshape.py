"""The vision real-shape section runs (quick form: a narrow model, one repeat) and writes every key; timing is
not checked here (that is `brisk bench vision`), only what the figures must satisfy whatever the machine."""

from __future__ import annotations

import pytest

from brisklm.vision.realshape import REMOVED, real_shape_figures


@pytest.fixture(scope="module")
def figures():
    mp = pytest.MonkeyPatch()
    mp.setenv("BRISK_DTYPE", "bfloat16")  # what --dtype sets: the section must honour it
    try:
        yield real_shape_figures(quick=True)
    finally:
        mp.undo()


def test_quick_real_shape_section_writes_every_key(figures) -> None:
    assert figures["dtype"] == "bfloat16" and figures["device"] == "cpu"
    layers = figures["shape"]["num_hidden_layers"]
    for batch in ("batch_1", "batch_2"):
        row = figures[batch]
        n_vis, tokens = row["image_tokens"], row["tokens"]
        assert row["dense_baseline"] in ("hf_forward", "executor") and row["hf_dense_prefill_s"] > 0
        for removed in REMOVED:
            tag = f"{int(removed * 100)}%"
            keep = round(n_vis * (1 - removed))
            fastv, visi = row[f"fastv_{tag}"], row[f"visipruner_{tag}"]
            # FastV and VisiPruner (fusion forced at layer 1) keep the budget from layer 2 on
            assert fastv["visual_tokens_per_layer"] == [n_vis, n_vis] + [keep] * (layers - 2)
            assert visi["visual_tokens_per_layer"] == fastv["visual_tokens_per_layer"]
            # KV bytes in proportion to the rows kept
            rows = sum(tokens - n_vis + v for v in fastv["visual_tokens_per_layer"])
            assert fastv["kv_bytes_vs_dense"] == pytest.approx(rows / (layers * tokens))
            # VisiPruner's scoring is counted: a little above FastV's ratio, never below
            assert fastv["flops_ratio"] < visi["flops_ratio"] < fastv["flops_ratio"] * 1.02
            for name in (f"fastv_{tag}", f"pdrop_{tag}", f"visipruner_{tag}"):
                r = row[name]
                assert 0 < r["flops_ratio"] < 1 and set(r["prefill"]) == {"speedup", "speedup_over_ideal",
                                                                          "fraction_of_ideal"}
                assert r["decode_ms_per_token"] > 0 and r["kv_bytes_vs_dense"] < 1
        assert row["fastv_90%"]["flops_ratio"] < row["fastv_75%"]["flops_ratio"]
        vica = row["vica"]
        assert vica["flops_ratio"] < row["fastv_90%"]["flops_ratio"] and vica["kv_bytes_vs_dense"] < 1
