"""Find the pieces of a Hugging Face decoder-only model (embeddings, layers, norms, rotary, head) by family.

Each family is described once, as data (`LayerRecipe`): where its norms sit around attention and the MLP,
whether q/k/v come from one fused projection, whether it has per-head q/k norms, soft-capping and rotary per
layer type. The executor reads the recipe through the adapter's methods and never re-implements a module's
maths: norms, projections, rotary, MLP and head are the model's own modules.
"""

from __future__ import annotations

import sys
from dataclasses import dataclass
from typing import Callable, Hashable

import torch
from torch import nn
from transformers import PretrainedConfig

from brisklm.errors import PlanError, UnsupportedModelError


@dataclass(frozen=True)
class LayerRecipe:
    """Where one family's decoder layer keeps its modules, and which extra maths HF applies around them.

    attn_norm / mlp_norm: the layer's norms before attention / before the MLP.
    attn_out / mlp_out: a module applied to the attention / MLP output before the residual add (Gemma's
        post-attention and post-feed-forward norms, Phi3's residual dropouts); None = none.
    fused_qkv: name of one projection that yields q, k, v side by side (Phi3 `qkv_proj`); None = q/k/v_proj.
    fused_gate_up: name of one MLP projection that yields gate then up, halves side by side (Phi3
        `gate_up_proj`); None = gate_proj/up_proj. Read by code that edits MLP channels (width pruning).
    head_norms: per-head norms applied to q and k before rotary (Qwen3, Gemma3); None = none.
    attn_softcap: HF applies `config.attn_logit_softcapping` to the attention scores (Gemma2 only; HF's
        Gemma3 attention does not pass it on).
    final_softcap: the *ForCausalLM head applies `config.final_logit_softcapping` to the logits.
    rope_per_layer_type: the rotary module takes a layer type (Gemma3: a local base for sliding layers).
    """

    attn_norm: str = "input_layernorm"
    mlp_norm: str = "post_attention_layernorm"
    attn_out: str | None = None
    mlp_out: str | None = None
    fused_qkv: str | None = None
    fused_gate_up: str | None = None
    head_norms: tuple[str, str] | None = None
    attn_softcap: bool = False
    final_softcap: bool = False
    rope_per_layer_type: bool = False


_GEMMA = dict(attn_out="post_attention_layernorm", mlp_norm="pre_feedforward_layernorm",
              mlp_out="post_feedforward_layernorm", final_softcap=True)
RECIPES: dict[str, LayerRecipe] = {
    "llama": LayerRecipe(),
    "qwen2": LayerRecipe(),
    "qwen3": LayerRecipe(head_norms=("q_norm", "k_norm")),
    "mistral": LayerRecipe(),
    "gemma2": LayerRecipe(**_GEMMA, attn_softcap=True),
    "gemma3": LayerRecipe(**_GEMMA, head_norms=("q_norm", "k_norm"), rope_per_layer_type=True),
    "phi3": LayerRecipe(fused_qkv="qkv_proj", fused_gate_up="gate_up_proj", attn_out="resid_attn_dropout",
                        mlp_out="resid_mlp_dropout"),
    # Qwen2-VL / Qwen2.5-VL text models: Qwen2 layers; their rotary module takes (3, B, T) M-RoPE positions
    # (temporal, height, width) and applies the config's mrope_section itself (see Plan.rope_position_ids).
    "qwen2_vl": LayerRecipe(),
}
MULTIMODAL_ONLY: tuple[str, ...] = ("qwen2_vl",)  # text families that exist only inside a multimodal wrapper
SUPPORTED_FAMILIES: tuple[str, ...] = tuple(f for f in RECIPES if f not in MULTIMODAL_ONLY)  # causal LMs
MODEL_TYPES: dict[str, str] = {"gemma3_text": "gemma3", "qwen2_vl_text": "qwen2_vl",
                               "qwen2_5_vl_text": "qwen2_vl"}  # HF model_type -> family, where they differ
MULTIMODAL_WRAPPERS: tuple[str, ...] = ("llava", "gemma3", "qwen2_vl", "qwen2_5_vl")


def unwrap_model(model: nn.Module) -> nn.Module:
    """The HF model inside DDP / FSDP / DeepSpeed-style wrappers (anything with `.module` and no HF config)."""
    while not isinstance(getattr(model, "config", None), PretrainedConfig) and isinstance(
        getattr(model, "module", None), nn.Module
    ):
        model = model.module
    return model


