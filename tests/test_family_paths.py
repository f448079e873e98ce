"""The method paths outside the executor that read a layer's pieces (PIR attn_contrib, last-token attention
scoring, ViCA's visual K/V, width pruning) on every supported family, against HF's own attention and cache."""

import pytest
import torch
from transformers import AutoModelForCausalLM, DynamicCache, LlavaForConditionalGeneration

from brisklm.analysis.lens import pad_right, run_recorded, token_rank
from brisklm.analysis.pir import attn_contrib_logits, peak_inverse_rank
from brisklm.core import execute
from brisklm.core.adapter import ModelAdapter
from brisklm.core.cache import KVCache
from brisklm.core.plan import CausalVisibility
from brisklm.pruning.calibration import CalibData
from brisklm.pruning.width import (
    activation_norms,
    decoder_linear_params,
    prune_structured,
    prune_unstructured,
    zero_fraction,
)
from brisklm.tasks import get_task
from brisklm.vision.common import last_token_attention
from brisklm.vision.vica import split_stream, vica_plan, vica_prefill, visual_kv_cache
from brisklm.vision.vlm import (
    IMAGE_TOKEN,
    VLMProcessor,
    build_vlm_tokenizer,
    embed_multimodal,
    tiny_llava_config,
    visual_mask,
)

from conftest import FAMILIES, family_config_kwargs, random_calibration, tiny_model

TOL = 1e-5
ALL = sorted(FAMILIES)


def _close(a: torch.Tensor, b: torch.Tensor, tol: float = TOL) -> bool:
    return a.shape == b.shape and (a - b).abs().max().item() < tol


def _hf_eager(model, input_ids, attention_mask=None):
    """HF's own forward with explicit (eager) attention: its attention probabilities and a full K/V cache."""
    model.set_attn_implementation("eager")
    cache = DynamicCache()  # no config: every layer keeps every key (the windows are still applied by the masks)
    out = model(input_ids, attention_mask=attention_mask, output_attentions=True, output_hidden_states=True,
                past_key_values=cache, use_cache=True)
    return out, cache


# ----------------------------------------------------------------------------------------------- PIR attn_contrib


@torch.no_grad()
@pytest.mark.parametrize("family", ALL)
def test_pir_attn_contrib_equals_a_reference_from_hf_attention(family):
    """The label's attention-weighted values (HF's probs and cached values) through the layer's output: equal."""
    model = tiny_model(family)
    g = torch.Generator().manual_seed(3)
    rows = [torch.randint(3, 97, (n,), generator=g).tolist() for n in (11, 9)]  # right padding on row 1
    enc = pad_right(rows, 0)
    query = enc.lengths - 1
    label = query - 2  # inside every fixture's window, so the weight is not zero
    task = torch.tensor([5, 7])
    adapter = ModelAdapter.from_model(model)
    out = run_recorded(model, enc, record_attention=True)
    logits = attn_contrib_logits(adapter, out.layer_hidden, out.attentions, label, query)  # (L, B, V)
    result = peak_inverse_rank(model, enc, label, task, modes=("attn_contrib",))["attn_contrib"]

    hf, cache = _hf_eager(model, enc.input_ids, enc.attention_mask)
    b = torch.arange(2)
    groups = adapter.num_heads // adapter.num_kv_heads
    refs = []
    for layer in range(adapter.num_layers):
        probs = hf.attentions[layer]  # (B, H, T, T), HF's own softmax (windows, soft-caps, scaling included)
        values = cache.layers[layer].values.repeat_interleave(groups, dim=1)  # (B, H, T, hd)
        weight = probs[b, :, query, label]  # (B, H)
        mixed = (weight[..., None] * values[b, :, label]).reshape(2, 1, -1)
        refs.append(adapter.logits(adapter.attn_output(layer, mixed))[:, 0])
        assert weight.abs().min() > 0
        if layer + 1 < adapter.num_layers:  # HF's whole attention output through attn_output gives HF's next state
            context = torch.matmul(probs, values).transpose(1, 2).reshape(2, probs.shape[2], -1)
            mid = hf.hidden_states[layer] + adapter.attn_output(layer, context)
            nxt = mid + adapter.mlp(layer, mid)
            real = enc.attention_mask.bool()
            assert _close(nxt[real], hf.hidden_states[layer + 1][real], 1e-4)
    ref = torch.stack(refs)
    assert _close(logits, ref, 1e-4)
    assert torch.equal(result.ranks, token_rank(ref, task[None].expand(adapter.num_layers, -1)).T)


