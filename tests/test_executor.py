"""The layer-loop executor: no-op plans equal the dense model; row plans equal their masked references."""

import pytest
import torch
from transformers import DynamicCache, GPT2Config, GPT2LMHeadModel

from brisklm.core import (
    FlopsCounter,
    KVCache,
    LayerStep,
    MatrixVisibility,
    ModelAdapter,
    Plan,
    dense_forward_flops,
    execute,
)
from brisklm.errors import PlanError, UnsupportedModelError

from conftest import tiny_model

TOL = 1e-4


def ids(batch=2, length=12, seed=1):
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, 97, (batch, length), generator=g)


@torch.no_grad()
def test_noop_plan_matches_model(family_model):
    _, model = family_model
    x = ids()
    ref = model(x).logits
    out = execute(model, x, plan=Plan(steps=[LayerStep()] * model.config.num_hidden_layers))
    assert (out.logits - ref).abs().max().item() < TOL


@torch.no_grad()
@pytest.mark.parametrize("cache_kind", ["dynamic", "brisk"])
def test_noop_plan_with_cache_matches_model(family_model, cache_kind):
    _, model = family_model
    x = ids(length=14)
    ref = model(x).logits
    cache = DynamicCache() if cache_kind == "dynamic" else KVCache(model.config.num_hidden_layers)
    parts = [execute(model, x[:, a:b], cache=cache).logits for a, b in [(0, 5), (5, 6), (6, 14)]]
    assert (torch.cat(parts, dim=1) - ref).abs().max().item() < TOL


@torch.no_grad()
def test_executor_continues_a_cache_filled_by_hf(llama_model):
    x = ids(length=10)
    ref = llama_model(x).logits
    cache = DynamicCache()
    llama_model(x[:, :7], cache=cache, use_cache=True)
    tail = execute(llama_model, x[:, 7:], cache=cache).logits
    assert (tail - ref[:, 7:]).abs().max().item() < TOL


@torch.no_grad()
def test_attention_weights_path_matches_sdpa(llama_model):
    x = ids()
    a = execute(llama_model, x).logits
    out = execute(llama_model, x, record_attention=True)
    assert (out.logits - a).abs().max().item() < TOL
    probs = out.attentions[0].probs
    assert probs.shape == (2, 4, 12, 12)
    assert torch.allclose(probs.sum(-1), torch.ones(2, 4, 12), atol=1e-5)
    assert probs[0, 0].triu(1).abs().max().item() == 0.0


def _gated_reference(model, x, attn_gate, mlp_gate):
    """Dense HF forward where each layer's attention / MLP output is multiplied by a 0/1 gate per token."""
    handles = []
    for i, layer in enumerate(model.model.layers):
        def attn_hook(mod, inp, output, i=i):
            return (output[0] * attn_gate[i][..., None],) + tuple(output[1:])

        def mlp_hook(mod, inp, output, i=i):
            return output * mlp_gate[i][..., None]

        handles.append(layer.self_attn.register_forward_hook(attn_hook))
        handles.append(layer.mlp.register_forward_hook(mlp_hook))
    try:
        return model(x).logits
    finally:
        for h in handles:
            h.remove()


@torch.no_grad()
def test_sparse_rows_equal_gate_multiplied_forward(family_model):
    _, model = family_model
    n_layers = model.config.num_hidden_layers
    x = ids(length=16)
    g = torch.Generator().manual_seed(3)
    attn_gate = [torch.rand(2, 16, generator=g) > 0.4 for _ in range(n_layers)]
    mlp_gate = [torch.rand(2, 16, generator=g) > 0.4 for _ in range(n_layers)]
    ref = _gated_reference(model, x, [m.float() for m in attn_gate], [m.float() for m in mlp_gate])
    plan = Plan(steps=[LayerStep(attn_rows=a, mlp_rows=m) for a, m in zip(attn_gate, mlp_gate)])
    out = execute(model, x, plan=plan)
    assert (out.logits - ref).abs().max().item() < TOL
    # Negative control: a different gate gives different logits.
    other = Plan(steps=[LayerStep(attn_rows=~a, mlp_rows=m) for a, m in zip(attn_gate, mlp_gate)])
    assert (execute(model, x, plan=other).logits - ref).abs().max().item() > 1e-2


