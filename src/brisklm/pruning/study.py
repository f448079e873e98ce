"""The pruning study on a zoo model: every method at equal target sparsity, measured on held-out text.

Shared by `brisk bench pruning`, the demo report and the quality tests, so the figures they show come
from one code path.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass
from typing import Any, Callable

import torch

from brisklm.core.adapter import ModelAdapter
from brisklm.core.text import as_text_layer
from brisklm.pruning.calibration import CalibData, hf_forward, load_calibration, target_difficulty, token_metrics
from brisklm.pruning.depth import layers_for_sparsity, prune_depth
from brisklm.pruning.routers import RouterSet
from brisklm.pruning.skipgpt import SkipGPTOptions, train_lora, train_routers
from brisklm.pruning.sparse import RoutingRecord, sparse_forward
from brisklm.pruning.width import activation_norms, prune_structured, prune_unstructured, zero_fraction


@dataclass
class StudyData:
    """Held-out evaluation text, calibration text and router/LoRA training sequences."""

    test: CalibData
    calib: CalibData
    train: CalibData


def study_data(tokenizer, n_test: int = 200, n_calib: int = 64, n_train: int = 2000, seed: int = 0,
               calib_source: str = "mixed_lm") -> StudyData:
    """Data for the study; calibration and recovery data come from `calib_source`."""
    return StudyData(
        test=load_calibration(tokenizer, "mixed_lm", n_test, split="test", seed=seed),
        calib=load_calibration(tokenizer, calib_source, n_calib, split="train", seed=seed),
        train=load_calibration(tokenizer, calib_source, n_train, split="train", seed=seed + 1),
    )


def routed_forward(model, routers: RouterSet, records: list[RoutingRecord] | None = None, policy: str = "full"):
    """A `Forward` through the sparse executor (argmax routing), collecting the routing records."""
    def forward(ids, mask):
        device = model.device  # calibration batches are made on the host
        logits, record, _ = sparse_forward(model, routers, ids.to(device), attention_mask=mask.to(device), policy=policy)
        if records is not None:
            records.append(record)
        return logits
    return forward


def skip_by_difficulty(records: list[RoutingRecord], data: CalibData, batch_size: int = 32) -> dict[str, dict]:
    """Mean skip rate (attention, MLP, both) of tokens grouped by the difficulty of the word they predict.

    `records` come from token_metrics over `data` with the same batch_size (one record per batch, in order).
    """
    sums: dict[str, list[float]] = {}
    for bi, rec in enumerate(records):
        length = rec.attn[0].shape[1]
        grid = target_difficulty(data, bi * batch_size, bi * batch_size + rec.attn[0].shape[0], length)
        att = torch.stack([~a for a in rec.attn]).float().mean(0)  # (B, T)
        mlp = torch.stack([~m for m in rec.mlp]).float().mean(0)
        for b, row in enumerate(grid):
            for t, kind in enumerate(row):
                if kind is not None:
                    s = sums.setdefault(kind, [0.0, 0.0, 0])
                    s[0] += float(att[b, t])
                    s[1] += float(mlp[b, t])
                    s[2] += 1
    return {k: {"attn": v[0] / v[2], "mlp": v[1] / v[2], "total": (v[0] + v[1]) / (2 * v[2]), "tokens": v[2]}
            for k, v in sorted(sums.items())}


def merged_rates(records: list[RoutingRecord]) -> dict[str, float]:
    """Skip rates over all records, weighted by valid tokens."""
    att = mlp = n = 0.0
    for rec in records:
        valid = rec.valid
        tokens = float(valid.sum()) * len(rec.attn)
        r = rec.skip_rates()
        att += r["attn"] * tokens
        mlp += r["mlp"] * tokens
        n += tokens
    return {"attn": att / n, "mlp": mlp / n, "total": (att + mlp) / (2 * n)}


def run_study(model, tokenizer, data: StudyData, sparsities=(0.25, 0.40), opts: dict[str, Any] | None = None,
              progress: Callable = lambda x, **k: x, methods: tuple[str, ...] | None = None) -> dict[str, Any]:
    """Quality of every method at every sparsity, realised sparsity, routing statistics; keeps the routers."""
    opts = dict(opts or {})
    pad = as_text_layer(tokenizer).roles.pad_id
    adapter = ModelAdapter.from_model(model)
    dense = token_metrics(hf_forward(model), data.test, pad)
    out: dict[str, Any] = {"dense": dense, "methods": {}, "routers": {}, "routing": {}}
    norms = activation_norms(model, data.calib, pad)
    wanted = methods or ("shortgpt", "sleb", "magnitude", "wanda", "structured", "skipgpt_rt", "skipgpt_lora")
    for s in progress(list(sparsities), desc="sparsity levels"):
        key = f"{s:.2f}"
        res: dict[str, Any] = {}
        n_remove = layers_for_sparsity(adapter.num_layers, s)
        for name, method in (("shortgpt", "bi"), ("sleb", "sleb")):
            if name in wanted:
                pruned, rep = prune_depth(model, data.calib, pad, n_remove, method)
                res[name] = {**token_metrics(hf_forward(pruned), data.test, pad), "removed": rep["removed"],
                             "realised_sparsity": n_remove / adapter.num_layers}
        for name in ("magnitude", "wanda"):
            if name in wanted:
                pruned = prune_unstructured(model, s, name, norms)
                res[name] = {**token_metrics(hf_forward(pruned), data.test, pad), "realised_sparsity": zero_fraction(pruned)}
        if "structured" in wanted:
            pruned, rep = prune_structured(model, s, norms, heads_per_group=opts.get("heads_per_group", 1))
            res["structured"] = {**token_metrics(hf_forward(pruned), data.test, pad), **rep}
        if "skipgpt_rt" in wanted or "skipgpt_lora" in wanted:
            sk = SkipGPTOptions(sparsity=s, **opts.get("skipgpt", {}))
            base = copy.deepcopy(model)
            routers, stats = train_routers(base, tokenizer, data.train.features, sk)
            records: list[RoutingRecord] = []
            res["skipgpt_rt"] = {**token_metrics(routed_forward(base, routers, records), data.test, pad),
                                 "train_seconds": stats["train_seconds"]}
            rates = merged_rates(records)
            res["skipgpt_rt"]["realised_sparsity"] = rates["total"]
            out["routing"][key] = {"skip_rates": rates, "skip_rate_by_token_difficulty": skip_by_difficulty(records, data.test)}
            out["routers"][key] = routers
            if "skipgpt_lora" in wanted:
                merged, lstats = train_lora(copy.deepcopy(model), tokenizer, data.train.features, routers, sk)
                records = []
                res["skipgpt_lora"] = {**token_metrics(routed_forward(merged, routers, records), data.test, pad),
                                       "realised_sparsity": merged_rates(records)["total"],
                                       "train_seconds": lstats["train_seconds"]}
                out.setdefault("lora_models", {})[key] = merged
        for r in res.values():
            if "accuracy" in r and "accuracy" in dense:
                r["accuracy_kept"] = r["accuracy"] / dense["accuracy"]
        out["methods"][key] = res
    return out
