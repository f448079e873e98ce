"""VisiPruner (training-free, three stages) as a plan for the core executor.

1. Shallow: for layers < `shallow_layers`, text queries stop attending to visual keys except each image's
   first token (a sink); visual tokens still attend to each other and go through the MLP.
2. Middle: from `detect_from` on, at each layer and per sample, the last prompt token's attention output o
   is split into per-key contributions c_j = concat_h(a_hj v_hj). The first layer where removing some visual
   token (o - c_j) drops cos(o - c_j, o) below `layer_threshold` is the fusion layer L*. The critical
   tokens are those with ||c_j|| / ||o|| >= `token_threshold` (relative, so scale-free); every other visual
   token is removed from the stream after L* (physically, keeping original position ids).
3. Deep: after pruning, a layer where every kept token passes cos(o - c_j, o) >= `exit_threshold` counts
   as "vision not needed"; after `exit_count` such layers, all visual tokens leave the stream.

Layout (where the image tokens are, how many) comes from the input; batches of several images work, each
sample with its own L*, kept set and exit layer. `mode="mask"` simulates the removal with visibility
(same logits as "gather"), for testing.

Layer l is scored from the query, keys and values the executor computed at l (an `AttentionTap`, nothing
recomputed); the decision is taken and applied on entering layer l + 1 (= removal after layer l), so the
last layer is never scored (a removal after it would change nothing).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from brisklm.core.adapter import ModelAdapter
from brisklm.core.cache import RowMeta
from brisklm.core.plan import LayerStep, Plan
from brisklm.errors import BriskError
from brisklm.vision.common import (
    AttentionTap,
    PruneRecord,
    VisualVisibility,
    removal_cosine,
    removal_step,
    scoring_macs,
    tap_attention,
    to_stream,
    visual_row_meta,
)


@dataclass
class VisiPrunerConfig:
    """Thresholds are relative: cosine similarities and contribution-norm ratios, never absolute norms.

    Default: no shallow stage. On the zoo LLaVA, which fuses the image into the text at layer 0, masking
    text->vision at layer 0 (shallow_layers=1) keeps 0.558 of dense, below an image-blind model; with 0 it keeps
    1.006 at a FLOPs ratio of 0.575 (256 ShapesVQA questions, scoring counted). Set shallow_layers for models
    whose first layers are vision-passive."""

    shallow_layers: int = 0
    detect_from: int | None = None  # first layer tested for fusion; None = shallow_layers
    layer_threshold: float = 0.995
    token_threshold: float = 0.1
    max_keep: int | None = None
    exit_threshold: float = 0.999
    exit_count: int = 2
    deep_exit: bool = True

    def check(self, num_layers: int) -> None:
        """Raise BriskError for settings outside their meaningful ranges."""
        if not 0 <= self.shallow_layers <= num_layers:
            raise BriskError(f"shallow_layers must be in [0, {num_layers}], got {self.shallow_layers}")
        if not 0.0 <= self.token_threshold <= 1.0:
            raise BriskError(f"token_threshold is a ratio ||c_j||/||o|| in [0, 1], got {self.token_threshold}")
        if self.max_keep is not None and self.max_keep < 0:
            raise BriskError(f"max_keep must be >= 0, got {self.max_keep}")
        if self.exit_count < 1:
            raise BriskError(f"exit_count must be >= 1, got {self.exit_count}")


class _VisiPrunerState:
    """Per-sample stage machine driven by the executor's `decide` hook."""

    def __init__(self, adapter: ModelAdapter, visual: torch.Tensor, config: VisiPrunerConfig, mode: str,
                 record: PruneRecord) -> None:
        self.adapter, self.config, self.mode, self.record = adapter, config, mode, record
        batch = visual.shape[0]
        self.visibility = VisualVisibility(frozenset(range(config.shallow_layers)), allow_sink=True,
                                           dropped=torch.zeros_like(visual) if mode == "mask" else None)
        device = visual.device  # the model's device: the stage flags meet the executor's tensors
        self.fired = torch.zeros(batch, dtype=torch.bool, device=device)
        self.exited = torch.zeros(batch, dtype=torch.bool, device=device)
        self.deep_hits = torch.zeros(batch, dtype=torch.long, device=device)
        record.fusion_layer = torch.full((batch,), -1, dtype=torch.long, device=device)
        record.kept = torch.full((batch,), -1, dtype=torch.long, device=device)
        record.exit_layer = torch.full((batch,), -1, dtype=torch.long, device=device)
        self.tap = AttentionTap()
        self.rows = visual.shape[1]

    def decide(self, layer_idx: int, hidden: torch.Tensor, meta: RowMeta, step: LayerStep | None) -> LayerStep | None:
        alive = meta["visual"] & meta["valid"]
        if self.visibility.dropped is not None:
            alive = alive & ~self.visibility.dropped.gather(1, meta["row"])
        scored = layer_idx - 1  # the layer whose attention decides what enters this one
        start = self.config.detect_from if self.config.detect_from is not None else self.config.shallow_layers
        active = ~self.exited & alive.any(dim=1)
        if not self.config.deep_exit:  # after firing, nothing is left to decide: stop scoring
            active = active & ~self.fired
        if scored < start or not bool(active.any()):
            self.record.observe(layer_idx, {**meta, "valid": meta["valid"] & (alive | ~meta["visual"])})
            return step
        scores = tap_attention(self.tap, self.adapter, scored, self.visibility)
        self.record.score_macs += scoring_macs(scores.probs, self.adapter.head_dim, contributions=True)
        key_cos, key_ratio = removal_cosine(scores.contributions())
        cos = to_stream(key_cos, self.tap.k_meta, meta, self.rows, 1.0).masked_fill(~alive, 1.0)
        ratio = to_stream(key_ratio, self.tap.k_meta, meta, self.rows, 0.0)
        self.record.layer_min_cos.append(cos.min(dim=1).values)
        remove = torch.zeros_like(alive)
        # middle stage: detect the fusion layer and keep the critical tokens
        fire = active & ~self.fired & (cos < self.config.layer_threshold).any(dim=1)
        if bool(fire.any()):
            critical = alive & (ratio >= self.config.token_threshold)
            if self.config.max_keep is not None:
                critical = critical & _top_mask(ratio.masked_fill(~alive, -1.0), self.config.max_keep)
            remove |= fire[:, None] & alive & ~critical
            self.fired |= fire
            self.record.fusion_layer[fire] = scored
            self.record.kept[fire] = critical.sum(dim=1)[fire]
            empty = fire & ~critical.any(dim=1)
            self.exited |= empty
            self.record.exit_layer[empty] = scored
        # deep stage: count layers where no kept token matters, then remove them all
        if self.config.deep_exit:
            deep = active & self.fired & ~fire
            unneeded = deep & (cos >= self.config.exit_threshold).all(dim=1)
            self.deep_hits += unneeded.long()
            leave = deep & (self.deep_hits >= self.config.exit_count)
            if bool(leave.any()):
                remove |= leave[:, None] & alive
                self.exited |= leave
                self.record.exit_layer[leave] = scored
        self.record.observe(layer_idx, {**meta, "valid": meta["valid"] & ((alive & ~remove) | ~meta["visual"])})
        if not bool(remove.any()):
            return step
        if self.mode == "mask":  # hidden as keys from this layer on (the rows stay in the stream)
            rows = torch.zeros_like(self.visibility.dropped)
            rows.scatter_(1, meta["row"], remove)
            self.visibility.dropped = self.visibility.dropped | rows
            return step
        return removal_step(~remove & (meta["valid"] | ~meta["visual"]), step)


