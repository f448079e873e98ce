"""Exactness of the vision methods on small random LLaVA models (no zoo training needed)."""

from __future__ import annotations

import pytest
import torch

from brisklm.core.cache import KVCache
from brisklm.core.executor import execute
from brisklm.errors import BriskError
from brisklm.tasks import get_task
from brisklm.vision import visipruner as vp
from brisklm.vision.baselines import fastv_plan, pdrop_plan, pdrop_stages, random_plan
from brisklm.vision.common import LastTokenAttention, PruneRecord, removal_cosine
from brisklm.vision.prune import PruneSpec, prune_generate, prune_prefill
from brisklm.vision.vica import layer_importance, select_layers, vica_generate, vica_plan, vica_prefill
from brisklm.vision.visipruner import VisiPrunerConfig, visipruner_plan
from brisklm.vision.vlm import (
    VLMProcessor,
    build_vlm_tokenizer,
    embed_multimodal,
    load_vlm,
    new_tiny_llava,
    prefill_logits,
    visual_mask,
)

TASK = get_task("shapes_vqa", image_size=32)
TOKENIZER = build_vlm_tokenizer(TASK.vocabulary())


def _setup(patch_size: int = 8, layers: int = 4, n: int = 5, seed: int = 0):
    model = new_tiny_llava(TOKENIZER, seed, patch_size=patch_size,
                           text=dict(hidden_size=64, intermediate_size=128, num_hidden_layers=layers,
                                     num_attention_heads=4, num_key_value_heads=2)).eval()
    processor = VLMProcessor(TOKENIZER, model.config)
    examples = TASK.examples("test", n, seed=seed)
    batch = processor([e.meta["image"] for e in examples], [e.prompt for e in examples])
    return model, processor, batch


def _hf_last(model, batch):
    return model(input_ids=batch.input_ids, pixel_values=batch.pixel_values, attention_mask=batch.attention_mask,
                 position_ids=batch.position_ids).logits[:, -1]


@torch.no_grad()
def test_noop_prune_plans_equal_dense_model() -> None:
    model, processor, batch = _setup()
    ref = _hf_last(model, batch)
    assert (prefill_logits(model, batch) - ref).abs().max() < 1e-5
    n_vis = processor.tokens_per_image
    never = VisiPrunerConfig(shallow_layers=0, layer_threshold=-2.0)
    for spec in (PruneSpec("dense"), PruneSpec("fastv", keep=n_vis), PruneSpec("random", keep=n_vis),
                 PruneSpec("visipruner", visipruner=never)):
        logits, record = prune_prefill(model, batch, spec)
        assert (logits - ref).abs().max() < 1e-5, spec.method
        assert all(int(v.min()) == n_vis for v in record.visual)
    # and a real prune changes the logits (the check above can fail)
    pruned, _ = prune_prefill(model, batch, PruneSpec("fastv", keep=1))
    assert (pruned - ref).abs().max() > 1e-4


@torch.no_grad()
def test_visipruner_masked_equals_gathered_with_several_images() -> None:
    model, processor, batch = _setup(n=6)
    visual = visual_mask(batch.input_ids, model.config.image_token_id)
    embeds = embed_multimodal(model, batch.input_ids, batch.pixel_values)
    config = VisiPrunerConfig(shallow_layers=1, layer_threshold=0.9999, token_threshold=0.2, exit_threshold=0.99999)
    outs, records = {}, {}
    for mode in ("gather", "mask"):
        records[mode] = PruneRecord()
        plan = visipruner_plan(model, visual, config, mode=mode, record=records[mode], position_ids=batch.position_ids)
        outs[mode] = execute(model, inputs_embeds=embeds, plan=plan, attention_mask=batch.attention_mask,
                             logits_rows="last").logits[:, -1]
    assert (outs["gather"] - outs["mask"]).abs().max() < 1e-5
    g, m = records["gather"], records["mask"]
    assert torch.equal(g.fusion_layer, m.fusion_layer) and torch.equal(g.kept, m.kept)
    assert bool((g.fusion_layer >= 0).all()), "the thresholds were chosen so that every sample prunes"
    assert int(g.kept.min()) < processor.tokens_per_image
    # the gathered stream really shrank after the fusion layer
    after = int(g.fusion_layer.max()) + 1
    assert int(g.rows[after].max()) < int(g.rows[0].max())


