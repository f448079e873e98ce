"""Every adapter family (llama, qwen2/3, mistral, gemma2/3, phi3) through the one executor loop.

The tiny models (conftest) have windows shorter than the sequences, alternating sliding/global layers,
soft-caps that change the logits, Gemma3's two rotary bases and Phi3's fused projections + partial rotary.
"""

import copy

import pytest
import torch
import torch.distributed as dist
from torch import nn
from transformers import (
    DynamicCache,
    Gemma3Config,
    Gemma3ForConditionalGeneration,
    Gemma3TextConfig,
    GPT2Config,
    GPT2LMHeadModel,
    SiglipVisionConfig,
)

from brisklm.core import (
    SUPPORTED_FAMILIES,
    FlopsCounter,
    KVCache,
    LayerStep,
    MatrixVisibility,
    ModelAdapter,
    Plan,
    dense_forward_flops,
    execute,
)
from brisklm.core import adapter as adapter_module
from brisklm.core.flops import layer_macs
from brisklm.errors import PlanError, UnsupportedModelError

from conftest import FAMILIES, family_config_kwargs, tiny_model

TOL = 1e-4
WINDOWED = ["qwen2", "qwen3", "mistral", "gemma2", "gemma3", "phi3"]


def ids(batch=2, length=14, seed=1):
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, 97, (batch, length), generator=g)


def test_every_family_is_supported_and_tested():
    assert set(SUPPORTED_FAMILIES) == set(FAMILIES) == {"llama", "qwen2", "qwen3", "mistral", "gemma2", "gemma3", "phi3"}


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_sliding_window_per_layer_matches_the_config(family):
    model = tiny_model(family, layers=4)
    adapter = ModelAdapter.from_model(model)
    windows = [adapter.sliding_window(i) for i in range(4)]
    cfg = model.config
    if family == "llama":
        expected = [None] * 4
    elif family in ("mistral", "phi3"):
        expected = [cfg.sliding_window] * 4
    else:  # qwen2/3 (from max_window_layers) and gemma2/3 declare layer_types
        expected = [cfg.sliding_window if t == "sliding_attention" else None for t in cfg.layer_types]
    assert windows == expected
    if family != "llama":
        assert any(w is not None and w < 14 for w in windows)  # the tests' sequences outrun the window


@torch.no_grad()
@pytest.mark.parametrize("family", WINDOWED)
def test_noop_with_a_config_dynamic_cache_token_by_token(family):
    """A DynamicCache built from the config trims sliding layers to the window; the executor still matches."""
    model = tiny_model(family)
    x = ids()
    ref = model(x).logits
    cache = DynamicCache(config=model.config)
    chunks = [(0, 6)] + [(i, i + 1) for i in range(6, 10)] + [(10, 14)]
    parts = [execute(model, x[:, a:b], cache=cache).logits for a, b in chunks]
    assert (torch.cat(parts, 1) - ref).abs().max().item() < TOL


@torch.no_grad()
@pytest.mark.parametrize("family", ["mistral", "gemma2", "phi3"])
@pytest.mark.parametrize("cache_kind", ["dynamic", "dynamic-config", "brisk"])
def test_left_padded_windowed_decoding_matches_hf(family, cache_kind):
    """Prefill then token-by-token decoding of a left-padded batch equals HF's padded forward (real rows).

    A DynamicCache keeps the pad keys (and, without the config, keys beyond the window): the executor keeps
    their padding flags and positions on the cache, so later steps neither see pads nor outrun the window."""
    model = tiny_model(family)
    x = ids(length=14)
    mask = torch.ones(2, 14, dtype=torch.long)
    mask[1, :4] = 0
    positions = (mask.cumsum(1) - 1).clamp(min=0)
    ref = model(x, attention_mask=mask, position_ids=positions).logits
    cache = {"dynamic": DynamicCache(), "dynamic-config": DynamicCache(config=model.config),
             "brisk": KVCache(model.config.num_hidden_layers)}[cache_kind]
    parts = [execute(model, x[:, a:b], cache=cache, attention_mask=mask[:, a:b],
                     plan=Plan(position_ids=positions[:, a:b])).logits
             for a, b in [(0, 8)] + [(i, i + 1) for i in range(8, 14)]]
    real = mask.bool()
    assert (torch.cat(parts, 1)[real] - ref[real]).abs().max().item() < TOL


