"""Logit lens and Peak Inverse Rank: exact against references and on a hand-built model whose PIR is known."""

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

from brisklm.analysis.lens import encode_prompts, logit_lens, pad_right, token_rank
from brisklm.analysis.pir import peak_inverse_rank
from brisklm.errors import BriskError

from conftest import tiny_model

TOL = 1e-4


def _ids(batch=3, length=10, seed=3):
    g = torch.Generator().manual_seed(seed)
    return torch.randint(5, 97, (batch, length), generator=g)


@torch.no_grad()
def test_lens_last_layer_equals_model_logits(family_model):
    _, model = family_model
    x = _ids()
    lens = logit_lens(model, x)  # (L+1, B, T, V)
    assert lens.shape == (model.config.num_hidden_layers + 1, 3, 10, 97)
    assert (lens[-1] - model(x).logits).abs().max().item() < TOL


@torch.no_grad()
def test_lens_matches_hf_hidden_states_per_layer(llama_model):
    """Each layer's lens = final norm + head applied to HF's own hidden_states (not the already-normed last one)."""
    x = _ids(2, 8)
    lens = logit_lens(llama_model, x)
    hs = llama_model(x, output_hidden_states=True).hidden_states
    for layer in range(len(hs) - 1):  # HF's last entry is already normed; compare it via the logits test above
        ref = llama_model.lm_head(llama_model.model.norm(hs[layer]))
        assert (lens[layer] - ref).abs().max().item() < TOL


@torch.no_grad()
def test_lens_is_batched_with_right_padding(llama_model):
    rows = [[2, 10, 11, 12, 13, 14], [2, 20, 21], [2, 30, 31, 32, 33]]
    enc = pad_right(rows, 0)
    pos = enc.lengths[:, None] - 1
    batched = logit_lens(llama_model, enc.input_ids, pos, enc.attention_mask)
    for i, r in enumerate(rows):
        single = logit_lens(llama_model, torch.tensor([r]), torch.tensor([[len(r) - 1]]))
        assert (batched[:, i] - single[:, 0]).abs().max().item() < TOL


def test_token_rank_counts_strictly_higher():
    logits = torch.tensor([[0.1, 0.5, 0.3, 0.5]])
    assert token_rank(logits, torch.tensor([2])).tolist() == [2]
    assert token_rank(logits, torch.tensor([1])).tolist() == [0]


# --------------------------------------------------------------------------- hand-built model, known PIR
def _hand_built(vocab=8, heads=2):
    """d = vocab; one-hot embeddings; uniform attention (q = k = 0), V = I, O = 0.1 I; no MLP; head = permutation.

    The residual at any position is then its own one-hot plus positive mass on earlier tokens, so with distinct
    tokens the lens ranks the position's own token first, and a token absent from the prompt is ranked after every
    present one. lm_head maps coordinate c to token perm[c].
    """
    config = LlamaConfig(vocab_size=vocab, hidden_size=vocab, intermediate_size=4, num_hidden_layers=2,
                         num_attention_heads=heads, num_key_value_heads=heads, tie_word_embeddings=False,
                         rms_norm_eps=1e-6)
    model = LlamaForCausalLM(config).eval()
    perm = torch.tensor([3, 2, 1, 0, 7, 6, 5, 4])  # token perm[c] reads coordinate c
    with torch.no_grad():
        model.model.embed_tokens.weight.copy_(torch.eye(vocab))
        model.lm_head.weight.zero_()
        model.lm_head.weight[perm, torch.arange(vocab)] = 1.0
        for layer in model.model.layers:
            layer.self_attn.q_proj.weight.zero_()
            layer.self_attn.k_proj.weight.zero_()
            layer.self_attn.v_proj.weight.copy_(torch.eye(vocab))
            layer.self_attn.o_proj.weight.copy_(0.1 * torch.eye(vocab))  # small writes keep own token first
            layer.mlp.down_proj.weight.zero_()
    return model, perm


