"""A LLaVA checkpoint's own processor (`AutoProcessor`) behind the interface every vision method uses.

`CheckpointProcessor` turns (images, question) rows into a left-padded `VLMBatch`: the checkpoint's image
processor resizes and normalises (its own mean and std), its chat template frames the question (each image one
placeholder where the template puts it, or where the question writes the image token), and the processor expands
each placeholder to the model's image-token count. Several images per prompt are allowed (LLaVA fills the image
rows in order). `load_processor` picks it when the folder has a processor, else the zoo's `VLMProcessor`.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import torch

from brisklm.core.generate import left_pad
from brisklm.core.text import TextLayer
from brisklm.errors import BriskError
from brisklm.vision.vlm import VLMBatch, positions_from_mask

PROCESSOR_FILES = ("processor_config.json", "preprocessor_config.json")


def load_image(path: str | Path) -> np.ndarray:
    """An image file as uint8 (H, W, 3) RGB, or a BriskError naming the file."""
    from PIL import Image, UnidentifiedImageError

    path = Path(path)
    if not path.is_file():
        raise BriskError(f"image {path} does not exist; pass an image file (PNG, JPEG, ...)")
    try:
        with Image.open(path) as image:
            return np.asarray(image.convert("RGB"))
    except (OSError, UnidentifiedImageError, ValueError) as error:
        first = str(error).splitlines()[0] if str(error) else type(error).__name__
        raise BriskError(f"cannot open {path} as an image ({first}); pass a PNG or JPEG file") from None


def _rows(images: Sequence[Any]) -> list[list[Any]]:
    """Each row's images as a list (a row may be one image or a list of images)."""
    return [list(row) if isinstance(row, (list, tuple)) else [row] for row in images]


def chat_frame(owner: Any, question: str, num_images: int, image_token: str, system_prompt: str | None,
               template: bool) -> str | None:
    """The question framed by `owner`'s chat template with one image entry per image (None without a template).

    A question that writes the image token itself places the images there, one token per image."""
    written = question.count(image_token)
    if written and written != num_images:
        raise BriskError(f"the question holds {written} {image_token} token(s) but {num_images} image(s) "
                         f"were given; write one {image_token} per image, or none to let the template place them")
    if not template:
        return None
    content: Any = question if written else [*([{"type": "image"}] * num_images), {"type": "text", "text": question}]
    messages = ([{"role": "system", "content": system_prompt}] if system_prompt else [])
    messages.append({"role": "user", "content": content})
    return owner.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)


class CheckpointProcessor:
    """Model inputs through a checkpoint's own `LlavaProcessor` (or any processor with the same call)."""

    def __init__(self, processor, config, generation_config=None, chat_template: bool = True,
                 system_prompt: str | None = None, device: torch.device | str = "cpu") -> None:
        """Read the image token and its per-image count from the processor (probed once on a blank image)."""
        self.processor, self.device = processor, torch.device(device)
        self.tokenizer = processor.tokenizer
        self.text = TextLayer.from_tokenizer(self.tokenizer, config.get_text_config(), generation_config,
                                             chat_template, system_prompt)
        self.template = bool(chat_template and getattr(processor, "chat_template", None))
        self.system_prompt = system_prompt
        self.image_token = str(getattr(processor, "image_token", "<image>"))
        self.image_token_id = int(config.image_token_id)
        if self.tokenizer.convert_tokens_to_ids(self.image_token) != self.image_token_id:
            raise BriskError(f"the processor's image token {self.image_token!r} is not the model's image_token_id "
                             f"{self.image_token_id}; save the processor that belongs to this model")
        blank = np.zeros((8, 8, 3), dtype=np.uint8)
        probe = self.processor(text=[self.image_token], images=[blank], return_tensors="pt")
        self.tokens_per_image = int((probe["input_ids"] == self.image_token_id).sum())
        self.image_size = int(probe["pixel_values"].shape[-1])

    # ---- prompts --------------------------------------------------------------------------------------------
    def frame(self, question: str, num_images: int = 1) -> str:
        """The prompt text with one image placeholder per image: through the chat template when there is one.

        A question that writes the image token itself places the images there (one token per image)."""
        framed = chat_frame(self.processor, question, num_images, self.image_token, self.system_prompt, self.template)
        if framed is None:
            framed = question + self.tokenizer.decode(self.text.separator_ids)
        found = framed.count(self.image_token)
        if found == 0:
            raise BriskError(f"the prompt has no {self.image_token} token, so the image has nowhere to go; write "
                             f"{self.image_token} in the question (or keep the chat template on)")
        if found < num_images:
            raise BriskError(f"{num_images} image(s) but the prompt has only {found} {self.image_token} token(s); "
                             f"write one {self.image_token} per image")
        if found > num_images:
            raise BriskError(f"the prompt has {found} {self.image_token} tokens but {num_images} image(s) were given; "
                             "pass one image per image token")
        return framed

    def _encode(self, images: list[Any], question: str) -> tuple[list[int], torch.Tensor]:
        """One row's expanded ids and its images' pixels, checked against the model's per-image count."""
        out = self.processor(text=[self.frame(question, len(images))], images=images, return_tensors="pt",
                             add_special_tokens=not self.template)  # a template writes its own bos
        ids = [int(i) for i in out["input_ids"][0]]
        expected = len(images) * self.tokens_per_image
        got = sum(i == self.image_token_id for i in ids)
        if got != expected:
            raise BriskError(f"the processor wrote {got} image tokens for {len(images)} image(s) of "
                             f"{self.tokens_per_image}; check that the image processor resizes to one size")
        return ids, out["pixel_values"]

    def prompt_ids(self, question: str, num_images: int = 1) -> list[int]:
        """A prompt's ids with the image placeholders expanded (no pixels needed)."""
        framed = self.frame(question, num_images)
        ids = self.tokenizer(framed, add_special_tokens=not self.template)["input_ids"]
        return [j for i in ids for j in ([i] * self.tokens_per_image if i == self.image_token_id else [i])]

    def answer_ids(self, answer: str) -> list[int]:
        """An answer's ids closed by the end of the assistant turn (or eos), as the text layer frames completions."""
        return self.text.completion_ids(answer)

    def pixels(self, image: Any) -> torch.Tensor:
        """One image resized and normalised by the checkpoint's image processor: (3, S, S)."""
        return self.processor.image_processor(images=[image], return_tensors="pt")["pixel_values"][0]

    def decode(self, ids: Sequence[int]) -> str:
        """An answer's text (ids up to the first stop id)."""
        return self.text.decode(self.text.cut_at_eos(ids)[0]).strip()

    # ---- batches --------------------------------------------------------------------------------------------
    def __call__(self, images: Sequence[Any], questions: Sequence[str]) -> VLMBatch:
        """A left-padded batch; `images[i]` is row i's image or list of images."""
        if len(images) != len(questions):
            raise BriskError(f"got {len(images)} image rows but {len(questions)} questions; pass one row per question")
        rows, pixels = [], []
        for row_images, question in zip(_rows(images), questions):
            ids, values = self._encode(row_images, question)
            rows.append(ids)
            pixels.append(values)
        ids, mask = left_pad(rows, self.text.roles.pad_id, self.device)
        return VLMBatch(ids, mask, positions_from_mask(mask), torch.cat(pixels).to(self.device))

    def save_pretrained(self, out: str | Path) -> None:
        self.processor.save_pretrained(out)


