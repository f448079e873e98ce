"""Vision zoo recipes: `shapes-llava` (a tiny LLaVA trained from scratch on ShapesVQA) and `shapes-vica`.

Both train with transformers.Trainer; the loss covers the answer word and `<eos>` only.
"""

from __future__ import annotations

import tempfile
from pathlib import Path
from typing import Any, Sequence

import torch
from transformers import Trainer

from brisklm.tasks import get_task
from brisklm.tasks.base import Example
from brisklm.vision.vlm import VLMProcessor, build_vlm_tokenizer, new_tiny_llava, prefill_logits
from brisklm.zoo.architecture import count_parameters
from brisklm.zoo.registry import ZooRecipe, register
from brisklm.zoo.textlm import IGNORE, TrainOptions, training_arguments

TASK_OPTIONS: dict[str, Any] = dict(image_size=32, max_objects=3)
# 16 patch tokens (one per grid cell) + the tower's CLS token ("full"): 17 image tokens. Without the CLS token
# the from-scratch model stayed at chance for 3000 steps; the CLS summary lets it start reading the image.
VISION_SHAPE: dict[str, Any] = dict(image_size=32, patch_size=8, vision_hidden=64, vision_layers=1,
                                    select_strategy="full")
TEXT_SHAPE: dict[str, Any] = dict(hidden_size=96, num_hidden_layers=6, num_attention_heads=4, num_key_value_heads=2,
                                  intermediate_size=256)


def caption_example(example: Example) -> Example:
    """A stage-1 style caption of an example's image: every grid cell row by row, 'colour shape' or 'empty empty'."""
    from brisklm.tasks.shapes_vqa import GRID

    cells = {(o["row"], o["col"]): f"{o['color']} {o['shape']}" for o in example.meta["objects"]}
    words = " ".join(cells.get((r, c), "empty empty") for r in range(1, GRID + 1) for c in range(1, GRID + 1))
    return Example(prompt="describe", completion=words, answer=words, meta=example.meta)


def encode_vqa(processor: VLMProcessor, example: Example) -> dict[str, Any]:
    """input_ids, labels (answer + its end token only) and pixel values of one ShapesVQA example (through the
    zoo's VLMProcessor or a checkpoint's own processor)."""
    head = processor.prompt_ids(example.prompt)
    tail = processor.answer_ids(example.completion)
    return {"input_ids": head + tail, "labels": [IGNORE] * len(head) + tail,
            "pixel_values": processor.pixels(example.meta["image"])}


class VQACollator:
    """Right-pads ids (pad id) and labels (-100), builds the attention mask, stacks the pixels."""

    def __init__(self, pad_id: int) -> None:
        self.pad_id = pad_id

    def __call__(self, features: Sequence[dict]) -> dict[str, torch.Tensor]:
        length = max(len(f["input_ids"]) for f in features)
        ids = torch.full((len(features), length), self.pad_id, dtype=torch.long)
        labels = torch.full_like(ids, IGNORE)
        mask = torch.zeros_like(ids)
        for i, f in enumerate(features):
            n = len(f["input_ids"])
            ids[i, :n] = torch.tensor(f["input_ids"])
            labels[i, :n] = torch.tensor(f["labels"])
            mask[i, :n] = 1
        return {"input_ids": ids, "labels": labels, "attention_mask": mask,
                "pixel_values": torch.stack([f["pixel_values"] for f in features])}


def train_vqa(model, trainer_cls: type[Trainer], features: list[dict], options: TrainOptions, pad_id: int,
              **trainer_kw) -> dict[str, float]:
    """Fit a VLM on encoded VQA features with (a subclass of) transformers.Trainer; returns loss and time."""
    with tempfile.TemporaryDirectory() as tmp:
        trainer = trainer_cls(model=model, args=training_arguments(options, tmp), train_dataset=features,
                              data_collator=VQACollator(pad_id), **trainer_kw)
        result = trainer.train()
    model.eval()
    return {"train_loss": float(result.training_loss), "train_seconds": float(result.metrics.get("train_runtime", 0.0))}


