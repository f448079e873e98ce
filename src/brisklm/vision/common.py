"""Shared pieces of the visual-token methods: visibility rules, last-token attention scoring, row packing,
per-layer token accounting and analytic FLOPs.

Scoring recomputes the last prompt token's attention row from the layer's own norm, q/k/v projections and
rotary, read through the adapter (O(n d) per head, as PyramidDrop does), so it works whatever attention backend
the model uses and on every supported family.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from brisklm.core.adapter import ModelAdapter
from brisklm.core.cache import RowMeta
from brisklm.core.plan import window_mask

# ----------------------------------------------------------------------------------------------- visibility


@dataclass
class VisualVisibility:
    """Causal attention where, at `blocked_layers`, non-visual queries cannot see visual keys (except sinks).

    Row metadata read: "order", "visual" (bool), "sink" (bool), "row" (original index) and, when `dropped`
    is set, a (B, T0) bool over original rows of visual tokens removed by a masked (simulated) pruning.
    """

    blocked_layers: frozenset[int] = frozenset()
    allow_sink: bool = True
    dropped: torch.Tensor | None = None

    def __call__(self, query: RowMeta, key: RowMeta, layer_idx: int) -> torch.Tensor:
        visible = query["order"][:, :, None] >= key["order"][:, None, :]
        if layer_idx in self.blocked_layers:
            hidden_key = key["visual"] & ~key["sink"] if self.allow_sink else key["visual"]
            visible = visible & ~(~query["visual"][:, :, None] & hidden_key[:, None, :])
        if self.dropped is not None:
            gone = self.dropped.gather(1, key["row"])
            visible = visible & ~gone[:, None, :]
        return visible


def visual_row_meta(visual: torch.Tensor) -> RowMeta:
    """Row metadata for a prompt: which rows are image tokens and which is each image's first token (the sink)."""
    prev = torch.nn.functional.pad(visual[:, :-1], (1, 0), value=False)
    return {"visual": visual.clone(), "sink": visual & ~prev}


# ----------------------------------------------------------------------------------------------- scoring


@dataclass
class LastTokenAttention:
    """Last-row attention at one layer: probs (B, H, T) and values (B, H, T, hd) after KV-head repetition."""

    probs: torch.Tensor
    values: torch.Tensor

    def contributions(self) -> torch.Tensor:
        """c_j = concat_h(a_hj * v_hj): (B, T, H * hd), each key's share of the last token's attention output."""
        c = self.probs[..., None] * self.values  # (B, H, T, hd)
        return c.permute(0, 2, 1, 3).reshape(c.shape[0], c.shape[2], -1)

    def head_mean(self) -> torch.Tensor:
        """Head-averaged attention of the last row (B, T) (FastV / PyramidDrop ranking score)."""
        return self.probs.mean(dim=1)


def last_token_attention(adapter: ModelAdapter, layer_idx: int, hidden: torch.Tensor, meta: RowMeta,
                         visibility, apply_window: bool = True) -> LastTokenAttention:
    """Recompute the last row's attention at `layer_idx` from the layer input, under `visibility`.

    The layer's own norm, projections (fused or not, with any per-head q/k norms), rotary table, score scale
    and soft-cap come from the adapter; its sliding window holds on top of `visibility` (as in the executor)
    unless `apply_window` is False.
    """
    x = adapter.attn_input(layer_idx, hidden)
    (q,) = adapter.project(layer_idx, x[:, -1:], "q")
    k, v = adapter.project(layer_idx, x, "kv")  # (B, H_kv, T, hd) each, before rotary
    cos, sin = adapter.row_rotary(hidden, meta, layer_idx)  # M-RoPE axes where the rows carry them
    q = adapter.rotate(q, cos[:, -1:], sin[:, -1:])
    k = adapter.rotate(k, cos, sin)
    groups = adapter.num_heads // adapter.num_kv_heads
    if groups > 1:
        k, v = k.repeat_interleave(groups, dim=1), v.repeat_interleave(groups, dim=1)
    scores = torch.matmul(q, k.transpose(2, 3))[:, :, 0] * adapter.attn_scaling(layer_idx)  # (B, H, T)
    softcap = adapter.attn_softcap(layer_idx)
    if softcap is not None:
        scores = torch.tanh(scores / softcap) * softcap
    last = {name: value[:, -1:] for name, value in meta.items()}
    visible = visibility(last, meta, layer_idx)[:, 0] & meta["valid"]  # (B, T)
    window = adapter.sliding_window(layer_idx) if apply_window else None
    if window is not None:
        visible = visible & window_mask(last, meta, window)[:, 0]
    scores = scores.masked_fill(~visible[:, None], float("-inf"))
    probs = torch.softmax(scores.float(), dim=-1).to(v.dtype)
    return LastTokenAttention(probs=probs, values=v)


