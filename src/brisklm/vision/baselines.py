"""Baselines at fixed visual-token budgets, as executor plans: FastV, PyramidDrop and random selection.

FastV: after layer K-1, keep the `keep` visual tokens the last prompt token attends to most (head mean).
PyramidDrop: at each stage layer, keep the top `keeps[i]` of the surviving visual tokens by the same score.
Random: after layer K-1, keep `keep` visual tokens drawn uniformly (seeded). Kept tokens keep their
original positions; every sample of a batch keeps exactly min(budget, its visual tokens).
The score of stage layer l is read from the query and keys the executor computed at l (an `AttentionTap`);
the removal is decided and applied on entering layer l + 1, which equals removing the rows after layer l.
"""

from __future__ import annotations

from typing import Sequence

import torch

from brisklm.core.adapter import ModelAdapter
from brisklm.core.cache import RowMeta
from brisklm.core.plan import LayerStep, Plan
from brisklm.errors import BriskError
from brisklm.vision.common import (
    AttentionTap,
    PruneRecord,
    VisualVisibility,
    removal_step,
    scoring_macs,
    tap_attention,
    to_stream,
    visual_row_meta,
)


def _keep_top(score: torch.Tensor, alive: torch.Tensor, k: int) -> torch.Tensor:
    """(B, T) mask of the k best-scoring alive rows per sample (all alive rows when fewer)."""
    score = score.masked_fill(~alive, float("-inf"))
    k = min(k, score.shape[1])
    top = torch.zeros_like(alive)
    if k > 0:
        top.scatter_(1, score.topk(k, dim=1).indices, True)
    return top & alive


def staged_plan(model, visual: torch.Tensor, stages: Sequence[tuple[int, int]], score: str = "attention",
                seed: int = 0, record: PruneRecord | None = None, position_ids: torch.Tensor | None = None) -> Plan:
    """Prune visual tokens after each (layer, keep) stage, ranked by last-token attention ("attention"), at
    random, or keeping the least attended ("bottom", a wrong rule that quality tests must tell apart)."""
    adapter = ModelAdapter.from_model(model)
    layers = [layer for layer, _ in stages]
    if sorted(set(layers)) != layers:
        raise BriskError(f"stage layers must be strictly increasing, got {layers}")
    for layer, keep in stages:
        if not 0 <= layer < adapter.num_layers - 1:
            raise BriskError(f"stage layer {layer} is outside [0, {adapter.num_layers - 1}): tokens are pruned after "
                             "a layer and before the next one, so the last layer cannot be a stage")
        if keep < 0:
            raise BriskError(f"a stage keeps a non-negative number of visual tokens, got {keep}")
    if score not in ("attention", "random", "bottom"):
        raise BriskError(f"score must be 'attention', 'random' or 'bottom', got {score!r}")
    record = record if record is not None else PruneRecord()
    visibility = VisualVisibility()
    by_layer = dict(stages)
    generator = torch.Generator().manual_seed(seed)
    tap = AttentionTap()
    rows = visual.shape[1]

    def decide(layer_idx: int, hidden: torch.Tensor, meta: RowMeta, step: LayerStep | None) -> LayerStep | None:
        stage = layer_idx - 1  # the layer whose attention decides what enters this one
        if stage not in by_layer:
            record.observe(layer_idx, meta)
            return step
        alive = meta["visual"] & meta["valid"]
        if score == "random":
            values = torch.rand(alive.shape, generator=generator, device="cpu").to(alive.device)  # cpu RNG stream
        else:
            attention = tap_attention(tap, adapter, stage, visibility)
            record.score_macs += scoring_macs(attention.probs, adapter.head_dim, contributions=False)
            values = to_stream(attention.head_mean().float(), tap.k_meta, meta, rows, float("-inf"))
            if score == "bottom":  # the least-attended tokens: a deliberately wrong rule (ablation, tests)
                values = -values
        keep = _keep_top(values, alive, by_layer[stage]) | ~meta["visual"]
        record.observe(layer_idx, {**meta, "valid": meta["valid"] & keep})
        return removal_step(keep, step)

    return Plan(position_ids=position_ids, visibility=visibility, row_meta=visual_row_meta(visual), decide=decide,
                on_attention=tap)


def fastv_plan(model, visual: torch.Tensor, keep: int, layer: int = 2, **kw) -> Plan:
    """FastV: prune once, after layer `layer`-1 (i.e. tokens enter layer `layer` pruned), to `keep` tokens."""
    if layer < 1:
        raise BriskError(f"FastV prunes after layer K-1, so K must be >= 1; got {layer}")
    return staged_plan(model, visual, [(layer - 1, keep)], "attention", **kw)


def random_plan(model, visual: torch.Tensor, keep: int, layer: int = 2, seed: int = 0, **kw) -> Plan:
    """Random selection at FastV's place: `keep` uniformly drawn visual tokens (seeded)."""
    if layer < 1:
        raise BriskError(f"random pruning happens after layer K-1, so K must be >= 1; got {layer}")
    return staged_plan(model, visual, [(layer - 1, keep)], "random", seed=seed, **kw)


def pdrop_stages(num_layers: int, first_keep: int, ratio: float = 0.5, num_stages: int = 3) -> list[tuple[int, int]]:
    """PyramidDrop schedule: drop after layers L/4, L/2, 3L/4 (scaled), keeping first_keep * ratio^i."""
    if not 0.0 < ratio <= 1.0:
        raise BriskError(f"PyramidDrop ratio (lambda) must be in (0, 1], got {ratio}")
    layers = [max(0, round(num_layers * (i + 1) / (num_stages + 1)) - 1) for i in range(num_stages)]
    stages: list[tuple[int, int]] = []
    for i, layer in enumerate(layers):
        if stages and layer <= stages[-1][0]:
            continue
        stages.append((layer, int(round(first_keep * ratio ** i))))
    return stages


def pdrop_plan(model, visual: torch.Tensor, keep: int, ratio: float = 0.5, num_stages: int = 3, **kw) -> Plan:
    """PyramidDrop: staged keep counts keep, keep*ratio, keep*ratio^2 after layers ~L/4, L/2, 3L/4."""
    adapter = ModelAdapter.from_model(model)
    return staged_plan(model, visual, pdrop_stages(adapter.num_layers, keep, ratio, num_stages), "attention", **kw)