def _top_mask(score: torch.Tensor, k: int) -> torch.Tensor:
    """(B, T) True at each row's k highest scores."""
    k = min(k, score.shape[1])
    mask = torch.zeros_like(score, dtype=torch.bool)
    if k > 0:
        mask.scatter_(1, score.topk(k, dim=1).indices, True)
    return mask


def visipruner_plan(model, visual: torch.Tensor, config: VisiPrunerConfig | None = None, mode: str = "gather",
                    record: PruneRecord | None = None, position_ids: torch.Tensor | None = None) -> Plan:
    """A plan that runs VisiPruner over a prompt whose image rows are `visual` (B, T) bool."""
    if mode not in ("gather", "mask"):
        raise BriskError(f"mode must be 'gather' (physical removal) or 'mask' (simulated), got {mode!r}")
    adapter = ModelAdapter.from_model(model)
    config = config or VisiPrunerConfig()
    config.check(adapter.num_layers)
    state = _VisiPrunerState(adapter, visual, config, mode, record if record is not None else PruneRecord())
    plan = Plan(position_ids=position_ids, visibility=state.visibility, row_meta=visual_row_meta(visual),
                decide=state.decide, on_attention=state.tap)
    plan.state = state  # type: ignore[attr-defined]  (callers may read the per-sample stages)
    return plan