@torch.no_grad()
@pytest.mark.parametrize("family", WINDOWED)
def test_window_composes_with_a_custom_rule(family):
    """A MatrixVisibility equal to plain causal still gets the model's sliding window: equals HF."""
    model = tiny_model(family)
    x = ids(length=16)
    ref = model(x).logits
    causal = MatrixVisibility(torch.tril(torch.ones(2, 16, 16, dtype=torch.bool)))
    out = execute(model, x, plan=Plan(visibility=causal)).logits
    assert (out - ref).abs().max().item() < TOL
    # The same rule decoded in chunks with a brisklm cache (keys keep their order) also matches.
    cache = KVCache(model.config.num_hidden_layers)
    parts = [execute(model, x[:, a:b], cache=cache, plan=Plan(visibility=causal)).logits
             for a, b in [(0, 7), (7, 8), (8, 16)]]
    assert (torch.cat(parts, 1) - ref).abs().max().item() < TOL
    # A plan may opt out on purpose; then the window is gone and the output differs.
    free = execute(model, x, plan=Plan(visibility=causal, apply_window=False)).logits
    assert (free - ref).abs().max().item() > 1e-2


class _TwoGroups:
    """Same-group causal by order; group-1 rows (a target) also see every group-0 row (a source)."""

    def __call__(self, q, k, layer_idx):
        same = (q["group"][:, :, None] == k["group"][:, None, :]) & (k["order"][:, None, :] <= q["order"][:, :, None])
        return same | ((q["group"][:, :, None] == 1) & (k["group"][:, None, :] == 0))


@torch.no_grad()
@pytest.mark.parametrize("family", ["mistral", "gemma2", "gemma3"])
def test_streamed_groups_equal_their_one_pass_under_a_window(family):
    """A GPE-like plan: a source cache, then target rows numbered on their own (order and position 0..),
    decoded one by one with the source as context, equals the one masked pass over [source; target]."""
    model = tiny_model(family)
    x = ids(batch=1, length=14)
    s_len = 8
    group = torch.tensor([[0] * s_len + [1] * 6])
    positions = torch.tensor([list(range(s_len)) + list(range(6))])
    full = execute(model, x, plan=Plan(position_ids=positions, visibility=_TwoGroups(), row_meta={"group": group}))
    layers = model.config.num_hidden_layers
    source = KVCache(layers)
    execute(model, x[:, :s_len], cache=source, plan=Plan(position_ids=positions[:, :s_len], order=positions[:, :s_len],
                                                         visibility=_TwoGroups(), row_meta={"group": group[:, :s_len]}))
    target, parts = KVCache(layers), []
    for j in range(6):
        at = torch.tensor([[j]])
        plan = Plan(position_ids=at, order=at, visibility=_TwoGroups(), row_meta={"group": torch.ones_like(at)})
        parts.append(execute(model, x[:, s_len + j:s_len + j + 1], cache=target, context=[source], plan=plan).logits)
    assert (torch.cat(parts, 1) - full.logits[:, s_len:]).abs().max().item() < TOL
    unwindowed = execute(model, x, plan=Plan(position_ids=positions, visibility=_TwoGroups(), row_meta={"group": group},
                                             apply_window=False))
    assert (unwindowed.logits - full.logits).abs().max().item() > 1e-2  # the window really cut keys


@torch.no_grad()
def test_opting_out_of_the_window_equals_the_model_without_one():
    model = tiny_model("mistral")
    x = ids(length=16)
    unwindowed = copy.deepcopy(model)
    unwindowed.config.sliding_window = None
    causal = MatrixVisibility(torch.tril(torch.ones(2, 16, 16, dtype=torch.bool)))
    out = execute(model, x, plan=Plan(visibility=causal, apply_window=False)).logits
    assert (out - unwindowed(x).logits).abs().max().item() < TOL


@torch.no_grad()
@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_noop_with_padding_mask(family):
    """Left padding: real tokens of a padded row equal the unpadded row run alone."""
    model = tiny_model(family)
    x = ids(batch=2, length=12)
    mask = torch.ones(2, 12, dtype=torch.long)
    mask[1, :3] = 0
    positions = (mask.cumsum(1) - 1).clamp(min=0)
    order = positions.clone()
    out = execute(model, x, attention_mask=mask, plan=Plan(position_ids=positions, order=order)).logits
    alone = model(x[1:, 3:]).logits
    assert (out[1, 3:] - alone[0]).abs().max().item() < TOL


@torch.no_grad()
@pytest.mark.parametrize("family,field,off", [
    ("gemma2", "attn_logit_softcapping", None),
    ("gemma2", "final_logit_softcapping", None),
    ("gemma3", "final_logit_softcapping", None),
    ("gemma2", "query_pre_attn_scalar", 16),
    ("phi3", "partial_rotary_factor", 1.0),
])
def test_the_family_features_change_the_output(family, field, off):
    """Negative controls: each feature the no-op tests cover really moves the HF logits."""
    model = tiny_model(family)
    config = copy.deepcopy(model.config)
    if field == "partial_rotary_factor":
        config.rope_parameters[field] = off
    else:
        setattr(config, field, off)
    other = model.__class__(config).eval()
    other.load_state_dict(model.state_dict())
    x = ids()
    assert (other(x).logits - model(x).logits).abs().max().item() > 10 * TOL
    assert (execute(other, x).logits - other(x).logits).abs().max().item() < TOL


