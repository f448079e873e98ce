"""Plans for the layer-loop executor: which rows go through which module, with which positions and keys.

Every method in brisklm (streaming masks, skipped modules, dropped visual tokens, cross-attention layers)
is a function that builds a `Plan`. Visibility is a rule over row metadata, so it stays correct when rows
are gathered, dropped or cached.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable, Protocol, Sequence

import torch

from brisklm.core.cache import RowMeta

WINDOW_KEY = "position"  # the row metadata a sliding window is measured over
ROPE_AXIS_KEY = "rope_axis"  # row metadata rope_axis0, rope_axis1, ...: a row's multi-axis rotary positions (M-RoPE)


def rope_meta(rope_position_ids: torch.Tensor) -> RowMeta:
    """(A, B, T) multi-axis rotary positions as row metadata (one (B, T) entry per axis), so that they follow the
    rows through gathers and drops and a scorer can rebuild the rows' rotary (`rope_positions`)."""
    return {f"{ROPE_AXIS_KEY}{i}": axis for i, axis in enumerate(rope_position_ids)}


def rope_positions(meta: RowMeta) -> torch.Tensor:
    """The rows' rotary positions: (A, B, T) from the M-RoPE axes in `meta` when it has them, else meta["position"]."""
    axes = []
    while f"{ROPE_AXIS_KEY}{len(axes)}" in meta:
        axes.append(meta[f"{ROPE_AXIS_KEY}{len(axes)}"])
    return torch.stack(axes) if axes else meta["position"]


class Visibility(Protocol):
    """Decides which keys each query may see: returns a bool tensor (B, Tq, Tk), True = visible."""

    def __call__(self, query: RowMeta, key: RowMeta, layer_idx: int) -> torch.Tensor: ...


def window_mask(query: RowMeta, key: RowMeta, window: int) -> torch.Tensor:
    """(B, Tq, Tk) True where the key's position is fewer than `window` before the query's.

    Measured over position ids. HF measures its window over the sequence index; the two agree wherever
    positions advance with the index up to a per-row constant (plain, left/right-padded and cached
    forwards), and positions stay the same when a plan streams, gathers or regroups rows (GPE, thinker,
    dropped tokens), so a streamed plan equals its one-pass reference under a window too. Arrival order
    would not: streaming plans number each group's rows on their own.
    """
    return query[WINDOW_KEY][:, :, None] - key[WINDOW_KEY][:, None, :] < window


@dataclass
class CausalVisibility:
    """Standard causal attention over arrival order (optionally a sliding window)."""

    window: int | None = None

    def __call__(self, query: RowMeta, key: RowMeta, layer_idx: int) -> torch.Tensor:
        visible = query["order"][:, :, None] >= key["order"][:, None, :]
        if self.window is not None:
            visible &= window_mask(query, key, self.window)
        return visible


@dataclass
class MatrixVisibility:
    """An explicit (B, N, N) boolean mask indexed by the rows' arrival order (e.g. a training mask)."""

    matrix: torch.Tensor

    def __call__(self, query: RowMeta, key: RowMeta, layer_idx: int) -> torch.Tensor:
        m = self.matrix
        b = torch.arange(m.shape[0], device=m.device)[:, None, None]
        return m[b, query["order"][:, :, None], key["order"][:, None, :]]


@dataclass
class LayerStep:
    """What happens at one decoder layer. Row masks are bool (B, T) over the layer's current rows.

    attn_rows: rows whose attention output is added (others keep their residual). None = all.
    mlp_rows:  rows that go through the MLP. None = all.
    kv_rows:   rows whose keys/values are computed and stored at this layer. None = all.
    keep_after: (B, T') long indices of the rows that stay in the stream after this layer. None = all.
    keep_valid: (B, T') bool, False marks padding entries of keep_after (samples that keep fewer rows than
        the batch maximum); those rows become invalid (never visible as keys). None = all valid.
    """

    attn_rows: torch.Tensor | None = None
    mlp_rows: torch.Tensor | None = None
    kv_rows: torch.Tensor | None = None
    keep_after: torch.Tensor | None = None
    keep_valid: torch.Tensor | None = None

    @property
    def is_noop(self) -> bool:
        return all(x is None for x in (self.attn_rows, self.mlp_rows, self.kv_rows, self.keep_after))


@dataclass
class Plan:
    """A whole forward: positions and metadata of the new rows, a visibility rule, and per-layer steps.

    position_ids: (B, T) rotary positions; None = continue after the cache (0.. without one).
    order: (B, T) arrival order used by causal rules; None = continue after the cache.
    rope_position_ids: (A, B, T) multi-axis rotary positions for models whose rotary takes them (Qwen2-VL's
        M-RoPE: temporal, height, width); cos/sin are gathered with the rows, so kept rows keep them. None =
        position_ids. position_ids stays the 1-D position (sliding windows, the cache's next position).
    visibility: rule for which keys a query sees; None = causal. The model's sliding window (per layer) is
        applied on top of any rule, over position ids (see `window_mask`), unless `apply_window` is False.
    row_meta: extra per-row tensors (B, T) that a visibility rule reads (stored with cached keys too).
    steps: one LayerStep (or None) per layer; None = dense.
    decide: optional rule `(layer_idx, hidden (B, T, D), meta, step) -> LayerStep | None` called when the
        layer is reached, for decisions that depend on the layer's input (e.g. token routers); its result
        replaces that layer's step. None = the static steps only.
    apply_window: False when the rule decides windows itself (or means to ignore the model's window).
    on_attention: optional tap `(layer_idx, query, q_meta, keys, values, k_meta) -> None` called at each layer
        with the rotated queries of the querying rows and the keys/values they attend to (cache included,
        context excluded), so a method can score attention without recomputing projections. None = no tap.
    """

    position_ids: torch.Tensor | None = None
    order: torch.Tensor | None = None
    rope_position_ids: torch.Tensor | None = None
    visibility: Visibility | None = None
    row_meta: RowMeta = field(default_factory=dict)
    steps: Sequence[LayerStep | None] | None = None
    decide: Callable[[int, torch.Tensor, RowMeta, LayerStep | None], LayerStep | None] | None = None
    apply_window: bool = True
    on_attention: Callable[..., None] | None = None

    def step(self, layer_idx: int) -> LayerStep | None:
        if self.steps is None:
            return None
        step = self.steps[layer_idx]
        return None if step is None or step.is_noop else step