@torch.no_grad()
def test_pruned_cache_decoding_equals_full_recompute() -> None:
    """Decoding from the pruned cache equals re-running the pruned prefill on the extended prompt."""
    model, processor, batch = _setup(n=3)
    spec = PruneSpec("fastv", keep=3, layer=2)
    cache = KVCache(model.config.text_config.num_hidden_layers)
    ids, _ = prune_generate(model, batch, spec, max_new_tokens=2, cache=cache, eos_token_id=None)
    # reference: append the first generated token and recompute with the same selection rule
    from brisklm.vision.vlm import VLMBatch

    ext = VLMBatch(torch.cat([batch.input_ids, ids[:, :1]], 1), torch.cat([batch.attention_mask, torch.ones_like(ids[:, :1])], 1),
                   torch.cat([batch.position_ids, batch.position_ids[:, -1:] + 1], 1), batch.pixel_values)
    ref_logits, _ = prune_prefill(model, ext, PruneSpec("dense"))
    # reference: the extended prompt, full recompute, with the visual rows the prefill dropped hidden at layers >= K
    from brisklm.core.plan import Plan
    from brisklm.vision.common import VisualVisibility, visual_row_meta

    visual = visual_mask(ext.input_ids, model.config.image_token_id)
    kept = torch.zeros_like(visual)
    kept.scatter_(1, cache.layers[-1].meta["row"], cache.layers[-1].meta["valid"] & cache.layers[-1].meta["visual"])

    class Hide(VisualVisibility):
        def __call__(self, q, k, layer_idx):
            vis = super().__call__(q, k, layer_idx)
            if layer_idx >= spec.layer:
                gone = k["visual"] & ~kept.gather(1, k["row"])
                vis = vis & ~gone[:, None, :]
            return vis

    embeds = embed_multimodal(model, ext.input_ids, ext.pixel_values)
    plan = Plan(position_ids=ext.position_ids, visibility=Hide(), row_meta=visual_row_meta(visual))
    out = execute(model, inputs_embeds=embeds, plan=plan, attention_mask=ext.attention_mask, logits_rows="last")
    assert torch.equal(out.logits[:, -1].argmax(-1), ids[:, 1])
    assert not torch.allclose(ref_logits, out.logits[:, -1], atol=1e-4)  # the pruning mattered


@torch.no_grad()
def test_baselines_keep_exact_budgets_per_sample() -> None:
    model, processor, batch = _setup(n=6)
    visual = visual_mask(batch.input_ids, model.config.image_token_id)
    embeds = embed_multimodal(model, batch.input_ids, batch.pixel_values)
    n_vis = processor.tokens_per_image
    selections = {}
    for name, make in (("fastv", lambda r: fastv_plan(model, visual, 5, 2, record=r, position_ids=batch.position_ids)),
                       ("random", lambda r: random_plan(model, visual, 5, 2, seed=3, record=r,
                                                        position_ids=batch.position_ids))):
        record = PruneRecord()
        cache = KVCache(4)
        execute(model, inputs_embeds=embeds, plan=make(record), cache=cache, attention_mask=batch.attention_mask,
                logits_rows="last")
        assert [int(v.min()) for v in record.visual] == [n_vis, n_vis, 5, 5]
        assert [int(v.max()) for v in record.visual] == [n_vis, n_vis, 5, 5]
        meta = cache.layers[3].meta
        kept_rows = [sorted(meta["row"][b][meta["valid"][b] & meta["visual"][b]].tolist()) for b in range(6)]
        assert all(len(r) == 5 for r in kept_rows)
        selections[name] = kept_rows
    # different images -> different FastV selections (relative to each sample's first image token)
    starts = visual.float().argmax(dim=1)
    rel = {tuple(x - int(s) for x in rows) for rows, s in zip(selections["fastv"], starts)}
    assert len(rel) > 1
    record = PruneRecord()
    execute(model, inputs_embeds=embeds, plan=pdrop_plan(model, visual, 8, 0.5, record=record,
                                                          position_ids=batch.position_ids),
            attention_mask=batch.attention_mask, logits_rows="last")
    assert pdrop_stages(4, 8) == [(0, 8), (1, 4), (2, 2)]
    assert [int(v.max()) for v in record.visual] == [n_vis, 8, 4, 2]
    assert [int(v.min()) for v in record.visual] == [n_vis, 8, 4, 2]
    with pytest.raises(BriskError):
        fastv_plan(model, visual, 3, 0)


