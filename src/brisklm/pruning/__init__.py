"""Pruning and dynamic computation: static depth/width pruning, SkipGPT routers, a sparse executor that
really skips work, KV policies for skipped tokens, and a SkipOPU-style decode cost model."""

from brisklm.pruning.depth import block_influence, prune_depth, remove_layers, select_layers
from brisklm.pruning.gating import GatedRouting, masked_forward
from brisklm.pruning.hardware import Device, decode_cost
from brisklm.pruning.kv import KV_POLICIES, ReuseKVCache, kv_bytes
from brisklm.pruning.routers import RouterSet, TokenRouter
from brisklm.pruning.skipgpt import SkipGPTOptions, save_skipgpt, train_lora, train_routers
from brisklm.pruning.skipmodel import SkipGPTModel, has_routers, load_skipgpt
from brisklm.pruning.sparse import RoutingRecord, router_plan, sparse_forward, sparse_generate
from brisklm.pruning.width import activation_norms, prune_structured, prune_unstructured

__all__ = [
    "KV_POLICIES", "Device", "GatedRouting", "ReuseKVCache", "RouterSet", "RoutingRecord", "SkipGPTModel", "SkipGPTOptions",
    "TokenRouter", "activation_norms", "block_influence", "decode_cost", "has_routers", "kv_bytes", "load_skipgpt",
    "masked_forward", "prune_depth", "prune_structured", "prune_unstructured", "remove_layers", "router_plan",
    "save_skipgpt", "select_layers", "sparse_forward", "sparse_generate", "train_lora", "train_routers",
]