@torch.no_grad()
def test_hand_built_model_pir_is_exactly_known():
    model, perm = _hand_built()
    # Two prompts of distinct tokens; the label token is at position 2 / 1; queries are the last tokens.
    enc = pad_right([[0, 1, 2, 4, 5], [6, 3, 0]], pad_id=7)
    label_pos = torch.tensor([2, 1])
    label_tok = torch.tensor([2, 3])
    # Task token = the token that reads the label's own coordinate: ranked first at every layer -> PIR 1.0.
    task = perm[label_tok]
    res = peak_inverse_rank(model, enc, label_pos, task)
    for mode in ("residual", "attn_contrib"):
        assert res[mode].pir.tolist() == [1.0, 1.0], mode
        assert res[mode].ranks.eq(0).all(), mode
    # Task token reading coordinate 7 (absent from both prompts): ranked after the present tokens.
    absent = perm[torch.tensor([7, 7])]
    res = peak_inverse_rank(model, enc, label_pos, absent)
    # residual after each block: coordinates of every token at positions <= label are positive -> rank = count.
    assert res["residual"].ranks.tolist() == [[3, 3], [2, 2]]
    assert res["residual"].pir.tolist() == [0.25, 1 / 3]
    # attn_contrib: equal attention in every head, so it decodes norm(block input at the label): at block 0 the
    # pure one-hot (only the label coordinate positive -> rank 1), at block 1 every earlier token is present too.
    assert res["attn_contrib"].ranks.tolist() == [[1, 3], [1, 2]]
    assert res["attn_contrib"].pir.tolist() == [0.5, 0.5]


@torch.no_grad()
def test_attn_contrib_matches_hf_eager_reference():
    """Recompute the official variant from HF's eager attentions and hidden states, one prompt and head at a time."""
    model = tiny_model("llama", layers=3, kv_heads=2, seed=4)
    model.config._attn_implementation = "eager"
    x = _ids(2, 9, seed=5)
    enc = pad_right(x.tolist(), 0)
    label_pos, task = torch.tensor([3, 6]), torch.tensor([11, 42])
    ours = peak_inverse_rank(model, enc, label_pos, task, modes=("attn_contrib",))["attn_contrib"]
    out = model(x, output_hidden_states=True, output_attentions=True)
    n_heads, hd = 4, 16
    for b in range(2):
        for layer_idx, layer in enumerate(model.model.layers):
            h = out.hidden_states[layer_idx][b, label_pos[b]]
            v = layer.self_attn.v_proj(layer.input_layernorm(h)).view(2, hd)
            parts = [out.attentions[layer_idx][b, head, -1, label_pos[b]] * v[head // 2] for head in range(n_heads)]
            logits = model.lm_head(model.model.norm(layer.self_attn.o_proj(torch.cat(parts))))
            rank = int((logits > logits[task[b]]).sum())
            assert int(ours.ranks[b, layer_idx]) == rank


@torch.no_grad()
def test_pir_batched_equals_one_by_one(llama_model):
    rows = [[2, 10, 11, 12, 13, 14, 15], [2, 20, 21, 22], [2, 30, 31, 32, 33]]
    enc = pad_right(rows, 0)
    label_pos, task = torch.tensor([3, 1, 2]), torch.tensor([40, 41, 42])
    batched = peak_inverse_rank(llama_model, enc, label_pos, task)
    for i, r in enumerate(rows):
        single = peak_inverse_rank(llama_model, pad_right([r], 0), label_pos[i:i + 1], task[i:i + 1])
        for mode in batched:
            assert batched[mode].ranks[i].tolist() == single[mode].ranks[0].tolist()


def test_pir_bad_input_raises(llama_model):
    enc = pad_right([[2, 10, 11]], 0)
    with pytest.raises(BriskError, match="mode"):
        peak_inverse_rank(llama_model, enc, torch.tensor([1]), torch.tensor([5]), modes=("logit",))
    with pytest.raises(BriskError, match="inside each prompt"):
        peak_inverse_rank(llama_model, enc, torch.tensor([3]), torch.tensor([5]))
    with pytest.raises(BriskError, match="task token"):
        peak_inverse_rank(llama_model, enc, torch.tensor([1]), torch.tensor([500]))
    with pytest.raises(BriskError, match="after its query"):
        peak_inverse_rank(llama_model, enc, torch.tensor([2]), torch.tensor([5]), query_positions=torch.tensor([1]))
    with pytest.raises(BriskError, match="no prompts"):
        encode_prompts(None, [])