def removal_cosine(contrib: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """For each key j: cos(o - c_j, o) and ||c_j|| / ||o||, with o = sum_j c_j (B, T each)."""
    o = contrib.sum(dim=1, keepdim=True)
    cos = torch.nn.functional.cosine_similarity(o - contrib, o.expand_as(contrib), dim=-1, eps=1e-12)
    ratio = contrib.norm(dim=-1) / o.norm(dim=-1).clamp(min=1e-12)
    return cos, ratio


# ----------------------------------------------------------------------------------------------- rows


def pack_right(mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Indices (B, n) of the True rows of a (B, T) mask in order, right-aligned (padding first); and validity."""
    batch, length = mask.shape
    counts = mask.sum(dim=1)
    n = int(counts.max().item()) if batch else 0
    arange = torch.arange(length, device=mask.device)
    index = (mask.long() * length + arange).argsort(dim=1)[:, length - n:]
    valid = torch.arange(n, device=mask.device)[None, :] >= (n - counts)[:, None]
    return index, valid


def keep_step_rows(keep: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """keep_after indices and validity for a (B, T) keep mask (order preserved, padding first)."""
    return pack_right(keep)


# ----------------------------------------------------------------------------------------------- accounting


@dataclass
class PruneRecord:
    """What a pruning forward did: per-layer rows (B,) in the stream and visual rows, plus method events."""

    rows: list[torch.Tensor] = field(default_factory=list)
    visual: list[torch.Tensor] = field(default_factory=list)
    fusion_layer: torch.Tensor | None = None  # (B,) layer where VisiPruner fired (-1 = never)
    kept: torch.Tensor | None = None  # (B,) critical tokens kept at the fusion layer
    exit_layer: torch.Tensor | None = None  # (B,) layer after which all visual tokens left (-1 = never)
    layer_min_cos: list[torch.Tensor] = field(default_factory=list)

    def observe(self, layer_idx: int, meta: RowMeta) -> None:
        """Note how many real rows (and visual rows) enter layer `layer_idx`."""
        valid = meta["valid"]
        while len(self.rows) <= layer_idx:
            self.rows.append(None)  # type: ignore[arg-type]
            self.visual.append(None)  # type: ignore[arg-type]
        self.rows[layer_idx] = valid.sum(dim=1)
        self.visual[layer_idx] = (valid & meta["visual"]).sum(dim=1)

    def equivalent_tokens(self) -> float:
        """Visual tokens averaged over layers and samples (T_eq)."""
        return float(torch.stack(self.visual).float().mean())


def layer_macs(n: int | torch.Tensor, d: int, m: int):
    """One decoder layer's MACs over n tokens, SparseVLM convention: 4 n d^2 + 2 n^2 d + 3 n d m."""
    return 4 * n * d * d + 2 * n * n * d + 3 * n * d * m


def flops_ratio(record: PruneRecord, adapter: ModelAdapter, dense_rows: torch.Tensor) -> float:
    """Analytic LM prefill FLOPs of the pruned run over the dense run (per-sample n_l, summed, then ratio)."""
    d, m = adapter.hidden_size, adapter.intermediate_size
    pruned = sum(layer_macs(r.double(), d, m).sum() for r in record.rows)
    dense = len(record.rows) * layer_macs(dense_rows.double(), d, m).sum()
    return float(pruned / dense)
