"""Static depth pruning: Block Influence (ShortGPT) and SLEB-style greedy removal by calibration perplexity.

Both pick whole decoder layers to delete; `remove_layers` returns a real, shallower HF model (config and
per-layer indices updated) that saves with save_pretrained and reloads with from_pretrained.
"""

from __future__ import annotations

import copy
import math
from typing import Sequence

import torch
from torch import nn

from brisklm.core.adapter import ModelAdapter
from brisklm.core.device import model_device
from brisklm.core.executor import execute
from brisklm.core.plan import LayerStep, Plan
from brisklm.errors import BriskError
from brisklm.pruning.calibration import CalibData

DEPTH_METHODS = ("bi", "sleb")


def check_remove(num_layers: int, remove: int) -> int:
    """The number of layers to remove, or a user error if it is not in [1, num_layers - 1]."""
    if not isinstance(remove, int) or not 1 <= remove <= num_layers - 1:
        raise BriskError(f"cannot remove {remove} layers from a {num_layers}-layer model; "
                         f"choose between 1 and {num_layers - 1}")
    return remove


def layers_for_sparsity(num_layers: int, sparsity: float) -> int:
    """Layers to remove for a target module sparsity (rounded; at least 1)."""
    from brisklm.pruning.skipgpt import check_sparsity

    check_sparsity(sparsity)
    return check_remove(num_layers, max(1, round(sparsity * num_layers)))


@torch.no_grad()
def block_influence(model, data: CalibData, pad_id: int, batch_size: int = 16) -> list[float]:
    """BI_i = 1 - E[cos(x_i, x_{i+1})] over valid calibration tokens, per layer (ShortGPT)."""
    adapter = ModelAdapter.from_model(model)
    sums = torch.zeros(adapter.num_layers, dtype=torch.float64)
    count = 0
    for batch in data.batches(batch_size, pad_id, model_device(model)):
        out = execute(model, batch["input_ids"], attention_mask=batch["attention_mask"], record_hidden=True,
                      logits_rows="none")
        valid = batch["attention_mask"].bool()  # (B, T)
        hs = out.layer_hidden  # L + 1 tensors (B, T, D)
        for i in range(adapter.num_layers):
            cos = torch.nn.functional.cosine_similarity(hs[i], hs[i + 1], dim=-1)  # (B, T)
            sums[i] += float((1 - cos)[valid].double().sum())
        count += int(valid.sum())
    return (sums / max(count, 1)).tolist()


def skip_layers_plan(num_layers: int, removed: Sequence[int], batch: int, length: int,
                     device: torch.device | str = "cpu") -> Plan:
    """A plan that skips whole layers (no attention, MLP or keys) == the model with those layers deleted."""
    off = torch.zeros(batch, length, dtype=torch.bool, device=device)
    steps = [LayerStep(off, off, off) if i in set(removed) else None for i in range(num_layers)]
    return Plan(steps=steps)


@torch.no_grad()
def calibration_perplexity(model, data: CalibData, pad_id: int, removed: Sequence[int] = (),
                           batch_size: int = 16) -> float:
    """Perplexity on the calibration data with `removed` layers skipped (no copy of the model)."""
    adapter = ModelAdapter.from_model(model)
    total, count = 0.0, 0
    for batch in data.batches(batch_size, pad_id, model_device(model)):
        ids = batch["input_ids"]
        plan = skip_layers_plan(adapter.num_layers, removed, *ids.shape, device=ids.device)
        logits = execute(model, ids, plan=plan, attention_mask=batch["attention_mask"]).logits
        labels = batch["labels"][:, 1:]
        loss = torch.nn.functional.cross_entropy(logits[:, :-1].transpose(1, 2), labels, ignore_index=-100,
                                                 reduction="sum")
        total += float(loss)
        count += int((labels != -100).sum())
    return math.exp(total / max(count, 1))


def select_layers(model, data: CalibData, pad_id: int, remove: int, method: str = "bi",
                  progress=None) -> dict:
    """Which layers to delete (sorted) and the scores behind the choice, by Block Influence or SLEB."""
    adapter = ModelAdapter.from_model(model)
    check_remove(adapter.num_layers, remove)
    if method == "bi":
        scores = block_influence(model, data, pad_id)
        removed = sorted(sorted(range(adapter.num_layers), key=lambda i: scores[i])[:remove])
        return {"method": "bi", "removed": removed, "block_influence": scores}
    if method == "sleb":
        removed: list[int] = []
        history = []
        rounds = range(remove) if progress is None else progress(range(remove), desc="SLEB rounds")
        for _ in rounds:
            candidates = [i for i in range(adapter.num_layers) if i not in removed]
            ppl = {i: calibration_perplexity(model, data, pad_id, removed + [i]) for i in candidates}
            best = min(ppl, key=ppl.get)
            removed.append(best)
            history.append({"removed": best, "calibration_perplexity": ppl[best]})
        return {"method": "sleb", "removed": sorted(removed), "history": history}
    raise BriskError(f"unknown depth method {method!r}; choose one of {', '.join(DEPTH_METHODS)}")


def remove_layers(model, removed: Sequence[int]):
    """A deep copy of `model` without the given decoder layers, with a consistent config."""
    adapter = ModelAdapter.from_model(model)
    check_remove(adapter.num_layers, len(set(removed)))
    bad = [i for i in removed if not 0 <= i < adapter.num_layers]
    if bad:
        raise BriskError(f"layer indices {bad} do not exist in a {adapter.num_layers}-layer model")
    pruned = copy.deepcopy(model)
    base = ModelAdapter.from_model(pruned)
    kept = [i for i in range(adapter.num_layers) if i not in set(removed)]
    new_layers = nn.ModuleList(base.layers[i] for i in kept)
    for new_idx, layer in enumerate(new_layers):
        layer.self_attn.layer_idx = new_idx
    pruned.model.layers = new_layers
    config = pruned.config
    config.num_hidden_layers = len(kept)
    if getattr(config, "layer_types", None) is not None:
        config.layer_types = [config.layer_types[i] for i in kept]
    return pruned.eval()


def prune_depth(model, data: CalibData, pad_id: int, remove: int, method: str = "bi", progress=None):
    """Select and delete `remove` layers; returns (shallower model, selection report)."""
    report = select_layers(model, data, pad_id, remove, method, progress)
    return remove_layers(model, report["removed"]), report
