"""ViCA (vision-only cross-attention): visual tokens skip every self-attention and MLP; text reads them only at
selected layers, through that layer's own input norm and K/V projections of the frozen projector outputs.

Two exact paths (no new weights):
- `vica_plan`: the whole stream through the executor; visual rows never query and never enter the MLP, and
  store keys/values only at the selected layers (differentiable: the reference / training path).
- `vica_prefill` (fast): the visual rows leave the stream; their K/V are computed once, only at the
  selected layers, and joined as a read-only context cache; the text stream keeps original positions.
Layer selection: leave-one-layer-out importance of text->vision attention on a trained dense model.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import torch

from brisklm.core.adapter import ModelAdapter
from brisklm.core.cache import KVCache, LayerKV
from brisklm.core.executor import execute, gather_meta, gather_rows
from brisklm.core.flops import FlopsCounter, layer_macs
from brisklm.core.generate import generate
from brisklm.core.plan import LayerStep, Plan
from brisklm.errors import BriskError
from brisklm.vision.common import VisualVisibility, pack_right, visual_row_meta
from brisklm.vision.vlm import VLMBatch, embed_multimodal, visual_mask


def check_layers(layers: Sequence[int], num_layers: int) -> tuple[int, ...]:
    """Sorted unique selected layers, or a BriskError naming the bad ones."""
    chosen = tuple(sorted(set(int(x) for x in layers)))
    bad = [x for x in chosen if not 0 <= x < num_layers]
    if bad:
        raise BriskError(f"ViCA layers {bad} are outside the model's layers [0, {num_layers})")
    return chosen


def vica_plan(model, visual: torch.Tensor, layers: Sequence[int], position_ids: torch.Tensor | None = None) -> Plan:
    """The full-stream ViCA plan: visual rows only write K/V at `layers`; text rows run every module."""
    adapter = ModelAdapter.from_model(model)
    chosen = set(check_layers(layers, adapter.num_layers))
    text = ~visual
    steps = [LayerStep(attn_rows=text, mlp_rows=text, kv_rows=text | visual if idx in chosen else text)
             for idx in range(adapter.num_layers)]
    return Plan(position_ids=position_ids, steps=steps)


@dataclass
class ViCAStream:
    """The text stream of a prompt: embeddings (B, n, D), positions, order and validity of its rows."""

    embeds: torch.Tensor
    position_ids: torch.Tensor
    order: torch.Tensor
    valid: torch.Tensor
    index: torch.Tensor  # (B, n) original rows


def split_stream(embeds: torch.Tensor, visual: torch.Tensor, position_ids: torch.Tensor,
                 attention_mask: torch.Tensor | None) -> tuple[ViCAStream, ViCAStream]:
    """Split a prompt into its text stream and its visual rows, both keeping original positions and order."""
    batch, length, _ = embeds.shape
    order = torch.arange(length, device=embeds.device).expand(batch, length)
    valid = attention_mask.bool() if attention_mask is not None else torch.ones_like(visual)
    parts = []
    for mask in (~visual, visual):
        index, ok = pack_right(mask)
        meta = gather_meta({"position": position_ids, "order": order, "valid": valid}, index, ok)
        parts.append(ViCAStream(gather_rows(embeds, index), meta["position"], meta["order"], meta["valid"], index))
    return parts[0], parts[1]


def visual_kv_cache(model, vis: ViCAStream, layers: Sequence[int], flops: FlopsCounter | None = None) -> KVCache:
    """K/V of the frozen visual rows at the selected layers only (others empty): the layer's own input norm,
    k/v projections (fused or not, with any k norm) and rotary table, as the executor computes them."""
    adapter = ModelAdapter.from_model(model)
    cache = KVCache(adapter.num_layers)
    ropes = adapter.rotaries(vis.embeds, vis.position_ids)  # rope kind -> (cos, sin)
    for idx in check_layers(layers, adapter.num_layers):
        k, v = adapter.project(idx, adapter.attn_input(idx, vis.embeds), "kv")
        k = adapter.rotate(k, *ropes[adapter.rope_kind(idx)])
        cache.layers[idx] = LayerKV(k, v, {"order": vis.order, "position": vis.position_ids, "valid": vis.valid})
        if flops is not None:  # counted as the executor counts a key/value row
            flops.add(idx, "kv_proj", 2 * int(vis.valid.sum()) * layer_macs(adapter, idx)["kv_proj"])
    return cache


def vica_forward(model, embeds: torch.Tensor, visual: torch.Tensor, position_ids: torch.Tensor,
                 attention_mask: torch.Tensor | None, layers: Sequence[int], cache: KVCache | None = None,
                 logits_rows="all", flops: FlopsCounter | None = None):
    """Fast ViCA prefill: text stream through the executor with the visual K/V as context.

    Returns (executor output, text stream, visual context cache); logits are over the text stream's rows.
    """
    text, vis = split_stream(embeds, visual, position_ids, attention_mask)
    context = visual_kv_cache(model, vis, layers, flops)
    plan = Plan(position_ids=text.position_ids, order=text.order)
    out = execute(model, inputs_embeds=text.embeds, plan=plan, cache=cache, context=[context],
                  attention_mask=text.valid, logits_rows=logits_rows, flops=flops)
    return out, text, context


@torch.no_grad()
def vica_prefill(model, batch: VLMBatch, layers: Sequence[int], cache: KVCache | None = None,
                 flops: FlopsCounter | None = None) -> tuple[torch.Tensor, KVCache]:
    """Last-position logits (B, V) with the fast ViCA path, and the visual context cache (for decoding)."""
    embeds = embed_multimodal(model, batch.input_ids, batch.pixel_values)
    visual = visual_mask(batch.input_ids, model.config.image_token_id)
    out, _, context = vica_forward(model, embeds, visual, batch.position_ids, batch.attention_mask, layers,
                                   cache=cache, logits_rows="last", flops=flops)
    return out.logits[:, -1], context


@torch.no_grad()
def vica_generate(model, batch: VLMBatch, layers: Sequence[int], max_new_tokens: int = 4,
                  cache: KVCache | None = None, **generation) -> torch.Tensor:
    """(B, new) ids: the fast ViCA prefill then decoding, both inside `brisklm.generate` with the visual K/V as a
    read-only context. Greedy, stopping at the text model's eos, unless `generation` says otherwise."""
    text_config = model.config.get_text_config()
    embeds = embed_multimodal(model, batch.input_ids, batch.pixel_values)
    visual = visual_mask(batch.input_ids, model.config.image_token_id)
    text, vis = split_stream(embeds, visual, batch.position_ids, batch.attention_mask)
    context = visual_kv_cache(model, vis, layers)
    prefill = Plan(position_ids=text.position_ids, order=text.order)
    options = {"do_sample": False, "eos_token_id": text_config.eos_token_id,
               "pad_token_id": text_config.pad_token_id, **generation}
    return generate(model, inputs_embeds=text.embeds, attention_mask=text.valid, cache=cache, context=[context],
                    plan_fn=lambda step, ids, kv: prefill if step == 0 else None, max_new_tokens=max_new_tokens,
                    **options)