@torch.no_grad()
@pytest.mark.parametrize("family", ALL)
def test_last_token_attention_equals_hf_attention(family):
    """Vision scoring's recomputed last row (norm, q/k/v, q/k norms, rotary table, window, soft-cap) = HF's."""
    model = tiny_model(family)
    x = torch.randint(3, 97, (2, 12), generator=torch.Generator().manual_seed(4))
    adapter = ModelAdapter.from_model(model)
    out = execute(model, x, record_hidden=True, logits_rows="none")
    hf, cache = _hf_eager(model, x)
    groups = adapter.num_heads // adapter.num_kv_heads
    for layer in range(adapter.num_layers):
        scored = last_token_attention(adapter, layer, out.layer_hidden[layer], out.layer_meta[layer],
                                      CausalVisibility())
        assert _close(scored.probs, hf.attentions[layer][:, :, -1]), layer
        assert _close(scored.values, cache.layers[layer].values.repeat_interleave(groups, dim=1)), layer


# ----------------------------------------------------------------------------------------------- ViCA visual K/V

TASK = get_task("shapes_vqa", image_size=32)
TOKENIZER = build_vlm_tokenizer(TASK.vocabulary())


def _family_llava(family: str, layers: int = 3) -> LlavaForConditionalGeneration:
    """A tiny random LLaVA whose text model is `family` (its fixture settings: windows, soft-caps, rotary)."""
    ids = dict(pad_token_id=TOKENIZER.pad_token_id, bos_token_id=TOKENIZER.bos_token_id,
               eos_token_id=TOKENIZER.eos_token_id)
    config = tiny_llava_config(len(TOKENIZER), TOKENIZER.convert_tokens_to_ids(IMAGE_TOKEN), patch_size=8, **ids)
    config_cls, _ = FAMILIES[family]
    config.text_config = config_cls(vocab_size=len(TOKENIZER), hidden_size=64, intermediate_size=128,
                                    num_hidden_layers=layers, num_attention_heads=4, num_key_value_heads=2,
                                    max_position_embeddings=256, tie_word_embeddings=False,
                                    **{**family_config_kwargs(family, layers), **ids})
    torch.manual_seed(0)
    return LlavaForConditionalGeneration(config).eval()


@torch.no_grad()
@pytest.mark.parametrize("family", ALL)
def test_vica_visual_kv_equals_executor_and_hf(family):
    """ViCA's visual K/V at every layer (sliding and full, both rotary tables) = the executor's for those rows;
    at layer 0 (whose input is the embeddings for every row) = HF's own cache; the fast path = the plan path."""
    model = _family_llava(family)
    assert ModelAdapter.from_model(model).family == family
    processor = VLMProcessor(TOKENIZER, model.config)
    examples = TASK.examples("test", 3, seed=0)
    batch = processor([e.meta["image"] for e in examples], [e.prompt for e in examples])
    embeds = embed_multimodal(model, batch.input_ids, batch.pixel_values)
    visual = visual_mask(batch.input_ids, model.config.image_token_id)
    layers = tuple(range(3))
    _, vis = split_stream(embeds, visual, batch.position_ids, batch.attention_mask)
    context = visual_kv_cache(model, vis, layers)

    cache = KVCache(3)
    plan = vica_plan(model, visual, layers, batch.position_ids)
    ref = execute(model, inputs_embeds=embeds, plan=plan, cache=cache, attention_mask=batch.attention_mask,
                  logits_rows="last").logits[:, -1]
    hf = model(input_ids=batch.input_ids, pixel_values=batch.pixel_values, attention_mask=batch.attention_mask,
               position_ids=batch.position_ids, past_key_values=DynamicCache(), use_cache=True)
    rows = vis.index[:, None, :, None]  # (B, 1, n, 1): the visual rows of the full sequence
    for layer in layers:
        stored = cache.layers[layer]
        assert torch.equal(stored.meta["row"][0], torch.arange(batch.input_ids.shape[1]))  # every row, in order
        for name in ("keys", "values"):
            mine = getattr(context.layers[layer], name)
            theirs = getattr(stored, name).gather(2, rows.expand(-1, mine.shape[1], -1, mine.shape[3]))
            assert _close(mine, theirs), (layer, name)
            if layer == 0:
                hf_kv = getattr(hf.past_key_values.layers[0], name)
                assert _close(mine, hf_kv.gather(2, rows.expand(-1, mine.shape[1], -1, mine.shape[3]))), name
    fast, _ = vica_prefill(model, batch, layers)
    assert _close(fast, ref)


# ----------------------------------------------------------------------------------------------- width pruning


