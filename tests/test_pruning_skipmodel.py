"""`load_skipgpt`: a SkipGPT checkpoint whose forward and generation really skip, on real-convention fixtures."""

import pytest
import torch

from brisklm.core import FlopsCounter, execute
from brisklm.errors import BriskError
from brisklm.pruning import SkipGPTModel, load_skipgpt, save_skipgpt
from brisklm.pruning.gating import masked_forward
from brisklm.pruning.routers import RouterSet
from brisklm.pruning.sparse import sparse_forward
from brisklm.zoo.store import load

TOL = 1e-4


def random_routers(model, seed=0, scale=3.0):
    """Large random weights, zero bias: about half the tokens skip each module."""
    torch.manual_seed(seed)
    r = RouterSet(model.config.num_hidden_layers, model.config.hidden_size)
    with torch.no_grad():
        for router in list(r.attn) + list(r.mlp):
            router.out.weight.normal_(0, scale)
            router.out.bias.zero_()
    return r.eval()


@pytest.fixture(scope="module")
def skip_folders(fixture_checkpoints, tmp_path_factory):
    def folder(style):
        loaded = load(str(fixture_checkpoints(style)))
        out = tmp_path_factory.mktemp(f"skip-{style}")
        return save_skipgpt(out, loaded.model, loaded.tokenizer, random_routers(loaded.model), {"test": True})
    return folder


@torch.no_grad()
@pytest.mark.parametrize("style", ["qwen2", "gemma3", "phi3"])
def test_forward_skips_and_equals_the_gated_model(style, skip_folders):
    skip = load_skipgpt(skip_folders(style))
    assert isinstance(skip, SkipGPTModel)
    x = torch.randint(5, skip.config.vocab_size, (2, 12), generator=torch.Generator().manual_seed(0))
    logits = skip(x).logits
    ref, _ = masked_forward(skip.model, skip.routers, x)
    assert (logits - ref).abs().max().item() < TOL
    assert (logits - skip.model(x).logits).abs().max().item() > 1e-3  # negative control: skipping changes it
    rates = skip.skip_rates()
    assert 0.2 < rates["attn"] < 0.8 and 0.2 < rates["mlp"] < 0.8
    dense, sparse = FlopsCounter(), FlopsCounter()
    execute(skip.model, x, flops=dense)
    sparse_forward(skip.model, skip.routers, x, flops=sparse)
    assert sparse.total() < 0.8 * dense.total()  # skipped modules do no work
    labels = x.clone()
    loss = skip(x, labels=labels).loss
    expected = torch.nn.functional.cross_entropy(ref[:, :-1].flatten(0, 1), x[:, 1:].flatten())
    assert abs(loss.item() - expected.item()) < 1e-4


@torch.no_grad()
@pytest.mark.parametrize("style", ["qwen2", "phi3"])
@pytest.mark.parametrize("policy", ["full", "evict", "reuse"])
def test_generate_equals_routed_forward_step_by_step(style, policy, skip_folders):
    """Greedy decoding through the generation loop (KV cache, routers per step) == argmax of the routed forward
    over the growing sequence, under every KV policy."""
    skip = load_skipgpt(skip_folders(style), kv_policy=policy)
    prompt = torch.randint(5, skip.config.vocab_size, (1, 7), generator=torch.Generator().manual_seed(1))
    out = skip.generate(prompt, max_new_tokens=5, do_sample=False, eos_token_id=None, pad_token_id=0)
    assert out.shape == (1, 12) and len(skip.records) == 5  # prefill + 4 decode steps went through the routers
    seq = prompt
    for _ in range(5):
        seq = torch.cat([seq, skip(seq).logits[:, -1].argmax(-1, keepdim=True)], 1)
    assert torch.equal(out, seq)


def test_load_skipgpt_bad_input(fixture_checkpoints, skip_folders, tmp_path):
    with pytest.raises(BriskError, match="has no SkipGPT routers"):
        load_skipgpt(fixture_checkpoints("llama3"))
    with pytest.raises(BriskError, match="KV policy"):
        load_skipgpt(skip_folders("qwen2"), kv_policy="drop")
    loaded = load(str(fixture_checkpoints("llama3")))
    with pytest.raises(BriskError, match="routers are for 4 layers"):
        SkipGPTModel(loaded.model, RouterSet(4, 64))
