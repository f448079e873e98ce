"""Static depth and width pruning on random tiny models: exact references, reloadable checkpoints, bad input."""

import pytest
import torch
from transformers import AutoModelForCausalLM

from brisklm.core import LayerStep, Plan, execute
from brisklm.errors import BriskError
from brisklm.pruning.depth import block_influence, calibration_perplexity, prune_depth, remove_layers
from brisklm.pruning.width import (
    activation_norms,
    decoder_linear_params,
    prune_structured,
    prune_unstructured,
    zero_fraction,
)

from conftest import random_calibration, tiny_model

TOL = 1e-4


def random_data(n=8, length=20, seed=0):
    return random_calibration(n, length, seed)


@torch.no_grad()
@pytest.mark.parametrize("family", ["llama", "qwen3"])
def test_removed_layers_model_equals_skipping_them(tmp_path, family):
    model = tiny_model(family, layers=4)
    x = torch.randint(0, 97, (2, 10))
    pruned = remove_layers(model, [1, 2])
    off = torch.zeros(2, 10, dtype=torch.bool)
    ref = execute(model, x, plan=Plan(steps=[None, LayerStep(off, off, off), LayerStep(off, off, off), None])).logits
    assert (pruned(x).logits - ref).abs().max().item() < TOL
    pruned.save_pretrained(tmp_path)
    again = AutoModelForCausalLM.from_pretrained(tmp_path)
    assert again.config.num_hidden_layers == 2
    assert (again(x).logits - ref).abs().max().item() < TOL


@torch.no_grad()
def test_depth_methods_pick_layers_and_bad_counts():
    model = tiny_model("llama", layers=4)
    data = random_data()
    bi = block_influence(model, data, pad_id=0)
    assert len(bi) == 4 and all(0 <= b <= 2 for b in bi)
    pruned, report = prune_depth(model, data, 0, remove=1, method="bi")
    assert report["removed"] == [min(range(4), key=lambda i: bi[i])]
    _, sleb = prune_depth(model, data, 0, remove=2, method="sleb")
    first = sleb["history"][0]
    ppl = {i: calibration_perplexity(model, data, 0, [i]) for i in range(4)}
    assert first["removed"] == min(ppl, key=ppl.get)  # greedy: the lowest-perplexity removal wins
    with pytest.raises(BriskError, match="cannot remove 4 layers from a 4-layer model"):
        prune_depth(model, data, 0, remove=4)
    with pytest.raises(BriskError, match="depth method"):
        prune_depth(model, data, 0, remove=1, method="laco")


@torch.no_grad()
@pytest.mark.parametrize("method", ["magnitude", "wanda"])
def test_unstructured_reaches_the_target(method):
    model = tiny_model("llama")
    data = random_data()
    norms = activation_norms(model, data, 0) if method == "wanda" else None
    pruned = prune_unstructured(model, 0.4, method, norms)
    assert abs(zero_fraction(pruned) - 0.4) < 0.02
    assert zero_fraction(model) == 0.0  # the original is untouched


@torch.no_grad()
def test_wanda_differs_from_magnitude_when_activations_are_uneven():
    model = tiny_model("llama")
    data = random_data()
    norms = activation_norms(model, data, 0)
    norms = {k: v * torch.linspace(0.1, 10, v.numel()) for k, v in norms.items()}
    a = prune_unstructured(model, 0.5, "wanda", norms)
    b = prune_unstructured(model, 0.5, "magnitude")
    wa = a.model.layers[0].mlp.down_proj.weight != 0
    wb = b.model.layers[0].mlp.down_proj.weight != 0
    assert (wa != wb).float().mean() > 0.05


@torch.no_grad()
@pytest.mark.parametrize("family", ["llama", "qwen2", "qwen3", "mistral"])
def test_structured_pruning_shrinks_and_equals_zeroed_reference(tmp_path, family):
    model = tiny_model(family, kv_heads=2)
    data = random_data()
    norms = activation_norms(model, data, 0)
    pruned, report = prune_structured(model, 0.3, norms, heads_per_group=1)
    assert pruned.config.num_attention_heads == 2 and pruned.config.num_key_value_heads == 2
    hd = model.model.layers[0].self_attn.head_dim
    assert pruned.model.layers[0].self_attn.q_proj.weight.shape == (2 * hd, 64)
    assert pruned.model.layers[0].mlp.gate_proj.weight.shape[0] == report["intermediate_size"] < 128
    assert abs(report["realised_sparsity"] - 0.3) < 0.02
    assert abs(1 - decoder_linear_params(pruned) / decoder_linear_params(model) - report["realised_sparsity"]) < 1e-9
    # Reference: the original shapes with the removed channels' gate rows and heads' o_proj columns zeroed.
    ref = tiny_model(family, kv_heads=2)
    for lo, lp in zip(ref.model.layers, pruned.model.layers):
        kept_gate = {tuple(r.tolist()) for r in lp.mlp.gate_proj.weight}
        for j, row in enumerate(lo.mlp.gate_proj.weight):
            if tuple(row.tolist()) not in kept_gate:
                lo.mlp.up_proj.weight[j] = 0
        kept_q = {tuple(r.tolist()) for r in lp.self_attn.q_proj.weight}
        for j, row in enumerate(lo.self_attn.q_proj.weight):
            if tuple(row.tolist()) not in kept_q:
                lo.self_attn.o_proj.weight[:, j] = 0
    x = torch.randint(0, 97, (2, 11))
    assert (pruned(x).logits - ref(x).logits).abs().max().item() < TOL
    assert (execute(pruned, x).logits - ref(x).logits).abs().max().item() < TOL
    pruned.save_pretrained(tmp_path)
    again = AutoModelForCausalLM.from_pretrained(tmp_path)
    assert (again(x).logits - ref(x).logits).abs().max().item() < TOL


def test_width_bad_input():
    model = tiny_model("llama")
    with pytest.raises(BriskError, match="strictly between 0 and 1"):
        prune_unstructured(model, 1.2, "magnitude")
    with pytest.raises(BriskError, match="strictly between 0 and 1"):
        prune_structured(model, 0.0, {})
    with pytest.raises(BriskError, match="Wanda needs calibration"):
        prune_unstructured(model, 0.5, "wanda")
    norms = activation_norms(model, random_data(), 0)
    with pytest.raises(BriskError, match="heads_per_group"):
        prune_structured(model, 0.5, norms, heads_per_group=2)
