"""Find the pieces of a Hugging Face decoder-only model (embeddings, layers, norms, rotary, head) by family.

The executor never re-implements a module's maths; it only needs to know where each module lives.
"""

from __future__ import annotations

import sys
from dataclasses import dataclass
from typing import Callable

import torch
from torch import nn

from brisklm.errors import UnsupportedModelError

SUPPORTED_FAMILIES: tuple[str, ...] = ("llama", "qwen2", "qwen3", "mistral")
MULTIMODAL_WRAPPERS: tuple[str, ...] = ("llava",)


@dataclass
class ModelAdapter:
    """Handles to one decoder-only language model's modules, found once and reused by every plan."""

    model: nn.Module
    family: str
    config: object
    embed_tokens: nn.Embedding
    layers: nn.ModuleList
    final_norm: nn.Module
    rotary_emb: nn.Module
    lm_head: nn.Module
    apply_rotary: Callable[..., tuple[torch.Tensor, torch.Tensor]]

    @classmethod
    def from_model(cls, model: nn.Module) -> "ModelAdapter":
        """Build the adapter for a supported causal LM (or the text part of a LLaVA model)."""
        if isinstance(model, ModelAdapter):
            return model
        config = getattr(model, "config", None)
        model_type = getattr(config, "model_type", None)
        if model_type in MULTIMODAL_WRAPPERS:
            text_config = config.get_text_config()
            family = text_config.model_type
            base = model.model.language_model
        else:
            text_config = config
            family = model_type
            base = getattr(model, "model", None)
        if family not in SUPPORTED_FAMILIES:
            raise UnsupportedModelError(
                f"model family {family!r} is not supported; brisklm supports {', '.join(SUPPORTED_FAMILIES)} "
                "causal LMs (and LLaVA models whose text model is one of them)"
            )
        if base is None or not hasattr(base, "layers") or not hasattr(model, "lm_head"):
            raise UnsupportedModelError(
                f"{type(model).__name__} has no decoder layers and LM head; pass the *ForCausalLM model, "
                "e.g. AutoModelForCausalLM.from_pretrained(path)"
            )
        first_attn = base.layers[0].self_attn
        apply_rotary = getattr(sys.modules[type(first_attn).__module__], "apply_rotary_pos_emb")
        return cls(
            model=model,
            family=family,
            config=text_config,
            embed_tokens=base.embed_tokens,
            layers=base.layers,
            final_norm=base.norm,
            rotary_emb=base.rotary_emb,
            lm_head=model.lm_head,
            apply_rotary=apply_rotary,
        )

    @property
    def num_layers(self) -> int:
        return len(self.layers)

    @property
    def hidden_size(self) -> int:
        return int(self.config.hidden_size)

    @property
    def num_heads(self) -> int:
        return int(self.config.num_attention_heads)

    @property
    def num_kv_heads(self) -> int:
        return int(getattr(self.config, "num_key_value_heads", None) or self.num_heads)

    @property
    def head_dim(self) -> int:
        return int(getattr(self.config, "head_dim", None) or self.hidden_size // self.num_heads)

    @property
    def intermediate_size(self) -> int:
        return int(self.config.intermediate_size)

    @property
    def vocab_size(self) -> int:
        return int(self.lm_head.weight.shape[0])

    def sliding_window(self, layer_idx: int) -> int | None:
        """The attention window of a layer (None for full attention), as the HF model would apply it."""
        attn = self.layers[layer_idx].self_attn
        if hasattr(attn, "sliding_window"):
            return attn.sliding_window
        if self.family == "mistral":
            return getattr(self.config, "sliding_window", None)
        return None

    def rotary(self, hidden: torch.Tensor, position_ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """cos/sin of shape (B, T, head_dim) for arbitrary per-row position ids."""
        return self.rotary_emb(hidden, position_ids)

    def logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """Final norm then LM head: what the model does to its last hidden state."""
        return self.lm_head(self.final_norm(hidden))
