"""A SkipOPU-style decode cost model for a bandwidth-bound accelerator running token-routed models.

Per decode step and layer: a module's weights are read from HBM when any token of the batch executes it
(k/v projections always under FULL); each executing query reads the K/V entries it can see; under REUSE
the carried entries point to an earlier layer's K/V and can be served by an on-chip KV history buffer
(LRU, `buffer_entries` per sequence). Reports bytes per token, buffer hit rate, tokens/s under a
bandwidth and compute roof, and bandwidth efficiency (dense bytes per token / routed bytes per token).
"""

from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass

import torch

from brisklm.errors import BriskError
from brisklm.pruning.kv import check_policy


@dataclass
class Device:
    """A bandwidth-bound accelerator (defaults: AMD Alveo U280-like HBM and a modest compute roof)."""

    bandwidth_gbs: float = 460.0
    compute_tflops: float = 2.0
    weight_bytes: float = 1.0  # int8 weights (float-fixed hybrid)
    kv_bytes: float = 2.0  # fp16 K/V


def _module_bytes(d: int, h: int, hkv: int, hd: int, m: int, w: float) -> dict[str, float]:
    return {"q_o": 2 * d * h * hd * w, "k_v": 2 * d * hkv * hd * w, "mlp": 3 * d * m * w, "router": 4 * d * w}


def decode_cost(attn: torch.Tensor, mlp: torch.Tensor, dims: dict[str, int], policy: str = "full",
                prompt_len: int = 1, device: Device | None = None, buffer_entries: int = 64) -> dict[str, float]:
    """Cost of decoding positions prompt_len..T-1 given execute decisions attn/mlp (L, B, T) bool."""
    check_policy(policy)
    if attn.dim() != 3 or attn.shape != mlp.shape:
        raise BriskError(f"decisions must be (layers, batch, tokens) bool tensors of one shape; got {tuple(attn.shape)}")
    device = device or Device()
    n_layers, batch, length = attn.shape
    if not 1 <= prompt_len < length:
        raise BriskError(f"prompt_len must be in [1, {length - 1}] for {length} tokens")
    d, h, hkv, hd, m = (dims[k] for k in ("hidden_size", "num_heads", "num_kv_heads", "head_dim", "intermediate_size"))
    mod = _module_bytes(d, h, hkv, hd, m, device.weight_bytes)
    entry = 2 * hkv * hd * device.kv_bytes
    # Last layer at or before l where each token executed attention (-1 = never): (L, B, T).
    executed_layer = torch.where(attn, torch.arange(n_layers)[:, None, None], torch.full_like(attn, -1, dtype=torch.long))
    last_exec = executed_layer.cummax(dim=0).values
    weights = kv = dense_weights = dense_kv = 0.0
    hits = carried_reads = 0
    flops = dense_flops = 0.0
    buffers = [OrderedDict() for _ in range(batch)]
    steps = length - prompt_len
    for p in range(prompt_len, length):
        for l in range(n_layers):
            a, f = attn[l, :, p], mlp[l, :, p]  # (B,)
            dense_weights += mod["q_o"] + mod["k_v"] + mod["mlp"]
            dense_kv += batch * (p + 1) * entry
            dense_flops += batch * (2 * (mod["q_o"] + mod["k_v"] + mod["mlp"]) / device.weight_bytes + 4 * h * hd * (p + 1))
            weights += mod["router"]
            if bool(a.any()):
                weights += mod["q_o"]
            if policy == "full" or bool(a.any()):
                weights += mod["k_v"]
            if bool(f.any()):
                weights += mod["mlp"]
            n_kv_rows = batch if policy == "full" else int(a.sum())
            flops += 2 * (mod["q_o"] * int(a.sum()) + mod["k_v"] * n_kv_rows + mod["mlp"] * int(f.sum())) / device.weight_bytes
            for b in range(batch):
                if not bool(a[b]):
                    continue
                ctx = slice(0, p + 1)
                if policy == "full":
                    kv += (p + 1) * entry
                    flops += 4 * h * hd * (p + 1)
                    continue
                own = int(attn[l, b, ctx].sum())
                kv += own * entry
                flops += 4 * h * hd * own
                if policy == "reuse":
                    carried = (~attn[l, b, ctx]) & (last_exec[l, b, ctx] >= 0)
                    for t in carried.nonzero().flatten().tolist():
                        key = (t, int(last_exec[l, b, t]))
                        carried_reads += 1
                        flops += 4 * h * hd
                        if key in buffers[b]:
                            hits += 1
                            buffers[b].move_to_end(key)
                        else:
                            kv += entry
                            buffers[b][key] = True
                            if len(buffers[b]) > buffer_entries:
                                buffers[b].popitem(last=False)
    tokens = steps * batch
    routed = (weights + kv) / tokens
    dense = (dense_weights + dense_kv) / tokens
    bw = device.bandwidth_gbs * 1e9
    peak = device.compute_tflops * 1e12
    tps = min(bw / routed, peak / (flops / tokens))
    dense_tps = min(bw / dense, peak / (dense_flops / tokens))
    return {
        "policy": policy, "batch": batch, "decode_steps": steps,
        "bytes_per_token": routed, "dense_bytes_per_token": dense,
        "weight_bytes_per_token": weights / tokens, "kv_bytes_per_token": kv / tokens,
        "bandwidth_efficiency_vs_dense": dense / routed,
        "tokens_per_s": tps, "dense_tokens_per_s": dense_tps, "speedup_vs_dense": tps / dense_tps,
        "history_buffer_hit_rate": hits / carried_reads if carried_reads else None,
    }
