"""Qwen2-VL / Qwen2.5-VL through the core executor: dynamic-resolution inputs and M-RoPE positions.

Each image becomes `t * (h / merge) * (w / merge)` image tokens, read from the image processor's
`image_grid_thw` (its size follows the image's, within min/max pixels). Rotary positions have three axes
(temporal, height, width): text rows count up on all three; an image's rows take the image's start position plus
their grid row (height axis) and column (width axis), and the text after the image continues from the start plus
the larger of the image's merged height and width. `mrope_positions` computes them from the ids and grids; the
executor's rotary takes them through `Plan.rope_position_ids`, so its one layer loop, and every plan that keeps
or drops rows (cos/sin are gathered with the rows), stays unchanged.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import torch

from brisklm.core.generate import left_pad
from brisklm.core.text import TextLayer
from brisklm.errors import BriskError
from brisklm.vision.processor import chat_frame

MODEL_TYPES = ("qwen2_vl", "qwen2_5_vl")
IMAGE_PLACEHOLDER = "<|vision_start|><|image_pad|><|vision_end|>"


def is_qwen2vl(config_or_type: Any) -> bool:
    """True for a Qwen2-VL / Qwen2.5-VL config (or model_type string)."""
    model_type = config_or_type if isinstance(config_or_type, str) else getattr(config_or_type, "model_type", None)
    return model_type in MODEL_TYPES


def mrope_positions(input_ids: torch.Tensor, attention_mask: torch.Tensor, image_grid_thw: torch.Tensor,
                    image_token_id: int, merge_size: int) -> torch.Tensor:
    """(3, B, T) M-RoPE positions of left- or right-padded prompts (padding gets 0 on every axis).

    Images are consumed from `image_grid_thw` (num_images, 3) in row-major order; a run of image tokens may hold
    several images back to back (each gets its own grid). Counts that do not match the grids are a BriskError.
    """
    batch, length = input_ids.shape
    out = torch.zeros(3, batch, length, dtype=torch.long)
    grids = [tuple(int(v) for v in g) for g in image_grid_thw.tolist()] if image_grid_thw is not None else []
    next_grid = 0
    ids_cpu, mask_cpu = input_ids.cpu(), attention_mask.bool().cpu()
    for b in range(batch):
        cols = mask_cpu[b].nonzero(as_tuple=True)[0]
        is_image = (ids_cpu[b, cols] == int(image_token_id)).tolist()
        row: list[torch.Tensor] = []
        cur, i = 0, 0
        while i < len(is_image):
            if not is_image[i]:
                j = i
                while j < len(is_image) and not is_image[j]:
                    j += 1
                row.append(torch.arange(cur, cur + j - i).expand(3, -1))
                cur += j - i
                i = j
                continue
            if next_grid >= len(grids):
                raise BriskError(f"row {b} holds more image tokens than the {len(grids)} image grid(s) give; "
                                 "expand each image placeholder with this model's processor")
            t, h, w = grids[next_grid]
            next_grid += 1
            gh, gw = h // merge_size, w // merge_size
            count = t * gh * gw
            if i + count > len(is_image) or not all(is_image[i:i + count]):
                raise BriskError(f"row {b}: an image of grid {t}x{h}x{w} needs {count} image tokens in a row; "
                                 "expand each image placeholder with this model's processor")
            tt, hh, ww = torch.meshgrid(torch.arange(t), torch.arange(gh), torch.arange(gw), indexing="ij")
            row.append(torch.stack([tt.flatten(), hh.flatten(), ww.flatten()]) + cur)
            cur += max(gh, gw)
            i += count
        if row:
            out[:, b, cols] = torch.cat(row, dim=1)
    if next_grid != len(grids):
        raise BriskError(f"{len(grids)} image(s) given but the prompts hold image tokens for {next_grid}; "
                         "pass one image per image placeholder")
    return out.to(input_ids.device)


@dataclass
class QwenVLBatch:
    """Left-padded prompts with their images' patches and grids, and both kinds of positions.

    position_ids (B, T): one position per row, the M-RoPE temporal axis (text rows: their text position), so a
    decode step continues at the last prompt position + 1, as HF's rope deltas do. rope_position_ids (3, B, T):
    what the rotary reads.
    """

    input_ids: torch.Tensor
    attention_mask: torch.Tensor
    position_ids: torch.Tensor
    pixel_values: torch.Tensor
    image_grid_thw: torch.Tensor
    rope_position_ids: torch.Tensor

    def to(self, device: torch.device | str) -> "QwenVLBatch":
        """The same batch with every tensor on `device`."""
        return QwenVLBatch(*(t.to(device) for t in (self.input_ids, self.attention_mask, self.position_ids,
                                                     self.pixel_values, self.image_grid_thw, self.rope_position_ids)))


class QwenVLProcessor:
    """Model inputs for a Qwen2-VL folder: its image processor (dynamic resolution) and its tokenizer's template.

    Does what `Qwen2VLProcessor` does for images (one `<|image_pad|>` per image expanded to the image's merged
    patch count), without its video half (which needs torchvision)."""

    def __init__(self, tokenizer, image_processor, config, generation_config=None, chat_template: bool = True,
                 system_prompt: str | None = None, device: torch.device | str = "cpu") -> None:
        self.tokenizer, self.image_processor, self.device = tokenizer, image_processor, torch.device(device)
        self.text = TextLayer.from_tokenizer(tokenizer, config.get_text_config(), generation_config, chat_template,
                                             system_prompt)
        self.template = bool(chat_template and getattr(tokenizer, "chat_template", None))
        self.system_prompt = system_prompt
        self.image_token = "<|image_pad|>"
        self.image_token_id = int(config.image_token_id)
        if tokenizer.convert_tokens_to_ids(self.image_token) != self.image_token_id:
            raise BriskError(f"the tokenizer's {self.image_token} is not the model's image_token_id "
                             f"{self.image_token_id}; save the tokenizer that belongs to this model")
        self.merge_size = int(getattr(image_processor, "merge_size", None) or config.vision_config.spatial_merge_size)
        factor = int(image_processor.patch_size) * self.merge_size
        size = getattr(image_processor, "size", None) or {}
        longest = size.get("longest_edge") if hasattr(size, "get") else getattr(size, "longest_edge", None)
        # The most image tokens one image can get (dynamic resolution: smaller images get fewer).
        self.tokens_per_image = int(longest) // (factor * factor) if longest else 0

    def frame(self, question: str, num_images: int = 1) -> str:
        """The prompt text with one image placeholder per image (where the template or the question puts it)."""
        framed = chat_frame(self.tokenizer, question, num_images, self.image_token, self.system_prompt, self.template)
        if framed is None:
            written = question.count(self.image_token)
            framed = (question if written else IMAGE_PLACEHOLDER * num_images + question) + \
                self.tokenizer.decode(self.text.separator_ids)
        found = framed.count(self.image_token)
        if found != num_images:
            raise BriskError(f"the prompt has {found} {self.image_token} token(s) but {num_images} image(s) were "
                             f"given; write one {self.image_token} per image")
        return framed

    def _encode(self, images: list[Any], question: str) -> tuple[list[int], torch.Tensor, torch.Tensor]:
        """One row's expanded ids, its images' patches and grids."""
        out = self.image_processor(images=[np.asarray(im) for im in images], return_tensors="pt")
        grids = out["image_grid_thw"]
        counts = iter([int(g.prod()) // self.merge_size ** 2 for g in grids])
        ids = self.tokenizer(self.frame(question, len(images)), add_special_tokens=not self.template)["input_ids"]
        expanded = [j for i in ids for j in ([i] * next(counts) if i == self.image_token_id else [i])]
        return expanded, out["pixel_values"], grids

    def answer_ids(self, answer: str) -> list[int]:
        """An answer's ids closed by the end of the assistant turn (or eos)."""
        return self.text.completion_ids(answer)

    def decode(self, ids: Sequence[int]) -> str:
        """An answer's text (ids up to the first stop id)."""
        return self.text.decode(self.text.cut_at_eos(ids)[0]).strip()

    def __call__(self, images: Sequence[Any], questions: Sequence[str]) -> QwenVLBatch:
        """A left-padded batch; `images[i]` is row i's image or list of images."""
        if len(images) != len(questions):
            raise BriskError(f"got {len(images)} image rows but {len(questions)} questions; pass one row per question")
        rows, pixels, grids = [], [], []
        for row_images, question in zip(images, questions):
            row_images = list(row_images) if isinstance(row_images, (list, tuple)) else [row_images]
            ids, values, grid = self._encode(row_images, question)
            rows.append(ids)
            pixels.append(values)
            grids.append(grid)
        ids, mask = left_pad(rows, self.text.roles.pad_id)
        grid = torch.cat(grids)
        rope = mrope_positions(ids, mask, grid, self.image_token_id, self.merge_size)
        position = rope[0].masked_fill(~mask.bool(), 0)
        return QwenVLBatch(ids, mask, position, torch.cat(pixels), grid, rope).to(self.device)

    def save_pretrained(self, out: str | Path) -> None:
        self.image_processor.save_pretrained(out)
        self.tokenizer.save_pretrained(out)


