"""Evaluate a pruning method on ShapesVQA: accuracy, visual tokens per layer, analytic FLOPs, stage statistics."""

from __future__ import annotations

from typing import Any, Sequence

import torch

from brisklm.core.adapter import ModelAdapter
from brisklm.tasks.base import Example
from brisklm.vision.common import flops_ratio
from brisklm.vision.prune import PruneSpec, prune_prefill
from brisklm.vision.vlm import LoadedVLM, embed_multimodal


@torch.no_grad()
def evaluate_method(loaded: LoadedVLM, examples: Sequence[Example], spec: PruneSpec, batch_size: int = 64,
                    progress=None) -> dict[str, Any]:
    """Accuracy of greedy first answer tokens under `spec`, with T_eq, the analytic FLOPs ratio and VisiPruner stages.

    FLOPs convention: LM prefill only, per layer 4nd^2 + 2n^2d + 3ndm MACs with each sample's real n_l
    (SparseVLM's count), summed over layers and samples, divided by the same sum for the dense prompt.
    """
    model, processor = loaded.model, loaded.processor
    adapter = ModelAdapter.from_model(model)
    correct: list[bool] = []
    ratios, teq, fusion, kept, exits, weights = [], [], [], [], [], []
    chunks = range(0, len(examples), batch_size)
    for start in (progress(chunks, desc=spec.method, leave=False) if progress else chunks):
        chunk = examples[start:start + batch_size]
        batch = processor([e.meta["image"] for e in chunk], [e.prompt for e in chunk])
        logits, record = prune_prefill(model, batch, spec)
        predicted = logits.argmax(-1).tolist()  # the answer's first token (the whole word on the zoo tokenizer)
        correct += [p == processor.answer_ids(e.answer)[0] for p, e in zip(predicted, chunk)]
        ratios.append(flops_ratio(record, adapter, batch.attention_mask.sum(dim=1)))
        teq.append(record.equivalent_tokens())
        weights.append(len(chunk))
        if record.fusion_layer is not None:
            fusion.append(record.fusion_layer)
            kept.append(record.kept)
            exits.append(record.exit_layer)
    w = torch.tensor(weights, dtype=torch.float64)
    out: dict[str, Any] = {
        "accuracy": sum(correct) / len(correct),
        "equivalent_tokens": float((torch.tensor(teq, dtype=torch.float64) * w).sum() / w.sum()),
        "flops_ratio": float((torch.tensor(ratios, dtype=torch.float64) * w).sum() / w.sum()),
        "visual_tokens": processor.tokens_per_image,
    }
    for fam in sorted({e.meta["family"] for e in examples}):
        hits = [c for c, e in zip(correct, examples) if e.meta["family"] == fam]
        out[f"accuracy_{fam}"] = sum(hits) / len(hits)
    if fusion:
        f, k, x = torch.cat(fusion), torch.cat(kept), torch.cat(exits)
        fired = f >= 0
        out["fired_fraction"] = float(fired.float().mean())
        out["mean_fusion_layer"] = float(f[fired].float().mean()) if bool(fired.any()) else -1.0
        out["mean_kept"] = float(k[fired].float().mean()) if bool(fired.any()) else -1.0
        out["mean_exit_layer"] = float(x[x >= 0].float().mean()) if bool((x >= 0).any()) else -1.0
        out["fusion_layer_hist"] = torch.bincount(f + 1, minlength=adapter.num_layers + 1).tolist()
        out["kept_hist"] = torch.bincount(k[fired], minlength=processor.tokens_per_image + 1).tolist() if bool(fired.any()) else []
    return out


@torch.no_grad()
def layer_profile(loaded: LoadedVLM, examples: Sequence[Example], batch_size: int = 64) -> dict[str, list[float]]:
    """Per layer of the dense model (last prompt token): the removal-cosine drop max_j(1 - cos(o - c_j, o)) over
    visual tokens, the attention mass on visual tokens, and the mass on the first visual token (sink)."""
    from brisklm.core.executor import execute
    from brisklm.core.plan import Plan
    from brisklm.vision.common import VisualVisibility, last_token_attention, removal_cosine, visual_row_meta
    from brisklm.vision.vlm import visual_mask

    model, processor = loaded.model, loaded.processor
    adapter = ModelAdapter.from_model(model)
    sums = {k: torch.zeros(adapter.num_layers, dtype=torch.float64)
            for k in ("cos_drop", "visual_mass", "sink_mass", "value_norm_top", "value_norm_rest")}
    count = 0
    for start in range(0, len(examples), batch_size):
        chunk = examples[start:start + batch_size]
        batch = processor([e.meta["image"] for e in chunk], [e.prompt for e in chunk])
        visual = visual_mask(batch.input_ids, model.config.image_token_id)
        meta = visual_row_meta(visual)
        embeds = embed_multimodal(model, batch.input_ids, batch.pixel_values)
        out = execute(model, inputs_embeds=embeds, plan=Plan(position_ids=batch.position_ids, row_meta=meta),
                      attention_mask=batch.attention_mask, logits_rows="none", record_hidden=True)
        vis = VisualVisibility()
        for idx in range(adapter.num_layers):
            scores = last_token_attention(adapter, idx, out.layer_hidden[idx], out.layer_meta[idx], vis)
            cos, _ = removal_cosine(scores.contributions())
            drop = (1 - cos).masked_fill(~visual, 0.0).max(dim=1).values
            mass = scores.head_mean()
            sums["cos_drop"][idx] += drop.double().sum()
            sums["visual_mass"][idx] += (mass * visual).sum(dim=1).double().sum()
            sums["sink_mass"][idx] += (mass * meta["sink"]).sum(dim=1).double().sum()
            # sink signature: L1 norm of V (summed over heads) of the most-attended visual token vs the others
            vnorm = scores.values.abs().sum(dim=(1, 3))  # (B, T)
            top = mass.masked_fill(~visual, -1.0).argmax(dim=1, keepdim=True)
            is_top = torch.zeros_like(visual).scatter_(1, top, True)
            sums["value_norm_top"][idx] += (vnorm * is_top).sum(dim=1).double().sum()
            rest = visual & ~is_top
            sums["value_norm_rest"][idx] += ((vnorm * rest).sum(dim=1) / rest.sum(dim=1).clamp(min=1)).double().sum()
        count += len(chunk)
    return {k: (v / max(count, 1)).tolist() for k, v in sums.items()}
