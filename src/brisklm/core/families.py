"""The transformers classes of each supported text family: one map for fixtures, tests and benchmarks."""

from __future__ import annotations

from typing import Any

# family -> (config class, causal-LM class), by name in `transformers` (resolved on use, so importing is cheap).
FAMILY_CLASSES: dict[str, tuple[str, str]] = {
    "llama": ("LlamaConfig", "LlamaForCausalLM"),
    "qwen2": ("Qwen2Config", "Qwen2ForCausalLM"),
    "qwen3": ("Qwen3Config", "Qwen3ForCausalLM"),
    "mistral": ("MistralConfig", "MistralForCausalLM"),
    "gemma2": ("Gemma2Config", "Gemma2ForCausalLM"),
    "gemma3": ("Gemma3TextConfig", "Gemma3ForCausalLM"),
    "phi3": ("Phi3Config", "Phi3ForCausalLM"),
}


def family_classes(family: str) -> tuple[Any, Any]:
    """(config class, model class) of a family, e.g. (Qwen2Config, Qwen2ForCausalLM)."""
    import transformers

    config_name, model_name = FAMILY_CLASSES[family]
    return getattr(transformers, config_name), getattr(transformers, model_name)