def test_removal_cosine_and_relative_threshold_on_constructed_contributions() -> None:
    contrib = torch.tensor([[[1.0, 0.0], [0.0, 0.01], [0.0, 0.02], [5.0, 5.0]]])
    cos, ratio = removal_cosine(contrib)
    o = contrib.sum(1)[0]
    for j in range(4):
        expected = torch.nn.functional.cosine_similarity(o - contrib[0, j], o, dim=0)
        assert abs(float(cos[0, j]) - float(expected)) < 1e-6
    assert abs(float(ratio[0, 3]) - float(contrib[0, 3].norm() / o.norm())) < 1e-6
    cos2, ratio2 = removal_cosine(1000.0 * contrib)  # relative: invariant to the scale of the values
    assert torch.allclose(cos, cos2, atol=1e-6) and torch.allclose(ratio, ratio2, atol=1e-6)


@torch.no_grad()
def test_fusion_layer_detection_on_constructed_attention(monkeypatch) -> None:
    """A scorer that makes layers 0-1 vision-passive and layer 2 depend on one visual token: VisiPruner must
    fire at layer 2, keep exactly that token (relative threshold, any value scale) and drop the rest."""
    model, processor, batch = _setup(n=2)
    visual = visual_mask(batch.input_ids, model.config.image_token_id)
    embeds = embed_multimodal(model, batch.input_ids, batch.pixel_values)
    first = visual.float().argmax(dim=1)
    critical = first + 3

    def run(scale: float):
        def fake(tap, adapter, layer_idx, visibility):
            meta = tap.k_meta
            batch_size, length = meta["valid"].shape
            probs = torch.full((batch_size, 4, length), 1e-4)
            probs[:, :, -1] = 1.0  # the last token attends to itself
            hit = meta["row"] == critical[:, None]
            values = torch.zeros(batch_size, 4, length, 16)
            values[..., 0] = scale  # every key's value points one way ...
            values[..., 1] = scale * hit[:, None, :].float()  # ... the critical token's also another way
            values[..., 0] -= scale * hit[:, None, :].float()
            if layer_idx == 2:
                probs = probs + 0.5 * hit[:, None, :].float()
            return LastTokenAttention(probs, values)

        monkeypatch.setattr(vp, "tap_attention", fake)
        record = PruneRecord()
        cfg = VisiPrunerConfig(shallow_layers=1, layer_threshold=0.995, token_threshold=0.2, deep_exit=False)
        plan = visipruner_plan(model, visual, cfg, record=record, position_ids=batch.position_ids)
        cache = KVCache(4)
        execute(model, inputs_embeds=embeds, plan=plan, cache=cache, attention_mask=batch.attention_mask,
                logits_rows="last")
        return record, cache

    for scale in (1.0, 1000.0):
        record, cache = run(scale)
        assert record.fusion_layer.tolist() == [2, 2]
        assert record.kept.tolist() == [1, 1]
        meta = cache.layers[3].meta
        for b in range(2):
            kept = meta["row"][b][meta["valid"][b] & meta["visual"][b]].tolist()
            assert kept == [int(critical[b])]
        assert [int(v.max()) for v in record.visual] == [16, 16, 16, 1]