@torch.no_grad()
def answer_accuracy(model, processor: VLMProcessor, examples: Sequence[Example], plan_fn=None,
                    batch_size: int = 64) -> dict[str, Any]:
    """Greedy first-token accuracy (answers are one word: one token on the zoo tokenizer), overall and per family.

    plan_fn(batch) -> (logits (B, V)) lets a method run its own forward; None = dense executor forward.
    """
    correct: list[bool] = []
    for start in range(0, len(examples), batch_size):
        chunk = examples[start:start + batch_size]
        batch = processor([e.meta["image"] for e in chunk], [e.prompt for e in chunk])
        logits = prefill_logits(model, batch) if plan_fn is None else plan_fn(batch)
        predicted = logits.argmax(-1).tolist()  # the answer's first token (the whole word on the zoo tokenizer)
        correct += [p == processor.answer_ids(e.answer)[0] for p, e in zip(predicted, chunk)]
    out: dict[str, Any] = {"accuracy": sum(correct) / max(len(correct), 1)}
    families = sorted({e.meta["family"] for e in examples})
    for fam in families:
        hits = [c for c, e in zip(correct, examples) if e.meta["family"] == fam]
        out[f"accuracy_{fam}"] = sum(hits) / len(hits)
    return out


def chance_accuracy(train: Sequence[Example], test: Sequence[Example]) -> float:
    """Accuracy of answering each family's most frequent training answer (the best image-blind constant)."""
    best: dict[str, str] = {}
    for fam in {e.meta["family"] for e in train}:
        answers = [e.answer for e in train if e.meta["family"] == fam]
        best[fam] = max(set(answers), key=answers.count)
    return sum(best.get(e.meta["family"]) == e.answer for e in test) / max(len(test), 1)


def training_stages(opts: dict[str, Any]) -> list[tuple[dict[str, Any], dict[str, Any]]]:
    """(task options, train options) per stage: the optional one-object warm-up, then the main stage(s)."""
    base = opts.get("task_options", TASK_OPTIONS)
    stages = []
    if opts.get("warmup"):
        warm = dict(opts["warmup"])
        stages.append(({**base, **warm.pop("task_options", {})}, warm))
    for stage in [opts["train"], *opts.get("more_stages", [])]:
        stage = dict(stage)
        stages.append(({**base, **stage.pop("task_options", {})}, stage))
    return stages


def train_llava_recipe(recipe: ZooRecipe, out_dir: Path, seed: int) -> dict[str, Any]:
    """Train the tiny LLaVA from scratch on ShapesVQA, save it with its tokenizer, measure test accuracy.

    The optional `warmup` stage (one-object colour questions) opens the image path first: trained on the full
    mixture from step 0, the LM fits the image-blind answer priors within ~50 steps, the projector outputs become
    a near-constant vector (image content <2% of their norm) and the vision tower's gradient falls to ~1e-3 of
    the LM's, so the model never starts reading the image (accuracy stayed at the prior).
    """
    opts = recipe.options
    task = get_task("shapes_vqa", **opts.get("task_options", TASK_OPTIONS))
    tokenizer = build_vlm_tokenizer(task.vocabulary())
    model = new_tiny_llava(tokenizer, seed, **opts.get("vision", VISION_SHAPE), text=opts.get("text", TEXT_SHAPE))
    processor = VLMProcessor(tokenizer, model.config)
    every = opts.get("caption_every", 0)  # every k-th training item is a caption of its image instead
    stats: dict[str, float] = {"train_loss": 0.0, "train_seconds": 0.0}
    total_steps = 0
    for stage, (task_opts, stage_opts) in enumerate(training_stages(opts)):
        # each stage: fresh examples and a fresh warmup+cosine schedule (a restart helps leave the plateau)
        stage_task = get_task("shapes_vqa", **task_opts)
        train = stage_task.examples("train", stage_opts["steps"] * stage_opts["batch_size"], seed=seed + stage)
        features = [encode_vqa(processor, caption_example(e) if every and i % every == 0 else e)
                    for i, e in enumerate(train)]
        model.train()
        result = train_vqa(model, Trainer, features, TrainOptions(seed=seed + stage, **stage_opts),
                           tokenizer.pad_token_id)
        stats = {"train_loss": result["train_loss"], "train_seconds": stats["train_seconds"] + result["train_seconds"]}
        total_steps += stage_opts["steps"]
    model.save_pretrained(out_dir)
    tokenizer.save_pretrained(out_dir)
    test = task.examples("test", opts["n_test"], seed=seed)
    quality = answer_accuracy(model, processor, test)
    chance_train = task.examples("train", 2000, seed=seed)
    return {**quality, "chance_accuracy": chance_accuracy(chance_train, test), "parameters": count_parameters(model),
            "image_tokens": processor.tokens_per_image, "train_steps": total_steps,
            "test_examples": len(test), **stats}