def image_features(model, pixel_values: torch.Tensor, image_grid_thw: torch.Tensor) -> torch.Tensor:
    """The merger outputs of every image, concatenated in order: (total image tokens, D)."""
    out = model.model.get_image_features(pixel_values.to(model.dtype), image_grid_thw, return_dict=True)
    feats = out.pooler_output
    return torch.cat(list(feats)) if isinstance(feats, (list, tuple)) else feats


def embed_qwen2vl(model, batch: QwenVLBatch) -> torch.Tensor:
    """Text embeddings with the image features written into the image-token rows (as HF's forward does)."""
    embeds = model.get_input_embeddings()(batch.input_ids)
    mask = batch.input_ids == int(model.config.image_token_id)
    feats = image_features(model, batch.pixel_values, batch.image_grid_thw).to(embeds.dtype)
    if int(mask.sum()) != feats.shape[0]:
        raise BriskError(f"the prompts hold {int(mask.sum())} image tokens but the images give {feats.shape[0]} "
                         "features; expand each image placeholder with this model's processor")
    return embeds.masked_scatter(mask[..., None], feats)


@torch.no_grad()
def prefill_logits(model, batch: QwenVLBatch, plan=None, flops=None) -> torch.Tensor:
    """Last-position logits (B, V) of the prompts through the core executor (dense when plan is None)."""
    from brisklm.core.executor import execute
    from brisklm.core.plan import Plan

    batch = batch.to(model.device)
    plan = plan or Plan()
    if plan.position_ids is None:
        plan.position_ids = batch.position_ids
    if plan.rope_position_ids is None:
        plan.rope_position_ids = batch.rope_position_ids
    out = execute(model, inputs_embeds=embed_qwen2vl(model, batch), plan=plan, attention_mask=batch.attention_mask,
                  logits_rows="last", flops=flops)
    return out.logits[:, -1]


