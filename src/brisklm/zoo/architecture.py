"""Tiny Llama-architecture configurations for the default zoo (about 1-10M parameters)."""

from __future__ import annotations

from transformers import LlamaConfig, LlamaForCausalLM

from brisklm.errors import BriskError

SIZES: dict[str, dict[str, int]] = {
    # name: hidden, layers, heads, kv_heads, intermediate
    "tiny": dict(hidden_size=128, num_hidden_layers=4, num_attention_heads=4, num_key_value_heads=2, intermediate_size=352),
    "small": dict(hidden_size=192, num_hidden_layers=6, num_attention_heads=6, num_key_value_heads=2, intermediate_size=512),
    "deep": dict(hidden_size=128, num_hidden_layers=8, num_attention_heads=4, num_key_value_heads=2, intermediate_size=352),
}


def tiny_llama_config(vocab_size: int, size: str = "tiny", pad_token_id: int = 0, bos_token_id: int = 2,
                      eos_token_id: int = 3, max_positions: int = 512, **overrides) -> LlamaConfig:
    """A LlamaConfig of a named size for a word-level vocabulary (untied head, eager-free sdpa attention)."""
    if size not in SIZES:
        raise BriskError(f"unknown model size {size!r}; choose one of {', '.join(SIZES)}")
    params = dict(SIZES[size])
    params.update(overrides)
    return LlamaConfig(
        vocab_size=vocab_size,
        max_position_embeddings=max_positions,
        rms_norm_eps=1e-5,
        rope_theta=10000.0,
        pad_token_id=pad_token_id,
        bos_token_id=bos_token_id,
        eos_token_id=eos_token_id,
        tie_word_embeddings=False,
        **params,
    )


def new_model(config: LlamaConfig, seed: int) -> LlamaForCausalLM:
    """A freshly initialised model, deterministic under `seed`."""
    import torch

    torch.manual_seed(seed)
    return LlamaForCausalLM(config)


def count_parameters(model) -> int:
    return sum(p.numel() for p in model.parameters())