@torch.no_grad()
def test_dropping_rows_equals_masking_them_out(llama_model):
    x = ids(batch=1, length=10)
    drop = torch.tensor([[2, 5, 6]])
    keep = torch.tensor([[i for i in range(10) if i not in drop[0].tolist()]])
    steps = [None, LayerStep(keep_after=keep), None]
    dropped = execute(llama_model, x, plan=Plan(steps=steps))
    # Reference: keep every row, but from layer 2 on nobody attends to the dropped rows.
    base = torch.tril(torch.ones(10, 10, dtype=torch.bool))

    class LateMask:
        def __call__(self, q, k, layer_idx):
            vis = base[q["order"][:, :, None], k["order"][:, None, :]]
            if layer_idx >= 2:
                vis = vis & ~torch.isin(k["order"], drop)[:, None, :]
            return vis

    masked = execute(llama_model, x, plan=Plan(visibility=LateMask()))
    assert dropped.logits.shape == (1, 7, 97)
    assert (dropped.logits - masked.logits[:, keep[0]]).abs().max().item() < TOL
    assert dropped.meta["row"].tolist() == keep.tolist()


@torch.no_grad()
def test_matrix_visibility_and_context_cache(llama_model):
    """A two-group layout decoded with a read-only context cache equals one masked pass."""
    x = ids(batch=1, length=9)
    src, tgt = 5, 4
    matrix = torch.tril(torch.ones(1, 9, 9, dtype=torch.bool))
    matrix[0, src:, 3:src] = False  # target rows see only the first 3 source tokens
    positions = torch.tensor([[0, 1, 2, 3, 4, 0, 1, 2, 3]])
    full = execute(llama_model, x, plan=Plan(position_ids=positions, visibility=MatrixVisibility(matrix)))
    source_cache, target_cache = KVCache(3), KVCache(3)
    vis = MatrixVisibility(matrix)
    execute(llama_model, x[:, :src], cache=source_cache,
            plan=Plan(position_ids=positions[:, :src], order=torch.arange(src)[None], visibility=vis))
    out = execute(llama_model, x[:, src:], cache=target_cache, context=[source_cache],
                  plan=Plan(position_ids=positions[:, src:], order=torch.arange(src, 9)[None], visibility=vis))
    assert (out.logits - full.logits[:, src:]).abs().max().item() < TOL


@torch.no_grad()
def test_flops_counter_matches_analytic_dense(llama_model):
    counter = FlopsCounter()
    execute(llama_model, ids(batch=1, length=12), flops=counter)
    adapter = ModelAdapter.from_model(llama_model)
    assert counter.total() == dense_forward_flops(adapter, 12)
    half = FlopsCounter()
    steps = [LayerStep(mlp_rows=torch.arange(12)[None] % 2 == 0)] * 3
    execute(llama_model, ids(batch=1, length=12), plan=Plan(steps=steps), flops=half)
    assert half.by_module()["mlp"] * 2 == counter.by_module()["mlp"]


def test_unsupported_family_is_a_clear_error():
    model = GPT2LMHeadModel(GPT2Config(n_layer=1, n_embd=32, n_head=2, vocab_size=50))
    with pytest.raises(UnsupportedModelError, match="'gpt2' is not supported.*llama"):
        ModelAdapter.from_model(model)


def test_plan_shape_errors(llama_model):
    x = ids()
    with pytest.raises(PlanError, match="3 layers"):
        execute(llama_model, x, plan=Plan(steps=[None, None]))
    with pytest.raises(PlanError, match="attn_rows"):
        execute(llama_model, x, plan=Plan(steps=[LayerStep(attn_rows=torch.ones(2, 5, dtype=torch.bool)), None, None]))
    with pytest.raises(PlanError, match="position_ids"):
        execute(llama_model, x, plan=Plan(position_ids=torch.zeros(1, 12, dtype=torch.long)))
    with pytest.raises(PlanError, match="outside the vocabulary"):
        execute(llama_model, torch.full((1, 3), 500))
    with pytest.raises(PlanError, match="KVCache"):
        execute(llama_model, x, cache=DynamicCache(), plan=Plan(steps=[LayerStep(kv_rows=torch.ones(2, 12, dtype=torch.bool)), None, None]))


def test_executor_is_differentiable(llama_model):
    x = ids(batch=1, length=8)
    out = execute(llama_model, x, plan=Plan(steps=[LayerStep(mlp_rows=torch.arange(8)[None] > 3)] * 3))
    out.logits.sum().backward()
    assert llama_model.model.layers[0].self_attn.q_proj.weight.grad.abs().sum() > 0
