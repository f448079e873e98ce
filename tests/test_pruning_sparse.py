"""Sparse executor: router plans equal the gate-multiplied model; KV policies FULL / EVICT / REUSE."""

import pytest
import torch

from brisklm.core import FlopsCounter, KVCache, LayerStep, Plan, execute
from brisklm.core.plan import CausalVisibility
from brisklm.errors import BriskError
from brisklm.pruning.gating import masked_forward
from brisklm.pruning.kv import ReuseKVCache, kv_bytes
from brisklm.pruning.routers import RouterSet
from brisklm.pruning.sparse import sparse_forward

from conftest import tiny_model

TOL = 1e-4


def ids(batch=2, length=16, seed=1):
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, 97, (batch, length), generator=g)


def random_routers(model, kind="linear", seed=0, scale=3.0):
    """Routers with large random weights and zero bias: about half the tokens skip each module."""
    torch.manual_seed(seed)
    r = RouterSet(model.config.num_hidden_layers, model.config.hidden_size, kind=kind, rank=8)
    with torch.no_grad():
        for router in list(r.attn) + list(r.mlp):
            router.out.weight.normal_(0, scale)
            router.out.bias.zero_()
    return r.eval()


@torch.no_grad()
@pytest.mark.parametrize("kind", ["linear", "lowrank"])
def test_sparse_executor_equals_gate_multiplied_model(family_model, kind):
    _, model = family_model
    routers = random_routers(model, kind)
    x = ids()
    ref, gates = masked_forward(model, routers, x)
    out, record, _ = sparse_forward(model, routers, x)
    for a, b in zip(gates.attn, record.attn):
        assert torch.equal(a.bool(), b)  # same decisions on both paths
    rates = record.skip_rates()
    assert 0.2 < rates["attn"] < 0.8 and 0.2 < rates["mlp"] < 0.8  # the test really skips
    assert (out - ref).abs().max().item() < TOL
    dense = model(x).logits
    assert (out - dense).abs().max().item() > 1e-2  # negative control: skipping changes the output


@torch.no_grad()
def test_padding_and_batch_rows_are_independent(llama_model):
    routers = random_routers(llama_model)
    x = ids(batch=3, length=12)
    mask = torch.ones(3, 12, dtype=torch.long)
    mask[1, 9:] = 0
    batched, _, _ = sparse_forward(llama_model, routers, x, attention_mask=mask)
    single, _, _ = sparse_forward(llama_model, routers, x[1:2, :9])
    assert (batched[1, :9] - single[0]).abs().max().item() < TOL


@torch.no_grad()
def test_skipped_modules_cost_no_flops(llama_model):
    routers = random_routers(llama_model)
    x = ids()
    dense, sparse = FlopsCounter(), FlopsCounter()
    execute(llama_model, x, flops=dense)
    _, record, _ = sparse_forward(llama_model, routers, x, flops=sparse)
    mlp_exec = sum(int(m.sum()) for m in record.mlp)
    assert sparse.by_module()["mlp"] == 6 * mlp_exec * 64 * 128
    q_exec = sum(int(a.sum()) for a in record.attn)
    assert sparse.by_module()["q_proj"] == 2 * q_exec * 64 * 64
    assert sparse.total() < dense.total()


@torch.no_grad()
def test_evict_equals_masking_skipped_keys(llama_model):
    """EVICT (store only executing rows) == full keys with the skipping rows' keys hidden at that layer."""
    x = ids(batch=2, length=12)
    g = torch.Generator().manual_seed(5)
    attn = [torch.rand(2, 12, generator=g) > 0.4 for _ in range(3)]
    mlp = [torch.rand(2, 12, generator=g) > 0.3 for _ in range(3)]
    evicted = execute(llama_model, x, plan=Plan(steps=[LayerStep(a, m, kv_rows=a) for a, m in zip(attn, mlp)]))
    meta = {f"exec{i}": a for i, a in enumerate(attn)}

    def hide(q, k, layer):
        return CausalVisibility()(q, k, layer) & k[f"exec{layer}"][:, None, :]

    ref = execute(llama_model, x, plan=Plan(row_meta=meta, visibility=hide,
                                            steps=[LayerStep(a, m) for a, m in zip(attn, mlp)]))
    rows = torch.stack(attn).any(0)  # rows that see at least themselves somewhere
    assert (evicted.logits - ref.logits).abs().max().item() < TOL
    assert rows.any()