def load_qwen2vl(path: Path, device: str = "auto", dtype: str = "auto", chat_template: bool = True,
                 system_prompt: str | None = None):
    """A Qwen2-VL / Qwen2.5-VL folder (model, image processor, tokenizer) as a `LoadedVLM`."""
    from transformers import AutoImageProcessor, AutoModelForImageTextToText

    from brisklm.core.device import model_device
    from brisklm.vision.processor import has_processor
    from brisklm.vision.vlm import LoadedVLM
    from brisklm.zoo.store import check_eos, load_tokenizer, place, read_quality

    if not has_processor(path):
        raise BriskError(f"{path} is a Qwen2-VL checkpoint without its image processor (preprocessor_config.json); "
                         "save it beside the model with processor.save_pretrained(path)")
    try:
        model = AutoModelForImageTextToText.from_pretrained(path, local_files_only=True)
        image_processor = AutoImageProcessor.from_pretrained(path, local_files_only=True)
    except (ValueError, OSError, KeyError, RuntimeError) as error:
        raise BriskError(f"cannot load {path} as a Qwen2-VL model: {str(error).splitlines()[0]}") from None
    tokenizer = load_tokenizer(path)
    check_eos(model, tokenizer, path)
    model = place(model, path, device, dtype)
    model.eval()
    processor = QwenVLProcessor(tokenizer, image_processor, model.config, getattr(model, "generation_config", None),
                                chat_template, system_prompt, model_device(model))
    return LoadedVLM(model, processor, Path(path), read_quality(path))
