"""A tiny LLaVA (HF `LlavaForConditionalGeneration`: CLIP-style tower, MLP projector, Llama LM) and its inputs.

`VLMProcessor` is the zoo's word format: one `<image>` expanded into as many image tokens as the vision tower
produces, pixels in [0, 1]. A checkpoint with its own processor goes through `vision.processor.CheckpointProcessor`
instead (same interface; `load_vlm` picks). Every method reads where the image tokens are (and how many) from
`input_ids`, never from constants, so any LLaVA checkpoint with a supported text model works.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import numpy as np
import torch
from transformers import CLIPVisionConfig, LlavaConfig, LlavaForConditionalGeneration, PreTrainedTokenizerFast

from brisklm.core.executor import execute
from brisklm.core.plan import Plan
from brisklm.core.text import as_text_layer
from brisklm.errors import BriskError
from brisklm.tasks.tokenizer import build_word_tokenizer

IMAGE_TOKEN = "<image>"
SYSTEM_PROMPT = "look at the picture"  # a short fixed prefix before the image, like LLaVA's system prompt
SYSTEM_WORDS = tuple(SYSTEM_PROMPT.split())
CAPTION_WORDS = ("describe", "empty")  # stage-1 style captions: "describe" -> each cell's colour and shape


def build_vlm_tokenizer(words: Sequence[str]) -> PreTrainedTokenizerFast:
    """Word-level tokenizer with the task words, the system-prompt words and an `<image>` special token."""
    return build_word_tokenizer([*words, *SYSTEM_WORDS, *CAPTION_WORDS], extra_special=[IMAGE_TOKEN])


def tiny_llava_config(vocab_size: int, image_token_id: int, pad_token_id: int, bos_token_id: int,
                      eos_token_id: int, image_size: int = 32, patch_size: int = 4, vision_hidden: int = 64,
                      vision_layers: int = 2, text: dict | None = None, vision_init_factor: float = 0.1,
                      select_strategy: str = "default", feature_layer: int = -1) -> LlavaConfig:
    """A LlavaConfig with a small CLIP vision tower and a small Llama text model (sizes overridable).

    vision_init_factor scales the tower's initial weights: from scratch, full-scale CLIP layers add a large
    token-independent component to the last hidden state (the LLaVA feature layer has no final norm), which
    drowns the per-patch content; small initial layers keep the patch content visible to the LM.
    feature_layer is LLaVA's vision_feature_layer (-1: the tower's last hidden state, before its final norm).
    """
    from transformers import LlamaConfig

    text_kw = dict(hidden_size=128, num_hidden_layers=8, num_attention_heads=4, num_key_value_heads=2,
                   intermediate_size=352)
    text_kw.update(text or {})
    text_config = LlamaConfig(vocab_size=vocab_size, max_position_embeddings=512, rms_norm_eps=1e-5,
                              rope_theta=10000.0, pad_token_id=pad_token_id, bos_token_id=bos_token_id,
                              eos_token_id=eos_token_id, tie_word_embeddings=False, **text_kw)
    vision_config = CLIPVisionConfig(hidden_size=vision_hidden, intermediate_size=2 * vision_hidden,
                                     num_hidden_layers=vision_layers, num_attention_heads=4, image_size=image_size,
                                     patch_size=patch_size, num_channels=3, initializer_factor=vision_init_factor)
    return LlavaConfig(vision_config=vision_config, text_config=text_config, image_token_index=image_token_id,
                       image_seq_length=(image_size // patch_size) ** 2 + (select_strategy == "full"), vision_feature_layer=feature_layer,
                       vision_feature_select_strategy=select_strategy, projector_hidden_act="gelu",
                       tie_word_embeddings=False, pad_token_id=pad_token_id)


def image_tokens_per_image(config: LlavaConfig) -> int:
    """How many image tokens one image becomes, from the vision tower's image and patch size."""
    vision = config.vision_config
    patches = (int(vision.image_size) // int(vision.patch_size)) ** 2
    return patches + (1 if config.vision_feature_select_strategy == "full" else 0)


def image_to_pixels(image: np.ndarray, image_size: int) -> torch.Tensor:
    """uint8 (H, W, 3) image -> float (3, S, S) in [0, 1], resized (nearest) to the tower's image size.

    Not mean-centred: a black background then embeds to exactly zero before the position embedding, so
    empty patches do not share a large common vector that hides the objects from the LM.
    """
    array = np.asarray(image)
    if array.ndim != 3 or array.shape[2] not in (3, 4):
        raise BriskError(f"an image must be (height, width, 3) RGB; got shape {array.shape}")
    array = array[..., :3]
    if array.shape[0] != image_size or array.shape[1] != image_size:
        from PIL import Image

        array = np.asarray(Image.fromarray(array.astype(np.uint8)).resize((image_size, image_size), Image.NEAREST))
    return torch.from_numpy(array.astype(np.float32) / 255.0).permute(2, 0, 1)


@dataclass
class VLMBatch:
    """Left-padded prompts (image tokens expanded), their mask and positions, and the images' pixels."""

    input_ids: torch.Tensor
    attention_mask: torch.Tensor
    position_ids: torch.Tensor
    pixel_values: torch.Tensor

    def to(self, device: torch.device | str) -> "VLMBatch":
        """The same batch with every tensor on `device` (a no-op where they already are)."""
        return VLMBatch(*(t.to(device) for t in (self.input_ids, self.attention_mask, self.position_ids,
                                                  self.pixel_values)))


class VLMProcessor:
    """Turns (image, question) pairs into model inputs: `<bos> system <image>*N question <sep>`."""

    def __init__(self, tokenizer: PreTrainedTokenizerFast, config: LlavaConfig,
                 device: torch.device | str = "cpu") -> None:
        """Read the image token id and image-token count from the model config; batches are made on `device`."""
        self.tokenizer, self.device = tokenizer, torch.device(device)
        self.image_token_id = int(config.image_token_id)
        self.image_size = int(config.vision_config.image_size)
        self.tokens_per_image = image_tokens_per_image(config)
        if tokenizer.convert_tokens_to_ids(IMAGE_TOKEN) != self.image_token_id:
            raise BriskError(f"the tokenizer's {IMAGE_TOKEN} id differs from the model's image_token_id "
                             f"{self.image_token_id}; use the tokenizer saved with this model")

    def prompt_ids(self, question: str, num_images: int = 1) -> list[int]:
        """Token ids of one prompt with the image placeholder expanded (`num_images` images in a row)."""
        text = as_text_layer(self.tokenizer)  # [bos] system, the images, the question, then the plain separator
        return [*text.text_ids(" ".join(SYSTEM_WORDS)), *([self.image_token_id] * self.tokens_per_image * num_images),
                *text.encode(question), *text.separator_ids]

    def answer_ids(self, answer: str) -> list[int]:
        """An answer's ids closed by the primary eos id."""
        text = as_text_layer(self.tokenizer)
        return [*text.encode(answer), text.roles.eos_id]

    def __call__(self, images: Sequence[np.ndarray], questions: Sequence[str]) -> VLMBatch:
        """Left-padded batch (the last column is every prompt's last token), positions counting real tokens.

        `images[i]` is row i's image, or a list of images (their image tokens follow one another)."""
        if len(images) != len(questions):
            raise BriskError(f"got {len(images)} images but {len(questions)} questions; pass one image per question")
        per_row = [list(im) if isinstance(im, (list, tuple)) else [im] for im in images]
        rows = [self.prompt_ids(q, len(ims)) for q, ims in zip(questions, per_row)]
        pixels = [self.pixels(im) for ims in per_row for im in ims]
        return self.pad(rows, torch.stack(pixels).to(self.device))

    def pixels(self, image: np.ndarray) -> torch.Tensor:
        """One image as the zoo feeds it: (3, S, S) in [0, 1] (see `image_to_pixels`)."""
        return image_to_pixels(np.asarray(image), self.image_size)

    @property
    def text(self):
        """The tokenizer's text layer (roles, decoding)."""
        return as_text_layer(self.tokenizer)

    def decode(self, ids: Sequence[int]) -> str:
        """An answer's text (ids up to the first eos)."""
        text = self.text
        return text.decode(text.cut_at_eos(ids)[0]).strip()

    def save_pretrained(self, out) -> None:
        self.tokenizer.save_pretrained(out)

    def pad(self, rows: list[list[int]], pixel_values: torch.Tensor) -> VLMBatch:
        length = max(len(r) for r in rows)
        pad = as_text_layer(self.tokenizer).roles.pad_id
        ids = torch.tensor([[pad] * (length - len(r)) + list(r) for r in rows], dtype=torch.long, device=self.device)
        mask = torch.tensor([[0] * (length - len(r)) + [1] * len(r) for r in rows], dtype=torch.long, device=self.device)
        return VLMBatch(ids, mask, positions_from_mask(mask), pixel_values.to(self.device))


def positions_from_mask(mask: torch.Tensor) -> torch.Tensor:
    """Rotary positions of left-padded rows: 0 at each row's first real token (padding gets 0)."""
    return (mask.long().cumsum(dim=1) - 1).clamp(min=0)


def visual_mask(input_ids: torch.Tensor, image_token_id: int) -> torch.Tensor:
    """(B, T) True where a row holds an image token: the layout every method reads, nothing assumed."""
    return input_ids == int(image_token_id)


def image_features(model: LlavaForConditionalGeneration, pixel_values: torch.Tensor) -> torch.Tensor:
    """Projector outputs (num_images, tokens, D) of the model's own vision tower and projector."""
    config = model.config
    out = model.model.get_image_features(
        pixel_values=pixel_values.to(model.dtype), vision_feature_layer=config.vision_feature_layer,
        vision_feature_select_strategy=config.vision_feature_select_strategy, output_hidden_states=True,
    )
    feats = out.pooler_output
    return torch.stack(list(feats)) if isinstance(feats, (list, tuple)) else feats


def embed_multimodal(model: LlavaForConditionalGeneration, input_ids: torch.Tensor,
                     pixel_values: torch.Tensor) -> torch.Tensor:
    """Text embeddings with the image features written into the image-token rows (as LLaVA's forward does)."""
    embeds = model.get_input_embeddings()(input_ids)
    mask = visual_mask(input_ids, model.config.image_token_id)
    feats = image_features(model, pixel_values).to(embeds.dtype)
    if int(mask.sum()) != feats.shape[0] * feats.shape[1]:
        raise BriskError(
            f"the prompts hold {int(mask.sum())} image tokens but the {feats.shape[0]} image(s) give "
            f"{feats.shape[0] * feats.shape[1]} features ({feats.shape[1]} each); expand <image> with this model's processor"
        )
    return embeds.masked_scatter(mask[..., None], feats.reshape(-1, feats.shape[-1]))


@torch.no_grad()
def prefill_logits(model: LlavaForConditionalGeneration, batch: VLMBatch, plan: Plan | None = None,
                   flops=None) -> torch.Tensor:
    """Last-position logits (B, V) of the prompts through the core executor (dense when plan is None)."""
    batch = batch.to(model.device)
    embeds = embed_multimodal(model, batch.input_ids, batch.pixel_values)
    plan = plan or Plan()
    if plan.position_ids is None:
        plan.position_ids = batch.position_ids
    out = execute(model, inputs_embeds=embeds, plan=plan, attention_mask=batch.attention_mask,
                  logits_rows="last", flops=flops)
    return out.logits[:, -1]


@dataclass
class LoadedVLM:
    """A LLaVA model in eval mode with its processor and where it came from."""

    model: LlavaForConditionalGeneration
    processor: "VLMProcessor | CheckpointProcessor"  # noqa: F821 (vision.processor imports this module)
    path: Path
    quality: dict | None


def load_vlm(name_or_path: str, seed: int = 0, device: str = "auto", dtype: str = "auto",
             chat_template: bool = True, system_prompt: str | None = None) -> LoadedVLM:
    """Load a LLaVA checkpoint folder or a vision zoo name (trained on first use) on `device` in `dtype`, with
    its own processor when the folder has one (else the zoo's word-format `VLMProcessor`)."""
    from brisklm.core.device import model_device, resolve_device
    from brisklm.zoo.store import check_eos, load_tokenizer, place, read_quality, resolve

    resolve_device(device)  # a missing device fails before any training or loading
    from brisklm.vision.processor import check_image_size, has_processor, load_processor

    path = resolve(name_or_path, seed)
    if _model_type(path) in ("qwen2_vl", "qwen2_5_vl"):  # dynamic resolution and M-RoPE: vision/qwen2vl.py
        from brisklm.vision.qwen2vl import load_qwen2vl

        return load_qwen2vl(path, device, dtype, chat_template, system_prompt)
    if not has_processor(path):
        check_image_size(path)  # before loading: a tower without its image size does not load as saved
    try:
        model = LlavaForConditionalGeneration.from_pretrained(path, local_files_only=True)
    except (ValueError, OSError, KeyError, RuntimeError) as error:
        raise BriskError(f"cannot load {path} as a LLaVA model: {str(error).splitlines()[0]}") from None
    tokenizer = load_tokenizer(path)
    check_eos(model, tokenizer, path)
    model = place(model, path, device, dtype)
    model.eval()
    processor = load_processor(path, model, tokenizer, model_device(model), chat_template, system_prompt)
    return LoadedVLM(model, processor, path, read_quality(path))


def _model_type(path: Path) -> str | None:
    """config.json's model_type of a checkpoint folder (None when it has none)."""
    import json

    config_file = Path(path) / "config.json"
    return json.loads(config_file.read_text()).get("model_type") if config_file.exists() else None


def new_tiny_llava(tokenizer: PreTrainedTokenizerFast, seed: int, **config_kw) -> LlavaForConditionalGeneration:
    """A freshly initialised tiny LLaVA for `tokenizer`, deterministic under seed."""
    config = tiny_llava_config(len(tokenizer), tokenizer.convert_tokens_to_ids(IMAGE_TOKEN), tokenizer.pad_token_id,
                               tokenizer.bos_token_id, tokenizer.eos_token_id, **config_kw)
    torch.manual_seed(seed)
    return LlavaForConditionalGeneration(config)
