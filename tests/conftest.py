"""Shared fixtures: tiny random models of every supported family (no downloads)."""

import pytest
import torch
from transformers import (
    LlamaConfig,
    LlamaForCausalLM,
    MistralConfig,
    MistralForCausalLM,
    Qwen2Config,
    Qwen2ForCausalLM,
    Qwen3Config,
    Qwen3ForCausalLM,
)

FAMILIES = {
    "llama": (LlamaConfig, LlamaForCausalLM),
    "qwen2": (Qwen2Config, Qwen2ForCausalLM),
    "qwen3": (Qwen3Config, Qwen3ForCausalLM),
    "mistral": (MistralConfig, MistralForCausalLM),
}


@pytest.fixture
def one_thread():
    """Run a test with one torch thread (tiny per-token steps: threads only add contention)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def tiny_model(family: str = "llama", layers: int = 3, kv_heads: int = 2, seed: int = 0):
    """A random fp32 model of the family: d=64, 4 heads (GQA with 2 KV heads by default), vocab 97."""
    torch.manual_seed(seed)
    config_cls, model_cls = FAMILIES[family]
    config = config_cls(
        vocab_size=97,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=layers,
        num_attention_heads=4,
        num_key_value_heads=kv_heads,
        max_position_embeddings=256,
    )
    return model_cls(config).eval()


@pytest.fixture(params=sorted(FAMILIES))
def family_model(request):
    return request.param, tiny_model(request.param)


@pytest.fixture
def llama_model():
    return tiny_model("llama")