def test_vica_fast_cached_path_equals_training_path() -> None:
    model, processor, batch = _setup(n=4, layers=4)
    layers = (1, 3)
    embeds = embed_multimodal(model, batch.input_ids, batch.pixel_values)
    visual = visual_mask(batch.input_ids, model.config.image_token_id)
    plan = vica_plan(model, visual, layers, batch.position_ids)
    ref = execute(model, inputs_embeds=embeds, plan=plan, attention_mask=batch.attention_mask, logits_rows="last")
    ref.logits[:, -1].sum().backward()  # the training path is differentiable down to the vision tower
    assert model.model.vision_tower.embeddings.patch_embedding.weight.grad is not None
    with torch.no_grad():
        cache = KVCache(4)
        fast, context = vica_prefill(model, batch, layers, cache=cache)
        assert (fast - ref.logits[:, -1]).abs().max() < 1e-5
        # visual K/V exist only at the selected layers; the text cache holds no visual rows
        assert [context.layers[i].keys is not None for i in range(4)] == [False, True, False, True]
        n_text = int((~visual).sum(1).max())
        assert all(cache.layers[i].length == n_text for i in range(4))
        ids = vica_generate(model, batch, layers, max_new_tokens=2, eos_token_id=None)
        assert torch.equal(ids[:, 0], fast.argmax(-1))  # generate's prefill is the fast path
        # decoding equals re-running the training path on the extended prompt
        ext_ids = torch.cat([batch.input_ids, ids[:, :1]], 1)
        ext_mask = torch.cat([batch.attention_mask, torch.ones_like(ids[:, :1])], 1)
        ext_pos = torch.cat([batch.position_ids, batch.position_ids[:, -1:] + 1], 1)
        ext_emb = embed_multimodal(model, ext_ids, batch.pixel_values)
        plan = vica_plan(model, visual_mask(ext_ids, model.config.image_token_id), layers, ext_pos)
        ref2 = execute(model, inputs_embeds=ext_emb, plan=plan, attention_mask=ext_mask, logits_rows="last")
        assert torch.equal(ref2.logits[:, -1].argmax(-1), ids[:, 1])
        # ViCA differs from dense (text does not see the image at layers 0 and 2)
        assert (fast - prefill_logits(model, batch)).abs().max() > 1e-4


@torch.no_grad()
def test_layer_importance_and_selection() -> None:
    model, processor, batch = _setup(n=4)
    answers = torch.tensor([processor.answer_ids(e.answer)[0] for e in TASK.examples("test", 4, seed=0)])
    importance = layer_importance(model, [batch], [answers])
    assert len(importance) == 4 and any(abs(x) > 0 for x in importance)
    chosen = select_layers(importance, 2)
    assert len(chosen) == 2 and all(importance[c] >= sorted(importance)[-2] for c in chosen)
    with pytest.raises(BriskError):
        select_layers(importance, 0)


@torch.no_grad()
def test_saved_checkpoint_with_other_image_token_count(tmp_path) -> None:
    """A LLaVA with a different tower (patch 4 -> 64 image tokens, 3 layers) saved and reloaded works through
    every API: nothing assumes a token count or position."""
    model, _, _ = _setup(patch_size=4, layers=3, seed=1)
    model.save_pretrained(tmp_path)
    TOKENIZER.save_pretrained(tmp_path)
    loaded = load_vlm(str(tmp_path))
    assert loaded.processor.tokens_per_image == 64
    examples = TASK.examples("test", 3, seed=2)
    batch = loaded.processor([e.meta["image"] for e in examples], [e.prompt for e in examples])
    assert int(visual_mask(batch.input_ids, loaded.model.config.image_token_id).sum(1).max()) == 64
    ref = _hf_last(loaded.model, batch)
    assert (prefill_logits(loaded.model, batch) - ref).abs().max() < 1e-5
    logits, record = prune_prefill(loaded.model, batch, PruneSpec("fastv", keep=7, layer=1))
    assert [int(v.max()) for v in record.visual] == [64, 7, 7]
    logits, record = prune_prefill(loaded.model, batch, PruneSpec("pdrop", keep=20))
    assert int(record.visual[-1].max()) < 20
    cfg = VisiPrunerConfig(shallow_layers=1, layer_threshold=0.99999, token_threshold=0.01)
    logits, record = prune_prefill(loaded.model, batch, PruneSpec("visipruner", visipruner=cfg))
    assert torch.isfinite(logits).all()
    fast, _ = vica_prefill(loaded.model, batch, (0, 2))
    assert fast.shape == ref.shape
    with pytest.raises(BriskError):
        embed_multimodal(loaded.model, batch.input_ids[:, 10:], batch.pixel_values)  # cut image tokens: clear error