register(ZooRecipe(
    name="shapes-llava",
    description="tiny LLaVA (1-layer CLIP-style tower, MLP projector, 6-layer Llama) trained from scratch on ShapesVQA",
    task="shapes_vqa",
    train=train_llava_recipe,
    quality_metric="accuracy",
    options=dict(n_test=400, task_options=TASK_OPTIONS, vision=VISION_SHAPE, text=TEXT_SHAPE,
                 warmup=dict(steps=150, batch_size=32, learning_rate=2e-3, log_every=50,
                             task_options=dict(max_objects=1, families=("attribute",))),
                 train=dict(steps=750, batch_size=32, learning_rate=2e-3, log_every=50),
                 # One thread: with two, the different summation order sends this fragile run into the
                 # image-blind collapse (accuracy 0.5675, attribute 0.31, against 0.675 / 0.68 with one thread).
                 threads=1),
))


# ----------------------------------------------------------------------------------------------- ViCA


class ViCATrainer(Trainer):
    """Trainer whose loss runs the fast ViCA path (visual K/V only at `vica_layers`, text stream only)."""

    def __init__(self, *args, vica_layers: Sequence[int] = (), **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.vica_layers = tuple(vica_layers)

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        from brisklm.vision.vica import vica_forward
        from brisklm.vision.vlm import embed_multimodal, positions_from_mask, visual_mask

        ids, mask, labels = inputs["input_ids"], inputs["attention_mask"], inputs["labels"]
        embeds = embed_multimodal(model, ids, inputs["pixel_values"])
        visual = visual_mask(ids, model.config.image_token_id)
        out, text, _ = vica_forward(model, embeds, visual, positions_from_mask(mask), mask, self.vica_layers)
        text_labels = labels.gather(1, text.index).masked_fill(~text.valid, IGNORE)
        logits = out.logits[:, :-1]
        loss = torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]),
                                                 text_labels[:, 1:].reshape(-1), ignore_index=IGNORE)
        return (loss, out) if return_outputs else loss


def vica_accuracy(model, processor: VLMProcessor, examples: Sequence[Example], layers: Sequence[int]) -> dict:
    """answer_accuracy with the fast ViCA forward."""
    from brisklm.vision.vica import vica_prefill

    return answer_accuracy(model, processor, examples, plan_fn=lambda b: vica_prefill(model, b, layers)[0])


def calibration_batches(processor: VLMProcessor, examples: Sequence[Example], batch_size: int = 64):
    """Prompt batches and their answer-word ids, for leave-one-layer-out importance."""
    batches, answers = [], []
    for start in range(0, len(examples), batch_size):
        chunk = examples[start:start + batch_size]
        batches.append(processor([e.meta["image"] for e in chunk], [e.prompt for e in chunk]))
        answers.append(torch.tensor([processor.answer_ids(e.answer)[0] for e in chunk]))
    return batches, answers