def _calibration(n=6, length=16, seed=0) -> CalibData:
    return random_calibration(n, length, seed)


def _layer_linear_params(model) -> int:
    return sum(m.weight.numel() for layer in model.model.layers for m in layer.modules()
               if isinstance(m, torch.nn.Linear))


@torch.no_grad()
@pytest.mark.parametrize("family", ALL)
def test_width_pruning_on_every_family(family, tmp_path):
    """Unstructured prunes every projection (fused ones too); structured shrinks heads and channels (splitting
    fused weights) and equals the original with the removed channels' down and heads' o columns zeroed."""
    model = tiny_model(family)
    x = torch.randint(3, 97, (2, 11), generator=torch.Generator().manual_seed(5))
    base = model(x).logits
    assert decoder_linear_params(model) == _layer_linear_params(model)  # qkv_proj / gate_up_proj included
    norms = activation_norms(model, _calibration(), 0)

    # A run that rounds to no removal is the original model.
    same = prune_unstructured(model, 1e-4, "magnitude")
    assert torch.equal(same(x).logits, base)
    same, report = prune_structured(model, 1e-4, norms, heads_per_group=0)
    assert report["mlp_channels_removed"] == 0 and torch.equal(same(x).logits, base)

    for method in ("magnitude", "wanda"):
        pruned = prune_unstructured(model, 0.4, method, norms if method == "wanda" else None)
        assert abs(zero_fraction(pruned) - 0.4) < 0.02
        logits = pruned(x).logits
        assert logits.shape == base.shape and bool(logits.isfinite().all())
        assert (logits - base).abs().max() > 1e-3

    pruned, report = prune_structured(model, 0.3, norms, heads_per_group=1)
    hd = ModelAdapter.from_model(model).head_dim
    m = report["intermediate_size"]
    assert pruned.config.num_attention_heads == 2 and pruned.config.num_key_value_heads == 2 and m < 128
    assert abs(report["realised_sparsity"] - 0.3) < 0.02
    assert decoder_linear_params(pruned) == _layer_linear_params(pruned)
    for layer in pruned.model.layers:
        assert layer.self_attn.o_proj.weight.shape == (64, 2 * hd) and layer.mlp.down_proj.weight.shape == (64, m)
        produced = sum(lin.out_features for lin in layer.self_attn.children() if isinstance(lin, torch.nn.Linear))
        assert produced == 64 + (2 + 2 + 2) * hd  # o_proj + q (2 heads) + k + v (2 KV heads each)
        produced = sum(lin.out_features for lin in layer.mlp.children() if isinstance(lin, torch.nn.Linear))
        assert produced == 64 + 2 * m  # down + gate + up (fused or not)
    logits = pruned(x).logits
    assert logits.shape == base.shape and bool(logits.isfinite().all())
    ref = tiny_model(family)  # the same weights, full shapes, removed channels' / heads' outputs zeroed
    for lo, lp in zip(ref.model.layers, pruned.model.layers):
        for orig, kept in ((lo.mlp.down_proj, lp.mlp.down_proj), (lo.self_attn.o_proj, lp.self_attn.o_proj)):
            kept_cols = {tuple(c.tolist()) for c in kept.weight.T}
            for j, col in enumerate(orig.weight.T):
                if tuple(col.tolist()) not in kept_cols:
                    orig.weight[:, j] = 0
    expected = ref(x).logits
    assert (logits - expected).abs().max().item() < 1e-4
    assert (execute(pruned, x).logits - expected).abs().max().item() < 1e-4
    pruned.save_pretrained(tmp_path)
    again = AutoModelForCausalLM.from_pretrained(tmp_path)
    assert (again(x).logits - expected).abs().max().item() < 1e-4


@pytest.mark.parametrize("family", ALL)
def test_skipgpt_lora_targets_exist_in_every_family(family):
    """SkipGPT's LoRA targets (q/v/gate) are renamed to the family's fused projections where it fuses them."""
    from peft import LoraConfig, get_peft_model

    from brisklm.pruning.skipgpt import SkipGPTOptions, lora_target_modules

    model = tiny_model(family, layers=2)
    targets = lora_target_modules(model, SkipGPTOptions().lora_targets)
    present = {name.rsplit(".", 1)[-1] for name, module in model.named_modules() if isinstance(module, torch.nn.Linear)}
    assert set(targets) <= present and len(targets) == (2 if family == "phi3" else 3)
    wrapped = get_peft_model(model, LoraConfig(r=2, lora_alpha=4, target_modules=targets))
    assert sum(1 for name, _ in wrapped.named_modules() if name.endswith("lora_A")) == 2 * len(targets)