@torch.no_grad()
def test_policies_bytes_and_decode_consistency(llama_model):
    routers = random_routers(llama_model)
    x = ids(batch=1, length=14)
    results = {}
    for policy in ("full", "evict", "reuse"):
        cache = ReuseKVCache(3) if policy == "reuse" else KVCache(3)
        full, record, cache = sparse_forward(llama_model, routers, x, policy=policy, cache=cache)
        results[policy] = (full, kv_bytes(cache), record)
        # Token-by-token decoding with the same cache type equals the one-pass prefill.
        step_cache = ReuseKVCache(3) if policy == "reuse" else KVCache(3)
        parts = [sparse_forward(llama_model, routers, x[:, a:b], policy=policy, cache=step_cache)[0]
                 for a, b in [(0, 6)] + [(i, i + 1) for i in range(6, 14)]]
        assert (torch.cat(parts, 1) - full).abs().max().item() < TOL, policy
    record = results["full"][2]
    executed = sum(int(a.sum()) for a in record.attn)
    entry = 2 * 2 * 16 * 4  # K+V, 2 KV heads, head_dim 16, fp32
    assert results["full"][1]["kv_bytes"] == 3 * 14 * entry
    assert results["evict"][1]["kv_bytes"] == executed * entry
    assert results["reuse"][1]["kv_bytes"] == executed * entry
    assert results["reuse"][1]["carried_entries"] > 0
    assert results["reuse"][1]["pointer_bytes"] == 4 * results["reuse"][1]["carried_entries"]
    # The policies really differ in what later tokens see.
    assert (results["full"][0] - results["evict"][0]).abs().max().item() > 1e-3
    assert (results["reuse"][0] - results["evict"][0]).abs().max().item() > 1e-3


@torch.no_grad()
def test_reuse_carries_the_last_executed_layer_kv(llama_model):
    """A token that skips attention at layer 1 holds exactly its layer-0 K/V there."""

    class OneSkip(RouterSet):
        def decisions(self, layer_idx, x):
            attn = torch.ones(x.shape[:2], dtype=torch.bool)
            if layer_idx == 1:
                attn[0, 3] = False
            return attn, torch.ones_like(attn)

    routers = OneSkip(3, 64)
    x = ids(batch=1, length=6)
    _, _, cache = sparse_forward(llama_model, routers, x, policy="reuse")
    l0, l1 = cache.layers[0], cache.layers[1]
    where = (l1.meta["order"][0] == 3).nonzero().item()
    assert bool(l1.meta["carried"][0, where])
    assert torch.equal(l1.keys[0, :, where], l0.keys[0, :, 3])
    assert torch.equal(l1.values[0, :, where], l0.values[0, :, 3])
    assert kv_bytes(cache)["carried_entries"] == 1


def test_reuse_needs_its_cache(llama_model):
    with pytest.raises(BriskError, match="ReuseKVCache"):
        sparse_forward(llama_model, random_routers(llama_model), ids(), policy="reuse", cache=KVCache(3))
    with pytest.raises(BriskError, match="KV policy"):
        sparse_forward(llama_model, random_routers(llama_model), ids(), policy="drop")


@torch.no_grad()
def test_router_save_load_roundtrip(tmp_path, llama_model):
    routers = random_routers(llama_model, "lowrank")
    routers.save(tmp_path, {"sparsity": 0.25})
    again = RouterSet.load(tmp_path)
    x = ids()
    assert torch.equal(sparse_forward(llama_model, routers, x)[0], sparse_forward(llama_model, again, x)[0])
    with pytest.raises(BriskError, match="routers.json"):
        RouterSet.load(tmp_path / "nothing")


def test_dynamic_plan_decide_is_checked(llama_model):
    """Core extension: a decide rule's steps are validated like static ones."""
    bad = Plan(decide=lambda i, h, m, s: LayerStep(attn_rows=torch.ones(1, 3, dtype=torch.bool)))
    with pytest.raises(BriskError, match="attn_rows"):
        execute(llama_model, ids(), plan=bad)
