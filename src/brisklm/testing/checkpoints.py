"""Random-weight checkpoints that follow real models' conventions, built locally (never downloaded or committed).

Each style copies what makes a real family awkward for a library: a subword tokenizer in which words split into
several tokens (byte-level BPE `Ġ`, or SentencePiece-style `▁`), no BOS (Qwen), no pad (Llama-3, Mistral), several
eos ids in config and generation_config, a chat template, `rope_scaling` of type llama3, short sliding windows and
Gemma's soft-capping. Shapes are tiny (hidden 64, 4 heads / 2 KV heads, head_dim 16) so a checkpoint builds in well
under a second once the tokenizer is trained (trained once per process and cached).
"""

from __future__ import annotations

import functools
import string
from dataclasses import dataclass, field
from pathlib import Path

from brisklm.errors import BriskError

FIXTURE_STYLES: tuple[str, ...] = ("qwen2", "qwen3", "llama3", "mistral", "gemma2", "gemma3", "phi3")

ENGLISH = (
    "The quick brown fox jumps over the lazy dog while the farmer watches from the window.",
    "A streaming translator reads the source one word at a time and writes as soon as it is sure.",
    "Pruning removes layers, heads or channels that contribute little to the final prediction.",
    "Researchers measured the latency of every decoding step on a small machine with two cores.",
    "Please translate the following sentence into German and keep the meaning unchanged.",
    "Reasoning models write long chains of thought before they give their final answer.",
    "The image shows a red circle above a blue square on a white background.",
    "Tokenizers split unfamiliar words into several pieces, and frequent words stay whole.",
    "Yesterday the committee discussed the proposal, but nobody agreed on the budget.",
    "Students practised arithmetic: seven plus eight is fifteen, and nine times three is twenty-seven.",
    "You are a helpful assistant. Answer the question briefly and politely.",
    "When the weather is cold, people drink tea, read books and stay inside their houses.",
    "Attention lets each position look at earlier positions, weighted by how relevant they are.",
    "She opened the door, smiled at the visitors and invited everyone into the kitchen.",
)

