"""Selection tests that can fail: every method's choice and logits against an independent reference run through
HF's own decoder layers (eager attention, `output_attentions`-style weights), one layer at a time with a
per-layer 4D mask that hides what the method removed. No brisklm executor code is used by the reference."""

from __future__ import annotations

import torch
from transformers import LogitsProcessor

from brisklm.core.cache import KVCache
from brisklm.core.executor import execute
from brisklm.tasks import get_task
from brisklm.vision.prune import PruneSpec, decode_plan_fn, prune_generate, prune_prefill
from brisklm.vision.vica import vica_generate
from brisklm.vision.visipruner import VisiPrunerConfig
from brisklm.vision.vlm import VLMBatch, VLMProcessor, build_vlm_tokenizer, embed_multimodal, new_tiny_llava, visual_mask

TASK = get_task("shapes_vqa", image_size=32)
TOKENIZER = build_vlm_tokenizer(TASK.vocabulary())
LAYERS = 4


def _setup(n: int = 5, seed: int = 0):
    model = new_tiny_llava(TOKENIZER, seed, patch_size=8,
                           text=dict(hidden_size=64, intermediate_size=128, num_hidden_layers=LAYERS,
                                     num_attention_heads=4, num_key_value_heads=2)).eval()
    model.set_attn_implementation("eager")  # HF's own eager attention returns the weights the reference reads
    processor = VLMProcessor(TOKENIZER, model.config)
    examples = TASK.examples("test", n, seed=seed)
    batch = processor([e.meta["image"] for e in examples], [e.prompt for e in examples])
    assert int((batch.attention_mask == 0).sum()) > 0, "the prompts should differ in length (left padding)"
    return model, processor, batch