def _family_and_base(model: nn.Module):
    config = getattr(model, "config", None)
    model_type = getattr(config, "model_type", None)
    if model_type in MULTIMODAL_WRAPPERS:
        text_config = config.get_text_config()
        return text_config, text_config.model_type, getattr(getattr(model, "model", None), "language_model", None), True
    return config, model_type, getattr(model, "model", None), False


@dataclass
class ModelAdapter:
    """Handles to one decoder-only language model's modules and its family recipe, found once per forward."""

    model: nn.Module
    family: str
    config: object
    embed_tokens: nn.Embedding
    layers: nn.ModuleList
    final_norm: nn.Module
    rotary_emb: nn.Module
    lm_head: nn.Module
    apply_rotary: Callable[..., tuple[torch.Tensor, torch.Tensor]]
    recipe: LayerRecipe = LayerRecipe()
    final_logit_softcap: float | None = None

    @classmethod
    def from_model(cls, model: nn.Module) -> "ModelAdapter":
        """Build the adapter for a supported causal LM (or the text part of a LLaVA / Gemma3 model), unwrapped."""
        if isinstance(model, ModelAdapter):
            return model
        model = unwrap_model(model)
        text_config, model_type, base, multimodal = _family_and_base(model)
        family = MODEL_TYPES.get(model_type, model_type)
        if family not in RECIPES:
            raise UnsupportedModelError(
                f"model family {family!r} is not supported; brisklm supports {', '.join(SUPPORTED_FAMILIES)} "
                "causal LMs (and LLaVA / Gemma3 multimodal models whose text model is one of them, "
                "and Qwen2-VL / Qwen2.5-VL)"
            )
        if base is None or not hasattr(base, "layers") or not hasattr(model, "lm_head"):
            raise UnsupportedModelError(
                f"{type(model).__name__} has no decoder layers and LM head; pass the *ForCausalLM model, "
                "e.g. AutoModelForCausalLM.from_pretrained(path)"
            )
        if getattr(text_config, "use_bidirectional_attention", False):
            raise UnsupportedModelError(
                f"this {family} config uses bidirectional attention (an encoder, not a causal LM); "
                "pass a causal checkpoint (use_bidirectional_attention=false)"
            )
        recipe = RECIPES[family]
        first_attn = base.layers[0].self_attn
        apply_rotary = getattr(sys.modules[type(first_attn).__module__], "apply_rotary_pos_emb")
        # The softcap is part of the *ForCausalLM head; HF's multimodal wrappers apply the lm_head only.
        softcap = getattr(text_config, "final_logit_softcapping", None) if recipe.final_softcap and not multimodal else None
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
            recipe=recipe,
            final_logit_softcap=softcap,
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
        """The attention window of a layer (None for full attention), as the HF model would apply it.

        Qwen2/3 and Gemma2/3 attention modules carry their own (from `layer_types`, None on full layers);
        Mistral and Phi3 apply `config.sliding_window` to every layer.
        """
        attn = self.layers[layer_idx].self_attn
        if hasattr(attn, "sliding_window"):
            return attn.sliding_window
        return getattr(self.config, "sliding_window", None)

    def attn_softcap(self, layer_idx: int) -> float | None:
        """Tanh soft-cap of a layer's attention scores (None = none), where HF's attention applies one."""
        if not self.recipe.attn_softcap:
            return None
        return getattr(self.layers[layer_idx].self_attn, "attn_logit_softcapping", None)

    def attn_scaling(self, layer_idx: int) -> float:
        """The score scale of a layer's attention (Gemma: query_pre_attn_scalar**-0.5, else head_dim**-0.5)."""
        return float(self.layers[layer_idx].self_attn.scaling)

    # ------------------------------------------------------------------------------------- rotary
    def rope_kind(self, layer_idx: int) -> Hashable:
        """Which rotary table a layer uses (its layer type for Gemma3, else one shared table: None)."""
        return self.config.layer_types[layer_idx] if self.recipe.rope_per_layer_type else None

    def rotary(self, hidden: torch.Tensor, position_ids: torch.Tensor, layer_idx: int | None = None
               ) -> tuple[torch.Tensor, torch.Tensor]:
        """cos/sin of shape (B, T, rotary_dim) for arbitrary per-row position ids, for `layer_idx`'s table.

        position_ids is (B, T), or (3, B, T) M-RoPE positions for the Qwen2-VL family (whose rotary module
        builds each frequency band from its own axis, by the config's mrope_section)."""
        if self.recipe.rope_per_layer_type:
            if layer_idx is None:
                raise PlanError(f"{self.family} uses a different rotary base per layer type; pass layer_idx to rotary()")
            return self.rotary_emb(hidden, position_ids, self.rope_kind(layer_idx))
        return self.rotary_emb(hidden, position_ids)

    def row_rotary(self, hidden: torch.Tensor, meta: dict, layer_idx: int | None = None
                   ) -> tuple[torch.Tensor, torch.Tensor]:
        """cos/sin of rows from their metadata: their M-RoPE axes when the rows carry them, else their positions."""
        from brisklm.core.plan import rope_positions

        return self.rotary(hidden, rope_positions(meta), layer_idx)

    def rotaries(self, hidden: torch.Tensor, position_ids: torch.Tensor) -> dict[Hashable, tuple[torch.Tensor, torch.Tensor]]:
        """cos/sin for every rotary table the layers use, keyed by `rope_kind`."""
        first = {}
        for idx in range(self.num_layers):
            first.setdefault(self.rope_kind(idx), idx)
        return {kind: self.rotary(hidden, position_ids, idx) for kind, idx in first.items()}

    def rotate(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        """Apply the family's own rotary function to heads (B, H, T, hd) (partial rotary where configured)."""
        return self.apply_rotary(x, x, cos, sin)[0]

    # ------------------------------------------------------------------------------------- layer pieces
    def attn_input(self, layer_idx: int, x: torch.Tensor) -> torch.Tensor:
        """The layer's norm before attention."""
        return getattr(self.layers[layer_idx], self.recipe.attn_norm)(x)

    def project(self, layer_idx: int, x: torch.Tensor, parts: str = "qkv") -> tuple[torch.Tensor, ...]:
        """Normed rows (B, T, D) -> the requested heads among q, k, v, each (B, H, T, hd), before rotary.

        Uses the layer's own projections (split by head counts when fused) and per-head q/k norms.
        """
        attn = self.layers[layer_idx].self_attn
        batch, length, _ = x.shape
        if self.recipe.fused_qkv is not None:
            fused = getattr(attn, self.recipe.fused_qkv)(x)
            nq, nkv = self.num_heads * self.head_dim, self.num_kv_heads * self.head_dim
            flat = dict(zip("qkv", fused.split([nq, nkv, nkv], dim=-1)))
        else:
            flat = {p: getattr(attn, f"{p}_proj")(x) for p in parts}
        norms = dict(zip("qk", self.recipe.head_norms)) if self.recipe.head_norms else {}
        out = []
        for p in parts:
            y = flat[p].view(batch, length, -1, self.head_dim)
            if p in norms:
                y = getattr(attn, norms[p])(y)
            out.append(y.transpose(1, 2))
        return tuple(out)

    def module_name(self, name: str) -> str:
        """The family's name for a projection given by its unfused name: q/k/v_proj -> the fused qkv projection,
        gate/up_proj -> the fused gate_up projection where the family fuses them (e.g. LoRA target modules)."""
        if name in ("q_proj", "k_proj", "v_proj") and self.recipe.fused_qkv is not None:
            return self.recipe.fused_qkv
        if name in ("gate_proj", "up_proj") and self.recipe.fused_gate_up is not None:
            return self.recipe.fused_gate_up
        return name

    def attn_output(self, layer_idx: int, context: torch.Tensor) -> torch.Tensor:
        """Attention context (B, T, H*hd) -> what the layer adds to the residual (o_proj, then any post-norm)."""
        layer = self.layers[layer_idx]
        out = layer.self_attn.o_proj(context)
        return out if self.recipe.attn_out is None else getattr(layer, self.recipe.attn_out)(out)

    def mlp(self, layer_idx: int, x: torch.Tensor) -> torch.Tensor:
        """Residual rows (B, T, D) -> what the layer's MLP adds to them (pre-norm, mlp, any post-norm)."""
        layer = self.layers[layer_idx]
        out = layer.mlp(getattr(layer, self.recipe.mlp_norm)(x))
        return out if self.recipe.mlp_out is None else getattr(layer, self.recipe.mlp_out)(out)

    def logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """Final norm, LM head and any final soft-cap: what the model does to its last hidden state."""
        logits = self.lm_head(self.final_norm(hidden))
        cap = self.final_logit_softcap
        return logits if cap is None else torch.tanh(logits / cap) * cap