# Chat templates written for these fixtures; each mirrors the framing of its family, not its exact text.
CHATML = (
    "{% for m in messages %}{{ '<|im_start|>' + m['role'] + '\\n' + m['content'] + '<|im_end|>\\n' }}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)
LLAMA3 = (
    "{{ bos_token }}{% for m in messages %}{{ '<|start_header_id|>' + m['role'] + '<|end_header_id|>\\n\\n' "
    "+ m['content'] | trim + '<|eot_id|>' }}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|start_header_id|>assistant<|end_header_id|>\\n\\n' }}{% endif %}"
)
MISTRAL = (
    "{{ bos_token }}{% set ns = namespace(system='') %}{% for m in messages %}"
    "{% if m['role'] == 'system' %}{% set ns.system = m['content'] + '\\n\\n' %}"
    "{% elif m['role'] == 'user' %}{{ '[INST] ' + ns.system + m['content'] + ' [/INST]' }}{% set ns.system = '' %}"
    "{% else %}{{ m['content'] + eos_token }}{% endif %}{% endfor %}"
)
GEMMA = (
    "{{ bos_token }}{% set ns = namespace(system='') %}{% for m in messages %}"
    "{% if m['role'] == 'system' %}{% set ns.system = m['content'] + '\\n\\n' %}"
    "{% else %}{{ '<start_of_turn>' + ('model' if m['role'] == 'assistant' else 'user') + '\\n' + ns.system "
    "+ m['content'] | trim + '<end_of_turn>\\n' }}{% set ns.system = '' %}{% endif %}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<start_of_turn>model\\n' }}{% endif %}"
)
PHI3 = (
    "{% for m in messages %}{{ '<|' + m['role'] + '|>\\n' + m['content'] + '<|end|>\\n' }}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|assistant|>\\n' }}{% else %}{{ eos_token }}{% endif %}"
)


@dataclass(frozen=True)
class _Style:
    """What one fixture style looks like: tokenizer kind, special tokens and their roles, template, model family."""

    kind: str  # "bytelevel", "metaspace-first" (prefix ▁ on the first word) or "metaspace-never"
    specials: tuple[str, ...]
    bos: str | None
    eos: str
    pad: str | None
    unk: str | None
    config_eos: tuple[str, ...]
    config_bos: str | None
    template: str
    family: str
    extra: dict = field(default_factory=dict)


_GEMMA_SPECIALS = ("<pad>", "<eos>", "<bos>", "<unk>", "<start_of_turn>", "<end_of_turn>")
_STYLES: dict[str, _Style] = {
    "qwen2": _Style("bytelevel", ("<|endoftext|>", "<|im_start|>", "<|im_end|>"), None, "<|im_end|>",
                    "<|endoftext|>", None, ("<|im_end|>", "<|endoftext|>"), "<|endoftext|>", CHATML, "qwen2"),
    "qwen3": _Style("bytelevel", ("<|endoftext|>", "<|im_start|>", "<|im_end|>", "<think>", "</think>"), None,
                    "<|im_end|>", "<|endoftext|>", None, ("<|im_end|>", "<|endoftext|>"), "<|endoftext|>", CHATML,
                    "qwen3"),
    "llama3": _Style("bytelevel", ("<|begin_of_text|>", "<|end_of_text|>", "<|start_header_id|>",
                                   "<|end_header_id|>", "<|eot_id|>"), "<|begin_of_text|>", "<|eot_id|>", None, None,
                     ("<|end_of_text|>", "<|eot_id|>"), "<|begin_of_text|>", LLAMA3, "llama",
                     {"rope_parameters": {"rope_type": "llama3", "rope_theta": 500000.0, "factor": 8.0,
                                          "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                                          "original_max_position_embeddings": 64}}),
    "mistral": _Style("metaspace-first", ("<unk>", "<s>", "</s>"), "<s>", "</s>", None, "<unk>", ("</s>",), "<s>",
                      MISTRAL, "mistral", {"sliding_window": 4}),
    "gemma2": _Style("metaspace-never", _GEMMA_SPECIALS, "<bos>", "<eos>", "<pad>", "<unk>",
                     ("<eos>", "<end_of_turn>"), "<bos>", GEMMA, "gemma2",
                     {"sliding_window": 4, "query_pre_attn_scalar": 16, "attn_logit_softcapping": 50.0,
                      "final_logit_softcapping": 30.0, "layer_types": ["sliding_attention", "full_attention",
                                                                        "sliding_attention"]}),
    "gemma3": _Style("metaspace-never", _GEMMA_SPECIALS, "<bos>", "<eos>", "<pad>", "<unk>",
                     ("<eos>", "<end_of_turn>"), "<bos>", GEMMA, "gemma3",
                     {"sliding_window": 4, "query_pre_attn_scalar": 16,
                      "layer_types": ["sliding_attention", "sliding_attention", "full_attention"]}),
    "phi3": _Style("metaspace-first", ("<unk>", "<s>", "</s>", "<|endoftext|>", "<|system|>", "<|user|>",
                                       "<|assistant|>", "<|end|>"), "<s>", "<|endoftext|>", "<|endoftext|>", "<unk>",
                   ("<|endoftext|>", "<|end|>"), "<s>", PHI3, "phi3"),
}


def training_text(n_per_task: int = 40, seed: int = 0) -> list[str]:
    """Sentences the project generates (its synthetic tasks), the English sentences above and every ASCII symbol.

    SentencePiece-style fixtures have no byte fallback: characters outside this text encode as `<unk>`.
    """
    from brisklm.tasks import TASKS

    lines = list(ENGLISH) + [" ".join(string.ascii_letters + string.digits + string.punctuation),  # every ASCII char
                             "a line\nanother line\n\nand a paragraph\n"]  # newlines, as chat templates use them
    for name in sorted(TASKS):
        for example in TASKS[name]().examples("train", n_per_task, seed=seed):
            lines.append(f"{example.prompt} {example.completion}".strip())
    return lines


@functools.lru_cache(maxsize=None)
def _trained_json(kind: str, vocab_size: int, seed: int) -> str:
    """Train the base subword tokenizer of one kind once per process; returned as JSON so callers get copies."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    if kind == "bytelevel":
        tok = Tokenizer(models.BPE())
        tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
        tok.decoder = decoders.ByteLevel()
        alphabet = pre_tokenizers.ByteLevel.alphabet()
        specials: list[str] = []
    elif kind in ("metaspace-first", "metaspace-never"):
        scheme = kind.split("-")[1]
        tok = Tokenizer(models.BPE(unk_token="<unk>"))
        tok.pre_tokenizer = pre_tokenizers.Metaspace(replacement="▁", prepend_scheme=scheme)
        tok.decoder = decoders.Metaspace(replacement="▁", prepend_scheme=scheme)
        alphabet, specials = [], ["<unk>"]
    else:
        raise BriskError(f"unknown tokenizer kind {kind!r}: use bytelevel, metaspace-first or metaspace-never")
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, min_frequency=2, initial_alphabet=alphabet,
                                  special_tokens=specials, show_progress=False)
    tok.train_from_iterator(training_text(seed=seed), trainer=trainer)
    return tok.to_str()


def train_bpe_tokenizer(kind: str = "bytelevel", vocab_size: int = 800, specials: tuple[str, ...] = (),
                        seed: int = 0):
    """A `tokenizers.Tokenizer` (BPE, byte-level or `▁` Metaspace) trained on project text, plus added specials."""
    from tokenizers import AddedToken, Tokenizer

    tok = Tokenizer.from_str(_trained_json(kind, vocab_size, seed))
    tok.add_special_tokens([AddedToken(s, special=True, normalized=False) for s in specials if tok.token_to_id(s) is None])
    return tok


def _hf_tokenizer(style: _Style):
    """The style's tokenizer as a transformers fast tokenizer (BOS added by the post-processor where the family does)."""
    from tokenizers import processors
    from transformers import PreTrainedTokenizerFast

    tok = train_bpe_tokenizer(style.kind, specials=style.specials)
    if style.bos is not None:
        tok.post_processor = processors.TemplateProcessing(
            single=f"{style.bos} $A", pair=f"{style.bos} $A {style.bos} $B",
            special_tokens=[(style.bos, tok.token_to_id(style.bos))])
    roles = {"bos_token": style.bos, "eos_token": style.eos, "pad_token": style.pad, "unk_token": style.unk}
    named = {v for v in roles.values() if v is not None}
    return PreTrainedTokenizerFast(
        tokenizer_object=tok, **{k: v for k, v in roles.items() if v is not None},
        extra_special_tokens=[s for s in style.specials if s not in named],
        chat_template=style.template, clean_up_tokenization_spaces=False,
    )


def _model(style: _Style, vocab_size: int, ids: dict[str, int | list[int] | None]):
    """A tiny random model of the style's family with the given vocabulary and special-token ids."""
    from brisklm.core.families import family_classes

    config_cls, model_cls = family_classes(style.family)
    config = config_cls(vocab_size=vocab_size, hidden_size=64, intermediate_size=128, num_hidden_layers=3,
                        num_attention_heads=4, num_key_value_heads=2, head_dim=16, max_position_embeddings=256,
                        tie_word_embeddings=False, **ids, **style.extra)
    return model_cls(config).eval()


def build_checkpoint(style: str, out_dir: str | Path, seed: int = 0) -> Path:
    """Save a random-weight checkpoint of `style` (model, tokenizer, generation_config) into out_dir; returns it."""
    import torch
    from transformers import GenerationConfig

    if style in ("qwen2-vl", "qwen2.5-vl"):
        return build_qwen2vl_checkpoint(out_dir, seed, qwen25=style == "qwen2.5-vl")
    if style in VISION_FIXTURE_STYLES:
        return build_llava_checkpoint(out_dir, seed)
    if style not in _STYLES:
        raise BriskError(f"unknown fixture style {style!r}: choose from "
                         f"{', '.join(FIXTURE_STYLES + VISION_FIXTURE_STYLES)}")
    spec = _STYLES[style]
    tokenizer = _hf_tokenizer(spec)
    tid = tokenizer.convert_tokens_to_ids
    eos = [tid(t) for t in spec.config_eos]
    ids = {"bos_token_id": tid(spec.config_bos) if spec.config_bos else None,
           "eos_token_id": eos if len(eos) > 1 else eos[0],
           "pad_token_id": tid(spec.pad) if spec.pad else None}
    torch.manual_seed(seed)
    model = _model(spec, len(tokenizer), ids)
    model.generation_config = GenerationConfig(**ids)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)
    return out


# ----------------------------------------------------------------------------------------------- vision fixtures

VISION_FIXTURE_STYLES: tuple[str, ...] = ("llava-qwen2", "qwen2-vl", "qwen2.5-vl")

# A LLaVA-style ChatML template: message content is a string, or a list of {"type": "image"} / {"type": "text"}
# parts (each image becomes one `<image>` placeholder the processor expands). Without a system message it adds a
# default one, so the image tokens sit in the middle of the prompt, as in real LLaVA checkpoints.
LLAVA_CHATML = (
    "{% if messages[0]['role'] != 'system' %}{{ '<|im_start|>system\\nYou are a helpful assistant.<|im_end|>\\n' }}"
    "{% endif %}{% for m in messages %}{{ '<|im_start|>' + m['role'] + '\\n' }}{% if m['content'] is string %}"
    "{{ m['content'] }}{% else %}{% for c in m['content'] %}{% if c['type'] == 'image' %}{{ '<image>\\n' }}"
    "{% elif c['type'] == 'text' %}{{ c['text'] }}{% endif %}{% endfor %}{% endif %}{{ '<|im_end|>\\n' }}"
    "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)
LLAVA_IMAGE_SIZE, LLAVA_PATCH = 28, 4  # 7 x 7 = 49 image tokens per image (LLaVA-1.5 has 576): a non-default count


def build_llava_checkpoint(out_dir: str | Path, seed: int = 0) -> Path:
    """A random-weight `LlavaForConditionalGeneration` with a Qwen2 text model and its own `LlavaProcessor`.

    Conventions of a real LLaVA-on-Qwen2 folder: a CLIP image processor with non-trivial mean/std (resize to the
    shortest edge, then centre crop), a byte-level BPE tokenizer with `<image>` as a special token, no BOS, two
    eos ids, a chat template that places the image in the middle of the prompt, the penultimate vision layer and
    the "default" strategy (CLS dropped): 49 image tokens per image. Tiny: builds in about a second.
    """
    import torch
    from transformers import (
        CLIPVisionConfig,
        GenerationConfig,
        LlavaConfig,
        LlavaForConditionalGeneration,
        LlavaProcessor,
        Qwen2Config,
    )
    from transformers.models.clip.image_processing_pil_clip import CLIPImageProcessorPil

    style = _Style("bytelevel", ("<|endoftext|>", "<|im_start|>", "<|im_end|>", "<image>"), None, "<|im_end|>",
                   "<|endoftext|>", None, ("<|im_end|>", "<|endoftext|>"), "<|endoftext|>", LLAVA_CHATML, "qwen2")
    tokenizer = _hf_tokenizer(style)
    tid = tokenizer.convert_tokens_to_ids
    eos = [tid(t) for t in style.config_eos]
    ids = {"bos_token_id": None, "eos_token_id": eos, "pad_token_id": tid(style.pad)}
    text_config = Qwen2Config(vocab_size=len(tokenizer), hidden_size=64, intermediate_size=128, num_hidden_layers=4,
                              num_attention_heads=4, num_key_value_heads=2, head_dim=16, max_position_embeddings=512,
                              tie_word_embeddings=False, **ids)
    vision_config = CLIPVisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                                     image_size=LLAVA_IMAGE_SIZE, patch_size=LLAVA_PATCH, num_channels=3)
    tokens = (LLAVA_IMAGE_SIZE // LLAVA_PATCH) ** 2
    config = LlavaConfig(vision_config=vision_config, text_config=text_config, image_token_id=tid("<image>"),
                         image_seq_length=tokens, vision_feature_layer=-2, vision_feature_select_strategy="default",
                         projector_hidden_act="gelu", tie_word_embeddings=False)
    torch.manual_seed(seed)
    model = LlavaForConditionalGeneration(config).eval()
    model.generation_config = GenerationConfig(**ids)
    image_processor = CLIPImageProcessorPil(
        size={"shortest_edge": LLAVA_IMAGE_SIZE}, crop_size={"height": LLAVA_IMAGE_SIZE, "width": LLAVA_IMAGE_SIZE},
        image_mean=[0.481, 0.458, 0.408], image_std=[0.269, 0.261, 0.276], do_convert_rgb=True)
    processor = LlavaProcessor(image_processor=image_processor, tokenizer=tokenizer, patch_size=LLAVA_PATCH,
                               vision_feature_select_strategy="default", num_additional_image_tokens=1,
                               chat_template=LLAVA_CHATML, image_token="<image>")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out)
    processor.save_pretrained(out)
    return out


# Qwen2-VL's framing: each image is `<|vision_start|><|image_pad|><|vision_end|>`, the pad expanded by the processor
# to the image's merged-patch count (which depends on the image's size: dynamic resolution).
QWEN2VL_CHATML = (
    "{% if messages[0]['role'] != 'system' %}{{ '<|im_start|>system\\nYou are a helpful assistant.<|im_end|>\\n' }}"
    "{% endif %}{% for m in messages %}{{ '<|im_start|>' + m['role'] + '\\n' }}{% if m['content'] is string %}"
    "{{ m['content'] }}{% else %}{% for c in m['content'] %}{% if c['type'] == 'image' %}"
    "{{ '<|vision_start|><|image_pad|><|vision_end|>' }}{% elif c['type'] == 'text' %}{{ c['text'] }}{% endif %}"
    "{% endfor %}{% endif %}{{ '<|im_end|>\\n' }}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)
QWEN2VL_PATCH, QWEN2VL_MERGE = 4, 2  # one image token per 8 x 8 pixels
QWEN2VL_MIN_PIXELS, QWEN2VL_MAX_PIXELS = 4 * 64, 16 * 64  # 4 to 16 image tokens per image


def build_qwen2vl_checkpoint(out_dir: str | Path, seed: int = 0, qwen25: bool = False) -> Path:
    """A random-weight `Qwen2VLForConditionalGeneration` (or, with qwen25, `Qwen2_5_VLForConditionalGeneration`:
    windowed vision attention with one full-attention block) with its own image processor and tokenizer.

    Conventions of a real Qwen2-VL folder: dynamic resolution (the image processor resizes each image to a multiple
    of patch x merge within min/max pixels, so the image-token count follows the image's size and aspect), M-RoPE
    (mrope_section over head_dim / 2), vision start/end tokens around the image pads, a byte-level BPE tokenizer,
    no BOS, two eos ids and a ChatML template with a default system message. The text model's initial weights are
    larger than HF's default (std 0.1) so that attention, and so M-RoPE positions, visibly change the logits.
    Tiny: builds in about a second.
    """
    import torch
    from transformers import GenerationConfig, Qwen2VLConfig, Qwen2VLForConditionalGeneration
    from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import Qwen2VLImageProcessorPil

    specials = ("<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|vision_start|>", "<|vision_end|>",
                "<|image_pad|>", "<|video_pad|>")
    style = _Style("bytelevel", specials, None, "<|im_end|>", "<|endoftext|>", None, ("<|im_end|>", "<|endoftext|>"),
                   "<|endoftext|>", QWEN2VL_CHATML, "qwen2")
    tokenizer = _hf_tokenizer(style)
    tid = tokenizer.convert_tokens_to_ids
    eos = [tid(t) for t in style.config_eos]
    ids = {"bos_token_id": None, "eos_token_id": eos, "pad_token_id": tid(style.pad)}
    text_config = dict(vocab_size=len(tokenizer), hidden_size=64, intermediate_size=128, num_hidden_layers=4,
                       num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512, initializer_range=0.1,
                       rope_parameters={"rope_type": "default", "rope_theta": 10000.0, "mrope_section": [2, 3, 3]},
                       **ids)
    vision_config = dict(depth=2, embed_dim=32, hidden_size=64, num_heads=4, mlp_ratio=2, patch_size=QWEN2VL_PATCH,
                         spatial_merge_size=QWEN2VL_MERGE, temporal_patch_size=2, in_channels=3)
    config_cls, model_cls = Qwen2VLConfig, Qwen2VLForConditionalGeneration
    if qwen25:
        from transformers import Qwen2_5_VLConfig, Qwen2_5_VLForConditionalGeneration

        config_cls, model_cls = Qwen2_5_VLConfig, Qwen2_5_VLForConditionalGeneration
        vision_config = dict(depth=2, hidden_size=32, out_hidden_size=64, intermediate_size=64, num_heads=4,
                             patch_size=QWEN2VL_PATCH, spatial_merge_size=QWEN2VL_MERGE, temporal_patch_size=2,
                             in_channels=3, window_size=2 * QWEN2VL_PATCH * QWEN2VL_MERGE, fullatt_block_indexes=[1])
    config = config_cls(text_config=text_config, vision_config=vision_config, image_token_id=tid("<|image_pad|>"),
                           video_token_id=tid("<|video_pad|>"), vision_start_token_id=tid("<|vision_start|>"),
                           vision_end_token_id=tid("<|vision_end|>"), tie_word_embeddings=False)
    torch.manual_seed(seed)
    model = model_cls(config).eval()
    model.generation_config = GenerationConfig(**ids)
    image_processor = Qwen2VLImageProcessorPil(
        size={"shortest_edge": QWEN2VL_MIN_PIXELS, "longest_edge": QWEN2VL_MAX_PIXELS}, patch_size=QWEN2VL_PATCH,
        merge_size=QWEN2VL_MERGE, temporal_patch_size=2)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out)
    # The image processor and the tokenizer (with the chat template) saved side by side, as Qwen2VLProcessor would
    # save them; the processor object itself needs torchvision for its video half, which a CPU install may lack.
    image_processor.save_pretrained(out)
    tokenizer.save_pretrained(out)
    return out