@torch.no_grad()
def hf_reference(model, embeds, mask, positions, policy=None, block=None):
    """Last-layer logits (B, T, V) from HF's decoder layers run one by one.

    policy(layer, weights (B, H, T, T), values (B, H, T, hd), gone (B, T)) -> (B, T) keys to hide from the next
    layer on; block(layer) -> (B, T, T) extra (query, key) pairs hidden at that layer only.
    """
    lm = model.model.language_model
    cfg = model.config.text_config
    batch, length, _ = embeds.shape
    heads, kv_heads = cfg.num_attention_heads, cfg.num_key_value_heads
    causal = torch.ones(length, length, dtype=torch.bool).tril()[None] & mask.bool()[:, None, :]
    eye = torch.eye(length, dtype=torch.bool)[None]
    rope = lm.rotary_emb(embeds, positions)
    hidden, gone = embeds, torch.zeros(batch, length, dtype=torch.bool)
    for idx, layer in enumerate(lm.layers):
        visible = causal & ~gone[:, None, :]
        if block is not None:
            visible = visible & ~block(idx)
        additive = torch.zeros(batch, 1, length, length).masked_fill(~(visible | eye)[:, None], float("-inf"))
        got = {}
        hooks = [layer.self_attn.register_forward_hook(lambda m, a, o: got.__setitem__("w", o[1])),
                 layer.self_attn.v_proj.register_forward_hook(lambda m, a, o: got.__setitem__("v", o))]
        try:
            hidden = layer(hidden, attention_mask=additive, position_ids=positions, position_embeddings=rope)
        finally:
            for hook in hooks:
                hook.remove()
        values = got["v"].view(batch, length, kv_heads, -1).transpose(1, 2).repeat_interleave(heads // kv_heads, 1)
        if policy is not None:
            gone = gone | policy(idx, got["w"], values, gone)
    return model.lm_head(lm.norm(hidden))


def _top_policy(stages: dict[int, int], visual, valid, query_row: int = -1, chosen: dict | None = None):
    """FastV / PyramidDrop by definition: after stage layer l, keep the k alive visual tokens with the highest
    head-mean attention from the prompt's last token."""
    def policy(idx, weights, values, gone):
        if idx not in stages:
            return torch.zeros_like(gone)
        score = weights[:, :, query_row, :].mean(1)
        alive = visual & valid & ~gone
        keep = torch.zeros_like(gone)
        for b in range(score.shape[0]):
            rows = alive[b].nonzero().flatten()
            best = rows[score[b, rows].argsort(descending=True)[:stages[idx]]]
            keep[b, best] = True
        if chosen is not None:
            chosen[idx] = keep.clone()
        return alive & ~keep
    return policy


def _kept_rows(cache: KVCache, layer: int) -> list[set[int]]:
    """Original rows of the visual keys a cache layer holds, per sample."""
    meta = cache.layers[layer].meta
    return [set(meta["row"][b][meta["valid"][b] & meta["visual"][b]].tolist()) for b in range(meta["row"].shape[0])]


def _as_sets(mask: torch.Tensor) -> list[set[int]]:
    return [set(row.nonzero().flatten().tolist()) for row in mask]


def _inputs(model, batch):
    embeds = embed_multimodal(model, batch.input_ids, batch.pixel_values)
    return embeds, visual_mask(batch.input_ids, model.config.image_token_id), batch.attention_mask.bool()


@torch.no_grad()
def test_fastv_keeps_the_top_k_of_hf_eager_attention() -> None:
    model, processor, batch = _setup()
    embeds, visual, valid = _inputs(model, batch)
    # the dense reference is HF's own forward with output_attentions (eager)
    out = model(input_ids=batch.input_ids, pixel_values=batch.pixel_values, attention_mask=batch.attention_mask,
                position_ids=batch.position_ids, output_attentions=True)
    layer, keep = 2, 5
    score = out.attentions[layer - 1][:, :, -1, :].mean(1)
    expected = [set(torch.where(visual[b], score[b], -1.0).topk(keep).indices.tolist()) for b in range(len(score))]
    worst = [set(torch.where(visual[b], score[b], 2.0).topk(keep, largest=False).indices.tolist())
             for b in range(len(score))]
    assert expected != worst
    cache = KVCache(LAYERS)
    logits, record = prune_prefill(model, batch, PruneSpec("fastv", keep=keep, layer=layer), cache=cache)
    assert _kept_rows(cache, layer) == expected
    assert [int(v.max()) for v in record.visual] == [16, 16, keep, keep]
    # the logits equal HF's layers with the other visual keys hidden from layer K on (float32, < 1e-4)
    ref = hf_reference(model, embeds, valid, batch.position_ids, _top_policy({layer - 1: keep}, visual, valid))
    assert (logits - ref[:, -1]).abs().max() < 1e-4
    dense = out.logits[:, -1]
    assert (ref[:, -1] - dense).abs().max() > 1e-3  # the selection mattered


@torch.no_grad()
def test_pyramid_drop_keeps_the_top_k_at_every_stage() -> None:
    model, processor, batch = _setup(seed=1)
    embeds, visual, valid = _inputs(model, batch)
    stages = {0: 8, 1: 4, 2: 2}
    chosen: dict[int, torch.Tensor] = {}
    ref = hf_reference(model, embeds, valid, batch.position_ids, _top_policy(stages, visual, valid, chosen=chosen))
    cache = KVCache(LAYERS)
    logits, record = prune_prefill(model, batch, PruneSpec("pdrop", keep=8, pdrop_ratio=0.5), cache=cache)
    for layer in stages:
        assert _kept_rows(cache, layer + 1) == _as_sets(chosen[layer]), layer
    assert (logits - ref[:, -1]).abs().max() < 1e-4
    # nested: each stage keeps a subset of the previous one
    assert all(a >= b for a, b in zip(_as_sets(chosen[0]), _as_sets(chosen[1])))


class _VisiReference:
    """VisiPruner's stages recomputed by their definition from HF attention weights and value states."""

    def __init__(self, config: VisiPrunerConfig, visual, valid, query_row: int = -1):
        self.c, self.visual, self.valid, self.q = config, visual, valid, query_row
        batch = visual.shape[0]
        self.fusion = [-1] * batch
        self.kept = [-1] * batch
        self.exit = [-1] * batch
        self.hits = [0] * batch
        self.min_cos: dict[int, list[float]] = {}
        self.critical: dict[int, set[int]] = {}
        self.ratios: dict[int, list[float]] = {}

    def block(self, idx):
        if idx >= self.c.shallow_layers:
            return torch.zeros(1, 1, 1, dtype=torch.bool)
        first = self.visual & ~torch.nn.functional.pad(self.visual[:, :-1], (1, 0), value=False)
        return ~self.visual[:, :, None] & (self.visual & ~first)[:, None, :]

    def __call__(self, idx, weights, values, gone):
        start = self.c.detect_from if self.c.detect_from is not None else self.c.shallow_layers
        remove = torch.zeros_like(gone)
        if idx < start or idx >= LAYERS - 1:
            return remove
        a = weights[:, :, self.q, :]  # (B, H, T)
        contrib = (a[..., None] * values).permute(0, 2, 1, 3).flatten(2)  # (B, T, H*hd)
        o = contrib.sum(1)
        alive = self.visual & self.valid & ~gone
        self.min_cos[idx] = []
        for b in range(len(self.fusion)):
            rows = alive[b].nonzero().flatten().tolist()
            if self.exit[b] >= 0 or not rows:
                self.min_cos[idx].append(1.0)
                continue
            cos = {j: float(torch.nn.functional.cosine_similarity(o[b] - contrib[b, j], o[b], dim=0)) for j in rows}
            ratio = {j: float(contrib[b, j].norm() / o[b].norm()) for j in rows}
            self.min_cos[idx].append(min(cos.values()))
            self.ratios.setdefault(idx, []).extend(ratio.values())
            if self.fusion[b] < 0:
                if min(cos.values()) < self.c.layer_threshold:
                    critical = {j for j in rows if ratio[j] >= self.c.token_threshold}
                    self.fusion[b], self.kept[b] = idx, len(critical)
                    self.critical[b] = critical
                    for j in set(rows) - critical:
                        remove[b, j] = True
                    if not critical:
                        self.exit[b] = idx
            elif self.c.deep_exit:
                if all(v >= self.c.exit_threshold for v in cos.values()):
                    self.hits[b] += 1
                if self.hits[b] >= self.c.exit_count:
                    remove[b, rows] = True
                    self.exit[b] = idx
        return remove


def _visi_config(model, batch, **kw) -> VisiPrunerConfig:
    """Thresholds placed in gaps of the reference's own statistics so that some samples fire at layer 1, the
    others later (a choice fp noise cannot flip), and the critical sets are neither empty nor everything."""
    embeds, visual, valid = _inputs(model, batch)
    probe = _VisiReference(VisiPrunerConfig(layer_threshold=-2.0, **kw), visual, valid)
    hf_reference(model, embeds, valid, batch.position_ids, probe, probe.block)
    first = sorted(probe.min_cos[1])
    i = max(range(1, len(first) - 2), key=lambda i: first[i + 1] - first[i])  # >= 2 fire at layer 1, >= 2 not
    ratios = sorted(probe.ratios[1])
    n = len(ratios)
    j = max(range(int(0.6 * n), int(0.95 * n)), key=lambda j: ratios[j + 1] - ratios[j])  # keep the top ~5-40%
    return VisiPrunerConfig(layer_threshold=(first[i] + first[i + 1]) / 2,
                            token_threshold=(ratios[j] + ratios[j + 1]) / 2, **kw)


@torch.no_grad()
def test_visipruner_fusion_layer_and_critical_set_match_a_recomputation() -> None:
    model, processor, batch = _setup(n=6, seed=2)
    embeds, visual, valid = _inputs(model, batch)
    config = _visi_config(model, batch, shallow_layers=1, exit_threshold=0.99999)
    ref = _VisiReference(config, visual, valid)
    ref_logits = hf_reference(model, embeds, valid, batch.position_ids, ref, ref.block)[:, -1]
    assert len(set(ref.fusion)) > 1, ref.fusion  # samples fire at different layers
    assert any(0 < k < 16 for k in ref.kept), ref.kept
    for mode in ("gather", "mask"):
        spec = PruneSpec("visipruner", visipruner=config)
        cache = KVCache(LAYERS)
        if mode == "mask":
            from brisklm.vision.common import PruneRecord
            from brisklm.vision.visipruner import visipruner_plan

            record = PruneRecord()
            plan = visipruner_plan(model, visual, config, mode="mask", record=record, position_ids=batch.position_ids)
            logits = execute(model, inputs_embeds=embeds, plan=plan, attention_mask=batch.attention_mask,
                             logits_rows="last").logits[:, -1]
        else:
            logits, record = prune_prefill(model, batch, spec, cache=cache)
        assert record.fusion_layer.tolist() == ref.fusion, mode
        assert record.kept.tolist() == ref.kept, mode
        assert record.exit_layer.tolist() == ref.exit, mode
        assert (logits - ref_logits).abs().max() < 1e-4, mode
        if mode == "gather":
            for b, layer in enumerate(ref.fusion):
                if layer >= 0 and ref.exit[b] < 0:  # the cache after the fusion layer holds the critical set
                    assert _kept_rows(cache, layer + 1)[b] == ref.critical[b], b
            assert record.score_macs > 0


class _Scores(LogitsProcessor):
    """Keeps every step's raw scores."""

    def __init__(self) -> None:
        self.steps: list[torch.Tensor] = []

    def __call__(self, input_ids, scores):
        self.steps.append(scores.clone())
        return scores


def _extended(model, batch: VLMBatch, token: torch.Tensor):
    ids = torch.cat([batch.input_ids, token[:, None]], 1)
    mask = torch.cat([batch.attention_mask, torch.ones_like(token[:, None])], 1)
    positions = torch.cat([batch.position_ids, batch.position_ids[:, -1:] + 1], 1)
    return embed_multimodal(model, ids, batch.pixel_values), visual_mask(ids, model.config.image_token_id), mask, positions


@torch.no_grad()
def test_pruned_cache_decoding_equals_the_masked_reference_in_logits() -> None:
    model, processor, batch = _setup(seed=3)
    for spec in (PruneSpec("fastv", keep=3, layer=2),
                 PruneSpec("visipruner", visipruner=VisiPrunerConfig(shallow_layers=1, layer_threshold=0.99999,
                                                                     token_threshold=0.1, deep_exit=False))):
        scores = _Scores()
        ids, _ = prune_generate(model, batch, spec, max_new_tokens=2, eos_token_id=None, logits_processor=[scores])
        embeds, visual, mask, positions = _extended(model, batch, ids[:, 0])
        if spec.method == "fastv":
            policy, block = _top_policy({1: 3}, visual, mask.bool(), query_row=-2), None
        else:
            policy = _VisiReference(spec.visipruner, visual, mask.bool(), query_row=-2)
            block = policy.block
        ref = hf_reference(model, embeds, mask, positions, policy, block)
        assert (scores.steps[0] - ref[:, -2]).abs().max() < 1e-4, spec.method  # the pruned prefill
        assert (scores.steps[1] - ref[:, -1]).abs().max() < 1e-4, spec.method  # decoding from the pruned cache
        dense = hf_reference(model, embeds, mask, positions)
        assert (dense[:, -1] - ref[:, -1]).abs().max() > 1e-3, spec.method  # the pruning mattered


@torch.no_grad()
def test_vica_decoding_equals_the_masked_reference_in_logits() -> None:
    """ViCA by definition on HF's layers: visual rows keep their embeddings (no attention, no MLP), text sees
    visual keys only at the selected layers."""
    model, processor, batch = _setup(seed=4)
    layers = (1, 3)
    scores = _Scores()
    ids = vica_generate(model, batch, layers, max_new_tokens=2, eos_token_id=None, logits_processor=[scores])
    embeds, visual, mask, positions = _extended(model, batch, ids[:, 0])
    lm = model.model.language_model
    originals = [layer.forward for layer in lm.layers]

    def frozen(layer, forward):
        def run(hidden, **kw):
            return torch.where(visual[..., None], embeds, forward(hidden, **kw))  # visual rows skip the layer
        return run

    for layer, forward in zip(lm.layers, originals):
        layer.forward = frozen(layer, forward)
    try:
        block = lambda idx: (~visual[:, :, None] & visual[:, None, :]) if idx not in layers else torch.zeros(1, 1, 1, dtype=torch.bool)
        ref = hf_reference(model, embeds, mask, positions, block=block)
    finally:
        for layer in lm.layers:
            del layer.forward
    assert (scores.steps[0] - ref[:, -2]).abs().max() < 1e-4
    assert (scores.steps[1] - ref[:, -1]).abs().max() < 1e-4
    dense = hf_reference(model, embeds, mask, positions)
    assert (dense[:, -1] - ref[:, -1]).abs().max() > 1e-3


def test_a_budget_above_the_visual_token_count_is_a_clear_error() -> None:
    import pytest

    from brisklm.errors import BriskError

    model, processor, batch = _setup(n=2)
    for method in ("fastv", "pdrop", "random", "visipruner"):
        with pytest.raises(BriskError, match="larger than the 16 visual tokens"):
            prune_prefill(model, batch, PruneSpec(method, keep=17))
    prune_prefill(model, batch, PruneSpec("fastv", keep=16))  # exactly all of them is allowed