def train_vica_model(base: str, out_dir: Path, seed: int, num_layers: int | None, steps: int, lr: float,
                     batch_size: int = 32, layers: Sequence[int] | None = None, n_calib: int = 256,
                     n_test: int = 400) -> dict[str, Any]:
    """Fine-tune a dense LLaVA into ViCA: pick layers by leave-one-layer-out importance, train the ViCA path."""
    from brisklm.vision.vica import layer_importance, select_layers, visual_compute_fraction
    from brisklm.vision.vlm import load_vlm

    loaded = load_vlm(base, seed)
    model, processor = loaded.model, loaded.processor
    task = get_task("shapes_vqa", **TASK_OPTIONS)
    importance: list[float] = []
    if layers is None:
        calib = task.examples("train", n_calib, seed=seed + 1000)
        importance = layer_importance(model, *calibration_batches(processor, calib))
        layers = select_layers(importance, num_layers or max(1, model.config.text_config.num_hidden_layers // 4))
    layers = tuple(sorted(int(x) for x in layers))
    test = task.examples("test", n_test, seed=seed)
    training_free = vica_accuracy(model, processor, test, layers)["accuracy"]
    train = task.examples("train", steps * batch_size, seed=seed + 1)
    features = [encode_vqa(processor, e) for e in train]
    model.train()
    options = TrainOptions(seed=seed, steps=steps, batch_size=batch_size, learning_rate=lr, log_every=50)
    stats = train_vqa(model, ViCATrainer, features, options, processor.tokenizer.pad_token_id, vica_layers=layers)
    model.config.vica_layers = list(layers)
    model.save_pretrained(out_dir)
    processor.save_pretrained(out_dir)  # the tokenizer, or the checkpoint's whole processor
    quality = vica_accuracy(model, processor, test, layers)
    return {**quality, "vica_layers": list(layers), "layer_importance": importance,
            "training_free_accuracy": training_free, "base": base,
            "visual_compute_fraction": visual_compute_fraction(model, layers), "train_steps": steps, **stats}


def train_vica_recipe(recipe: ZooRecipe, out_dir: Path, seed: int) -> dict[str, Any]:
    """Zoo recipe: ViCA fine-tuned from the dense shapes-llava."""
    opts = recipe.options
    return train_vica_model(opts["base"], out_dir, seed, opts["num_layers"], opts["steps"], opts["learning_rate"])


register(ZooRecipe(
    name="shapes-vica",
    description="ViCA (vision-only cross-attention at 2 of 6 layers) fine-tuned from shapes-llava",
    task="shapes_vqa",
    train=train_vica_recipe,
    quality_metric="accuracy",
    options=dict(base="shapes-llava", num_layers=2, steps=200, learning_rate=1e-3),
))


def train_dense_model(out_dir: Path, seed: int, steps: int | None = None, lr: float | None = None) -> dict[str, Any]:
    """`brisk vision train --arch dense`: the shapes-llava recipe into a chosen folder (steps/lr overridable)."""
    import copy

    from brisklm.zoo.registry import get_recipe

    recipe = copy.deepcopy(get_recipe("shapes-llava"))
    if steps is not None:
        recipe.options["train"]["steps"] = steps
        recipe.options["n_train"] = steps * recipe.options["train"]["batch_size"]
    if lr is not None:
        recipe.options["train"]["learning_rate"] = lr
    return recipe.train(recipe, Path(out_dir), seed)


# ----------------------------------------------------------------------------------------------- late fusion

from brisklm.vision.staged import train_late_recipe  # noqa: E402 (staged.py uses this module's helpers)

register(ZooRecipe(
    name="shapes-llava-late",
    description="shapes-llava fine-tuned to read the image from layer 2 on (decoy images at layers 0-1 in training), "
                "so that visual-token selection matters",
    task="shapes_vqa",
    train=train_late_recipe,
    quality_metric="accuracy",
    options=dict(base="shapes-llava", vision_from=2, steps=300, batch_size=32, learning_rate=1e-3, n_test=400,
                 threads=1),
))