def vica_layers_of(model) -> tuple[int, ...]:
    """The ViCA layer set saved in a checkpoint's config (`vica_layers`), or a BriskError."""
    layers = getattr(model.config, "vica_layers", None)
    if layers is None:
        raise BriskError("this checkpoint has no vica_layers in its config; train one with "
                         "`brisk vision train --arch vica` or pass the layers explicitly")
    return tuple(int(x) for x in layers)


# ----------------------------------------------------------------------------------------------- selection


@torch.no_grad()
def layer_importance(model, batches: Sequence[VLMBatch], answer_ids: Sequence[torch.Tensor]) -> list[float]:
    """Per layer: mean increase of the answer's loss when text cannot see visual tokens at that layer only."""
    adapter = ModelAdapter.from_model(model)
    losses = torch.zeros(adapter.num_layers + 1)
    for batch, answers in zip(batches, answer_ids):
        batch = batch.to(model.device)
        embeds = embed_multimodal(model, batch.input_ids, batch.pixel_values)
        visual = visual_mask(batch.input_ids, model.config.image_token_id)
        for idx in range(adapter.num_layers + 1):  # the last index is the dense reference
            blocked = frozenset() if idx == adapter.num_layers else frozenset({idx})
            plan = Plan(position_ids=batch.position_ids, row_meta=visual_row_meta(visual),
                        visibility=VisualVisibility(blocked, allow_sink=False))
            logits = execute(model, inputs_embeds=embeds, plan=plan, attention_mask=batch.attention_mask,
                             logits_rows="last").logits[:, -1]
            losses[idx] += float(torch.nn.functional.cross_entropy(logits.float(), answers.to(logits.device),
                                                                   reduction="sum"))
    return (losses[:-1] - losses[-1]).div(sum(len(a) for a in answer_ids)).tolist()


def select_layers(importance: Sequence[float], count: int) -> tuple[int, ...]:
    """The `count` most important layers (sorted)."""
    if not 1 <= count <= len(importance):
        raise BriskError(f"choose between 1 and {len(importance)} ViCA layers, got {count}")
    ranked = sorted(range(len(importance)), key=lambda i: -importance[i])
    return tuple(sorted(ranked[:count]))


def visual_compute_fraction(model, layers: Sequence[int]) -> float:
    """Visual-side MACs of ViCA over the dense model's, per visual token (projections + MLP; attention
    scores excluded): |S| * K/V projections / (L * (Q,K,V,O projections + SwiGLU MLP))."""
    a = ModelAdapter.from_model(model)
    d, hd = a.hidden_size, a.head_dim
    kv = 2 * d * a.num_kv_heads * hd
    dense = 2 * d * a.num_heads * hd + kv + 3 * d * a.intermediate_size
    return len(layers) * kv / (a.num_layers * dense)
