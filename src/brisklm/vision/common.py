"""Shared pieces of the visual-token methods: visibility rules, last-token attention scoring, row packing,
per-layer token accounting and analytic FLOPs.

The pruning methods score a layer from what the executor already computed there: an `AttentionTap`
(`Plan.on_attention`) keeps the last prompt row's rotated query and the layer's keys/values, and the decision
is taken when the next layer is reached (O(n d) for the scores, no projection recomputed).
`last_token_attention` (recomputation from the layer input) stays for analysis over recorded hidden states.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from brisklm.core.adapter import ModelAdapter
from brisklm.core.cache import RowMeta
from brisklm.core.plan import LayerStep, window_mask
from brisklm.errors import BriskError

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
        values = self.values
        if values.shape[1] != self.probs.shape[1]:  # KV heads: repeat for the query heads that share them
            values = values.repeat_interleave(self.probs.shape[1] // values.shape[1], dim=1)
        c = self.probs[..., None] * values  # (B, H, T, hd)
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


class AttentionTap:
    """`Plan.on_attention` hook: keeps, for the most recent layer, the last prompt row's rotated query (B, H, 1, hd),
    that row's metadata and the keys/values (B, H_kv, T, hd) with their metadata, as the executor computed them."""

    def __init__(self) -> None:
        self.layer = -1
        self.query: torch.Tensor | None = None
        self.q_meta: RowMeta = {}
        self.keys: torch.Tensor | None = None
        self.values: torch.Tensor | None = None
        self.k_meta: RowMeta = {}

    def __call__(self, layer_idx: int, query: torch.Tensor, q_meta: RowMeta, keys: torch.Tensor,
                 values: torch.Tensor, k_meta: RowMeta) -> None:
        last = q_meta["order"].masked_fill(~q_meta["valid"], -1).argmax(dim=1)  # each sample's last real query
        index = last[:, None, None, None].expand(-1, query.shape[1], 1, query.shape[3])
        self.query = query.gather(2, index)
        self.q_meta = {name: value.gather(1, last[:, None]) for name, value in q_meta.items()}
        self.keys, self.values, self.k_meta, self.layer = keys, values, k_meta, layer_idx


def tap_attention(tap: AttentionTap, adapter: ModelAdapter, layer_idx: int, visibility,
                  apply_window: bool = True) -> LastTokenAttention:
    """The last row's attention at `layer_idx` from the tapped query and keys (no projection recomputed).

    probs (B, H, T) over the tapped key rows (read their original rows from `tap.k_meta["row"]`); values are
    the tapped (B, H_kv, T, hd), repeated only if contributions are asked for.
    """
    if tap.layer != layer_idx or tap.query is None:
        raise BriskError(f"no attention was tapped at layer {layer_idx}: run the plan through the executor "
                         "(Plan.on_attention) and score a layer from the next layer's decision")
    q, k = tap.query, tap.keys
    batch, heads, _, hd = q.shape
    groups = heads // k.shape[1]
    grouped = q.reshape(batch, k.shape[1], groups, hd)  # query head h uses KV head h // groups
    scores = torch.matmul(grouped, k.transpose(2, 3)).reshape(batch, heads, -1) * adapter.attn_scaling(layer_idx)
    softcap = adapter.attn_softcap(layer_idx)
    if softcap is not None:
        scores = torch.tanh(scores / softcap) * softcap
    visible = visibility(tap.q_meta, tap.k_meta, layer_idx)[:, 0] & tap.k_meta["valid"]
    window = adapter.sliding_window(layer_idx) if apply_window else None
    if window is not None:
        visible = visible & window_mask(tap.q_meta, tap.k_meta, window)[:, 0]
    scores = scores.masked_fill(~visible[:, None], float("-inf"))
    probs = torch.softmax(scores.float(), dim=-1).to(tap.values.dtype)
    return LastTokenAttention(probs=probs, values=tap.values)


def to_stream(values: torch.Tensor, k_meta: RowMeta, meta: RowMeta, rows: int, fill: float) -> torch.Tensor:
    """Per-key values (B, T_k) re-indexed onto the stream's rows (B, T) through original row ids (`fill` where
    a stream row had no key); `rows` is the prompt's original length."""
    by_row = torch.full((values.shape[0], rows), fill, dtype=values.dtype, device=values.device)
    by_row.scatter_(1, k_meta["row"], values.masked_fill(~k_meta["valid"], fill))
    return by_row.gather(1, meta["row"])


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


def removal_step(keep: torch.Tensor, step: LayerStep | None) -> LayerStep:
    """A step that removes the rows outside `keep` (B, T) on entering the layer: they neither query, store
    keys nor go through the MLP here, and leave the stream after it (as if gathered out before the layer)."""
    index, valid = keep_step_rows(keep)
    base = step or LayerStep()
    rows = {name: keep if getattr(base, name) is None else getattr(base, name) & keep
            for name in ("attn_rows", "mlp_rows", "kv_rows")}
    return LayerStep(**rows, keep_after=index, keep_valid=valid)


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
    score_macs: float = 0.0  # MACs spent scoring (all samples), counted in flops_ratio

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


def scoring_macs(probs: torch.Tensor, head_dim: int, contributions: bool) -> float:
    """MACs of one tapped scoring: q.k over the keys (H * hd per key), plus ~5 more per key and channel for the
    contributions, o and the removal cosines (VisiPruner)."""
    batch, heads, keys = probs.shape
    return float(batch * keys * heads * head_dim) * (1 + (5 if contributions else 0))


def flops_ratio(record: PruneRecord, adapter: ModelAdapter, dense_rows: torch.Tensor) -> float:
    """Analytic LM prefill FLOPs of the pruned run, scoring included, over the dense run (per-sample n_l,
    summed, then ratio)."""
    d, m = adapter.hidden_size, adapter.intermediate_size
    pruned = sum(layer_macs(r.double(), d, m).sum() for r in record.rows) + record.score_macs
    dense = len(record.rows) * layer_macs(dense_rows.double(), d, m).sum()
    return float(pruned / dense)