@torch.no_grad()
def test_gemma3_uses_the_local_rotary_base_on_sliding_layers(monkeypatch):
    model = tiny_model("gemma3")
    x = ids()
    ref = model(x).logits
    adapter = ModelAdapter.from_model(model)
    assert {adapter.rope_kind(i) for i in range(3)} == {"sliding_attention", "full_attention"}
    monkeypatch.setattr(adapter_module.ModelAdapter, "rope_kind", lambda self, i: "full_attention")
    assert (execute(model, x).logits - ref).abs().max().item() > 1e-2
    with pytest.raises(PlanError, match="layer_idx"):
        adapter.rotary(torch.zeros(1, 2, 64), torch.arange(2)[None])


@torch.no_grad()
def test_gemma3_multimodal_text_part():
    torch.manual_seed(0)
    text = Gemma3TextConfig(vocab_size=97, hidden_size=64, intermediate_size=128, num_hidden_layers=3,
                            num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
                            **family_config_kwargs("gemma3", 3))
    vision = SiglipVisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2,
                                image_size=28, patch_size=14)
    config = Gemma3Config(text_config=text.to_dict(), vision_config=vision.to_dict(), mm_tokens_per_image=4,
                          image_token_index=96, boi_token_index=94, eoi_token_index=95)
    model = Gemma3ForConditionalGeneration(config).eval()
    assert ModelAdapter.from_model(model).family == "gemma3"
    x = torch.randint(0, 90, (2, 14))
    assert (execute(model, x).logits - model(input_ids=x).logits).abs().max().item() < TOL


@torch.no_grad()
def test_phi3_flops_count_the_fused_projections_by_shape():
    phi3, llama = tiny_model("phi3"), tiny_model("llama")
    a_phi, a_llama = ModelAdapter.from_model(phi3), ModelAdapter.from_model(llama)
    assert layer_macs(a_phi, 0) == layer_macs(a_llama, 0) == {
        "q_proj": 64 * 64, "kv_proj": 64 * 2 * 32, "o_proj": 64 * 64, "mlp": 3 * 64 * 128}
    counter = FlopsCounter()
    execute(phi3, ids(batch=1, length=5), flops=counter)  # length 5 = phi3's window: all causal pairs visible
    assert counter.total() == dense_forward_flops(a_phi, 5)
    half = FlopsCounter()
    rows = torch.arange(5)[None] % 2 == 0
    execute(phi3, ids(batch=1, length=5), plan=Plan(steps=[LayerStep(attn_rows=rows)] * 3), flops=half)
    assert half.by_module()["q_proj"] == 3 * 3 * 2 * 64 * 64
    assert half.by_module()["kv_proj"] == counter.by_module()["kv_proj"]


@torch.no_grad()
@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_bfloat16_executor_tracks_hf_bfloat16(family):
    """In bf16 the executor stays as close to HF's bf16 forward as HF's bf16 is to fp32 (stated: 2x + 0.02)."""
    model = tiny_model(family)
    x = ids()
    fp32 = model(x).logits
    low = copy.deepcopy(model).to(torch.bfloat16)
    hf = low(x).logits.float()
    ours = execute(low, x).logits.float()
    hf_err = (hf - fp32).abs().max().item()
    assert (ours - hf).abs().max().item() <= 2 * hf_err + 0.02
    assert (ours - fp32).abs().max().item() <= 2 * hf_err + 0.02


class _FakeEngine:
    """Stands for a DeepSpeed-style engine: holds the model as `.module`, has its own non-HF config."""

    def __init__(self, module: nn.Module) -> None:
        self.module = module
        self.config = {"zero_optimization": {"stage": 2}}


@torch.no_grad()
def test_wrapped_models_are_unwrapped(tmp_path):
    model = tiny_model("gemma2")
    x = ids()
    ref = execute(model, x).logits
    fake = _FakeEngine(model)
    assert ModelAdapter.from_model(fake).model is model
    assert torch.equal(execute(fake, x).logits, ref)
    if dist.is_initialized():
        pytest.skip("a process group is already running in this session")
    dist.init_process_group("gloo", store=dist.FileStore(str(tmp_path / "store"), 1), rank=0, world_size=1)
    try:
        ddp = nn.parallel.DistributedDataParallel(model)
        assert ModelAdapter.from_model(ddp).model is model
        assert torch.equal(execute(ddp, x).logits, ref)
        assert torch.equal(execute(_FakeEngine(ddp), x).logits, ref)  # wrappers of wrappers
    finally:
        dist.destroy_process_group()


def test_unsupported_family_names_every_supported_one_in_one_line():
    model = GPT2LMHeadModel(GPT2Config(n_layer=1, n_embd=32, n_head=2, vocab_size=50))
    with pytest.raises(UnsupportedModelError) as err:
        ModelAdapter.from_model(model)
    message = str(err.value)
    assert "\n" not in message and "'gpt2'" in message
    assert all(f in message for f in SUPPORTED_FAMILIES)
