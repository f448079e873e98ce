"""Count the floating-point operations a forward really performs, per layer and per module.

Counts come from real token counts (rows that entered each module, visible query-key pairs), so a plan
that skips or drops work shows up here. Convention: one multiply-add = 2 FLOPs; norms, rotary, softmax
and activations are not counted (they are O(d) per token, negligible next to the matmuls).
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


def dense_forward_flops(adapter, num_tokens: int, context_tokens: int = 0, logits_rows: int | None = None) -> int:
    """Analytic FLOPs of a dense causal forward over `num_tokens` new tokens after `context_tokens` cached ones."""
    d, h, hkv, hd = adapter.hidden_size, adapter.num_heads, adapter.num_kv_heads, adapter.head_dim
    n, c = num_tokens, context_tokens
    pairs = n * c + n * (n + 1) // 2
    per_layer = (
        2 * n * d * h * hd  # q
        + 4 * n * d * hkv * hd  # k, v
        + 2 * n * h * hd * d  # o
        + 4 * h * hd * pairs  # QK^T and AV
        + 6 * n * d * adapter.intermediate_size  # gate, up, down
    )
    rows = n if logits_rows is None else logits_rows
    return adapter.num_layers * per_layer + 2 * rows * d * adapter.vocab_size
