"""Core: model adapter, layer-loop executor and its plans, KV cache, generation loop, FLOPs counter, timing."""

from brisklm.core.adapter import SUPPORTED_FAMILIES, ModelAdapter
from brisklm.core.cache import KVCache
from brisklm.core.executor import AttentionRecord, ExecutorOutput, execute
from brisklm.core.flops import FlopsCounter, dense_forward_flops
from brisklm.core.generate import generate
from brisklm.core.plan import CausalVisibility, LayerStep, MatrixVisibility, Plan

__all__ = [
    "SUPPORTED_FAMILIES",
    "AttentionRecord",
    "CausalVisibility",
    "ExecutorOutput",
    "FlopsCounter",
    "KVCache",
    "LayerStep",
    "MatrixVisibility",
    "ModelAdapter",
    "Plan",
    "dense_forward_flops",
    "execute",
    "generate",
]