def has_processor(path: str | Path) -> bool:
    """True when a checkpoint folder holds a saved processor or image processor."""
    return any((Path(path) / name).exists() for name in PROCESSOR_FILES)


def check_image_size(path: str | Path) -> None:
    """A folder without a processor must state its tower's image size in config.json (else we cannot resize)."""
    config_file = Path(path) / "config.json"
    raw = json.loads(config_file.read_text()) if config_file.exists() else {}
    if not (raw.get("vision_config") or {}).get("image_size"):
        raise BriskError(f"{path} has no processor ({' or '.join(PROCESSOR_FILES)}) and its config.json gives no "
                         "vision_config.image_size, so images cannot be sized for it; save the model's processor "
                         "beside it with processor.save_pretrained(path)")


def _llava_processor(image_processor, tokenizer, config):
    """A LlavaProcessor from a folder's image processor and tokenizer, its token count from the model config."""
    from transformers import LlavaProcessor

    vision = config.vision_config
    extra = 1 if getattr(vision, "model_type", "") == "clip_vision_model" else 0  # CLIP's CLS token
    try:
        return LlavaProcessor(image_processor=image_processor, tokenizer=tokenizer, patch_size=int(vision.patch_size),
                              vision_feature_select_strategy=config.vision_feature_select_strategy,
                              num_additional_image_tokens=extra, chat_template=getattr(tokenizer, "chat_template", None))
    except (AttributeError, TypeError, ValueError, IndexError) as error:
        raise BriskError(f"cannot pair the image processor with the tokenizer ({error}); save the full processor "
                         "with LlavaProcessor.save_pretrained(path)") from None


def load_processor(path: str | Path, model, tokenizer, device, chat_template: bool = True,
                   system_prompt: str | None = None):
    """The checkpoint's own processor when it has one (AutoProcessor), else the zoo's word-format VLMProcessor."""
    from brisklm.vision.vlm import VLMProcessor

    if has_processor(path):
        from transformers import AutoProcessor

        try:
            processor = AutoProcessor.from_pretrained(path, local_files_only=True)
        except (OSError, ValueError, TypeError, KeyError) as error:
            first = str(error).splitlines()[0] if str(error) else type(error).__name__
            raise BriskError(f"cannot load the processor in {path}: {first}; save it again with "
                             "processor.save_pretrained(path)") from None
        if not hasattr(processor, "tokenizer"):  # an image processor alone (older folders): pair it with the tokenizer
            processor = _llava_processor(processor, tokenizer, model.config)
        elif hasattr(processor, "patch_size") and processor.patch_size is None:  # no processor_config.json
            processor = _llava_processor(processor.image_processor, processor.tokenizer, model.config)
        return CheckpointProcessor(processor, model.config, getattr(model, "generation_config", None), chat_template,
                                   system_prompt, device)
    check_image_size(path)  # (load_vlm checks this before loading the model)
    if system_prompt:
        raise BriskError(f"{path} has no processor, so its prompts use the zoo's fixed word format, which has no "
                         "system message; drop --system-prompt")
    return VLMProcessor(tokenizer, model.config, device)
