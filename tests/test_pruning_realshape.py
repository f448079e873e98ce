"""The real-shape pruning bench section, on a narrow stand-in of the same layout (shapes shrunk, code unchanged)."""

import pytest
import torch

import brisklm.pruning.realshape as rs
from brisklm.pruning.sparse import sparse_forward

from conftest import tiny_model


def test_ratios_use_the_strict_measure():
    r = rs.ratios(baseline_s=2.0, method_s=1.25, ideal=2.0)
    assert r["speedup"] == pytest.approx(1.6)
    assert r["speedup_over_ideal"] == pytest.approx(0.8)
    assert r["fraction_of_ideal"] == pytest.approx(0.6)  # (1.6 - 1) / (2 - 1): stricter than 0.8
    assert rs.ratios(1.0, 1.0, 1.0)["fraction_of_ideal"] is None


@torch.no_grad()
@pytest.mark.parametrize("rate", [0.25, 0.4])
def test_rate_routers_give_the_rate_per_layer(rate):
    model = tiny_model("qwen2", layers=3)
    ids = torch.randint(0, 97, (2, 50), generator=torch.Generator().manual_seed(0))
    routers = rs.rate_routers(model, ids, rate)
    _, record, _ = sparse_forward(model, routers, ids)
    for attn, mlp in zip(record.attn, record.mlp):
        assert abs((~attn).float().mean().item() - rate) < 0.03
        assert abs((~mlp).float().mean().item() - rate) < 0.03


@torch.no_grad()
def test_section_runs_on_a_narrow_stand_in(monkeypatch):
    monkeypatch.setattr(rs, "SHAPE", {**rs.SHAPE, "hidden_size": 112, "intermediate_size": 256,
                                      "num_hidden_layers": 2, "vocab_size": 512})
    monkeypatch.setattr(rs, "QUICK", dict(prefill=((1, 64), (2, 16)), prompt=64, new_tokens=3, repeats=1,
                                          masked_batches=(1,)))
    out = rs.real_shape_figures(quick=True)
    pre = out["prefill_b1_len64"]
    for key in ("0.25", "0.40"):
        row = pre[key]
        assert abs(row["skip_rates"]["total"] - float(key)) < 0.1  # routers were rated on other text
        assert row["ideal_flops_ratio"] > 1.1 and row["sparse_s"] > 0 and row["masked_s"] > 0
        assert set(row["vs_hf_dense"]) == {"speedup", "speedup_over_ideal", "fraction_of_ideal"}
    assert pre["0.40"]["ideal_flops_ratio"] > pre["0.25"]["ideal_flops_ratio"]
    assert "masked_s" not in out["prefill_b2_len16"]["0.25"]
    decode = out["decode_b1_3_after_64"]
    assert decode["0.40_evict"]["ideal_flops_ratio"] >= decode["0.40_full"]["ideal_flops_ratio"] > 1.0
    structured = out["structured_prefill_b1_len512"]
    assert structured["num_attention_heads"] == 10 and structured["ideal_flops_ratio"] > 1.1
