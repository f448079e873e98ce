"""Count the floating-point operations a forward really performs, per layer and per module.

Counts come from real token counts (rows that entered each module, visible query-key pairs), so a plan
that skips or drops work shows up here. Convention: one multiply-add = 2 FLOPs; norms, rotary, softmax
and activations are not counted (they are O(d) per token, negligible next to the matmuls). Sizes come
from the module shapes; a fused qkv projection (Phi3) counts its q part for query rows and its k/v part for
key rows, the work a plan needs (it also computes the unused columns when those row sets differ).
"""

from __future__ import annotations

from collections import defaultdict

MODULES = ("q_proj", "kv_proj", "o_proj", "attn_scores", "mlp", "lm_head")


class FlopsCounter:
    """Accumulates FLOPs by (layer, module); pass one to `execute(..., flops=counter)`."""

    def __init__(self) -> None:
        self.counts: dict[tuple[int, str], int] = defaultdict(int)

    def add(self, layer_idx: int, module: str, flops: int) -> None:
        self.counts[(layer_idx, module)] += int(flops)

    def total(self) -> int:
        return sum(self.counts.values())

    def by_module(self) -> dict[str, int]:
        out: dict[str, int] = defaultdict(int)
        for (_, module), value in self.counts.items():
            out[module] += value
        return dict(out)

    def by_layer(self) -> dict[int, int]:
        out: dict[int, int] = defaultdict(int)
        for (layer, _), value in self.counts.items():
            out[layer] += value
        return dict(sorted(out.items()))

    def reset(self) -> None:
        self.counts.clear()


def _shape(module) -> tuple[int, int]:
    """(in, out) features of a linear (also a peft-wrapped one, which keeps both attributes)."""
    return int(module.in_features), int(module.out_features)


def layer_macs(adapter, layer_idx: int) -> dict[str, int]:
    """Multiply-adds per row of each module of one layer, read from the module shapes.

    A fused qkv projection is split by head counts (q: heads * head_dim, the rest k and v); the MLP is the sum
    over its own linears (gate+up+down, or a fused gate_up + down), so pruned widths count as they are.
    """
    layer = adapter.layers[layer_idx]
    attn = layer.self_attn
    fused = adapter.recipe.fused_qkv
    if fused is not None:
        d_in, out = _shape(getattr(attn, fused))
        q = adapter.num_heads * adapter.head_dim
        q_macs, kv_macs = d_in * q, d_in * (out - q)
    else:
        q_in, q_out = _shape(attn.q_proj)
        (k_in, k_out), (v_in, v_out) = _shape(attn.k_proj), _shape(attn.v_proj)
        q_macs, kv_macs = q_in * q_out, k_in * k_out + v_in * v_out
    o_in, o_out = _shape(attn.o_proj)
    mlp = sum(a * b for a, b in (_shape(m) for m in layer.mlp.children() if hasattr(m, "out_features")))
    return {"q_proj": q_macs, "kv_proj": kv_macs, "o_proj": o_in * o_out, "mlp": mlp}


def dense_forward_flops(adapter, num_tokens: int, context_tokens: int = 0, logits_rows: int | None = None) -> int:
    """Analytic FLOPs of a dense causal forward over `num_tokens` new tokens after `context_tokens` cached ones.

    Full causal attention pairs on every layer (a sliding window is not subtracted).
    """
    n, c = num_tokens, context_tokens
    pairs = n * c + n * (n + 1) // 2
    total = 0
    for idx in range(adapter.num_layers):
        macs = layer_macs(adapter, idx)
        total += 2 * n * (macs["q_proj"] + macs["kv_proj"] + macs["o_proj"] + macs["mlp"])
        total += 4 * adapter.num_heads * adapter.head_dim * pairs  # QK^T and AV
    rows = n if logits_rows is None else logits_rows
    return total + 2 * rows * adapter.hidden_size * adapter.vocab_size
