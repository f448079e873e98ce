"""`shapes-llava-late`: the zoo LLaVA fine-tuned so that its text reads the image from layer `vision_from` on.

Why: trained from scratch, `shapes-llava` fuses the whole image into the text at layer 0 (dropping every visual
token after layer 0 keeps its accuracy), so no visual-token selection can matter on it. Simply hiding visual keys
from text at the shallow layers in training does not undo that: the layer-0 weights that read the image get no
gradient and still read it at inference (measured: with every visual token dropped after layer 0 it still
scored 0.621 against dense 0.668). Here text queries at layers < `vision_from` instead see a decoy, the visual
tokens of another image of the batch (same positions), and the real image only from `vision_from` on. Reading
the image early then costs loss, so the shallow layers learn to ignore visual keys and the model reads the image
later, as LLaVA does (a batch of one would be its own decoy; the zoo recipe trains full batches of 32).
At inference there is no decoy: every method runs the ordinary dense forward.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from transformers import Trainer

from brisklm.core.cache import RowMeta
from brisklm.core.executor import execute
from brisklm.core.plan import Plan
from brisklm.tasks import get_task
from brisklm.vision.common import visual_row_meta
from brisklm.vision.vlm import (
    embed_multimodal,
    image_features,
    load_vlm,
    positions_from_mask,
    visual_mask,
)
from brisklm.zoo.registry import ZooRecipe
from brisklm.zoo.textlm import IGNORE, TrainOptions


class DecoyVisibility:
    """Causal attention over [decoy image rows | prompt rows]: text queries see the decoy image instead of the real
    one at layers < vision_from and the real one from then on; decoy rows see only decoy rows; image rows never
    see decoys."""

    def __init__(self, vision_from: int) -> None:
        self.vision_from = vision_from

    def __call__(self, query: RowMeta, key: RowMeta, layer_idx: int) -> torch.Tensor:
        visible = query["order"][:, :, None] >= key["order"][:, None, :]
        decoy_key, real_key = key["decoy"][:, None, :], key["visual"][:, None, :]
        text_query = (~query["decoy"] & ~query["visual"])[:, :, None]
        allowed = torch.where(text_query, ~real_key, ~decoy_key) if layer_idx < self.vision_from else ~decoy_key
        return visible & torch.where(query["decoy"][:, :, None], decoy_key, allowed)


def decoy_inputs(model, inputs: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, Plan]:
    """(embeds, attention mask, labels, plan) of a batch with each sample's decoy (the previous sample's image
    tokens, at the real image's positions) prepended."""
    ids, mask, labels, pixels = inputs["input_ids"], inputs["attention_mask"], inputs["labels"], inputs["pixel_values"]
    embeds = embed_multimodal(model, ids, pixels)
    visual = visual_mask(ids, model.config.image_token_id)
    positions = positions_from_mask(mask)
    decoy = image_features(model, pixels.roll(1, dims=0)).to(embeds.dtype)
    batch, n = ids.shape[0], decoy.shape[1]
    ones = torch.ones(batch, n, dtype=torch.bool, device=ids.device)
    meta = visual_row_meta(torch.cat([~ones, visual], 1))
    meta["decoy"] = torch.cat([ones, torch.zeros_like(visual)], 1)
    plan = Plan(position_ids=torch.cat([positions[visual].view(batch, n), positions], 1), row_meta=meta,
                visibility=DecoyVisibility(model.config.decoy_vision_from))
    return (torch.cat([decoy, embeds], 1), torch.cat([ones.to(mask.dtype), mask], 1),
            torch.cat([torch.full((batch, n), IGNORE, dtype=labels.dtype, device=labels.device), labels], 1), plan)


class DecoyTrainer(Trainer):
    """Trainer whose loss runs the executor on the decoy batch (see the module docstring)."""

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        embeds, mask, labels, plan = decoy_inputs(model, inputs)
        out = execute(model, inputs_embeds=embeds, plan=plan, attention_mask=mask, logits_rows="all")
        logits = out.logits[:, :-1]
        loss = torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), labels[:, 1:].reshape(-1),
                                                 ignore_index=IGNORE)
        return (loss, out) if return_outputs else loss


def train_late_recipe(recipe: ZooRecipe, out_dir: Path, seed: int) -> dict[str, Any]:
    """Fine-tune the `base` zoo LLaVA with decoys below `vision_from`, save it, measure dense accuracy."""
    from brisklm.vision.zoo import TASK_OPTIONS, answer_accuracy, chance_accuracy, encode_vqa, train_vqa

    opts = recipe.options
    loaded = load_vlm(opts["base"], seed)
    model, processor = loaded.model, loaded.processor
    model.config.decoy_vision_from = int(opts["vision_from"])
    task = get_task("shapes_vqa", **TASK_OPTIONS)
    train = task.examples("train", opts["steps"] * opts["batch_size"], seed=seed + 100)
    features = [encode_vqa(processor, e) for e in train]
    model.train()
    options = TrainOptions(seed=seed, steps=opts["steps"], batch_size=opts["batch_size"],
                           learning_rate=opts["learning_rate"], log_every=50)
    stats = train_vqa(model, DecoyTrainer, features, options, processor.tokenizer.pad_token_id)
    model.save_pretrained(out_dir)
    processor.save_pretrained(out_dir)
    test = task.examples("test", opts["n_test"], seed=seed)
    quality = answer_accuracy(model, processor, test)
    return {**quality, "chance_accuracy": chance_accuracy(task.examples("train", 2000, seed=seed), test),
            "base": opts["base"], "vision_from": opts["vision_from"], "train_steps": opts["steps"],
            "image_tokens": processor.tokens_per_image, "test_examples": len(test), **stats}
