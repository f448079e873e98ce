"""`brisk bench pruning`: quality kept per method and sparsity, routing statistics, real CPU speed of the
sparse executor (vs dense and vs masked execution), KV bytes and quality per policy, SkipOPU cost model, and
speed at the real Qwen2.5-0.5B shape against HF's own forward (`real_shape`, see realshape.py)."""

from __future__ import annotations

from typing import Any, Callable

import torch
from transformers import LlamaConfig, LlamaForCausalLM

from brisklm.core.cache import KVCache
from brisklm.core.executor import execute
from brisklm.core.flops import FlopsCounter
from brisklm.core.plan import LayerStep, Plan
from brisklm.eval.bench import BenchContext
from brisklm.eval.report import new_figure
from brisklm.pruning.calibration import CalibData, token_metrics
from brisklm.pruning.gating import GatedRouting
from brisklm.pruning.hardware import decode_cost
from brisklm.pruning.kv import KV_POLICIES, ReuseKVCache, kv_bytes
from brisklm.pruning.realshape import interleaved as interleaved_medians
from brisklm.pruning.realshape import ratios, real_shape_figures
from brisklm.pruning.routers import RouterSet
from brisklm.pruning.sparse import sparse_forward
from brisklm.pruning.study import run_study, study_data
from brisklm.zoo.store import load

BASE_MODEL = "mixed-lm"


@torch.no_grad()
def speed_routed(model, routers: RouterSet, ids: torch.Tensor, repeats: int) -> dict[str, float]:
    """Sparse executor vs dense executor vs masked (gate-multiplied HF forward) on one batch, + ideal ratio."""
    dense_f, sparse_f = FlopsCounter(), FlopsCounter()
    execute(model, ids, flops=dense_f, logits_rows="last")
    _, record, _ = sparse_forward(model, routers, ids, flops=sparse_f, logits_rows="last")

    def masked():
        with GatedRouting(model, routers, mode="argmax"):
            model(input_ids=ids, logits_to_keep=1)

    t = interleaved_medians({
        "dense": lambda: execute(model, ids, logits_rows="last"),
        "sparse": lambda: sparse_forward(model, routers, ids, logits_rows="last"),
        "masked": masked,
        "hf_dense": lambda: model(input_ids=ids, logits_to_keep=1),
    }, repeats, warmup=2)
    ideal = dense_f.total() / sparse_f.total()
    speedup = t["dense"] / t["sparse"]
    return {"batch": ids.shape[0], "tokens": ids.shape[1], "skip_rate": record.skip_rates()["total"],
            "dense_s": t["dense"], "sparse_s": t["sparse"], "masked_s": t["masked"], "hf_dense_s": t["hf_dense"],
            "speedup_vs_dense": speedup, "speedup_vs_masked": t["masked"] / t["sparse"],
            "ideal_flops_ratio": ideal, "fraction_of_ideal": (speedup - 1) / (ideal - 1) if ideal > 1 else None,
            "speedup_over_ideal": speedup / ideal, "vs_hf_dense": ratios(t["hf_dense"], t["sparse"], ideal)}


@torch.no_grad()
def speed_large(attn_skip: float, mlp_skip: float, batch: int, tokens: int, repeats: int, seed: int = 0,
                hidden: int = 1024, layers: int = 4) -> dict[str, float]:
    """Real skipping on a wider random-weight Llama (speed does not depend on weights) at given skip rates."""
    torch.manual_seed(seed)
    cfg = LlamaConfig(vocab_size=256, hidden_size=hidden, intermediate_size=int(hidden * 2.75), num_hidden_layers=layers,
                      num_attention_heads=hidden // 64, num_key_value_heads=hidden // 128)
    model = LlamaForCausalLM(cfg).eval()
    ids = torch.randint(0, 256, (batch, tokens))
    g = torch.Generator().manual_seed(seed)
    steps = [LayerStep(attn_rows=torch.rand(batch, tokens, generator=g) >= attn_skip,
                       mlp_rows=torch.rand(batch, tokens, generator=g) >= mlp_skip) for _ in range(layers)]
    plan = Plan(steps=steps)
    dense_f, sparse_f = FlopsCounter(), FlopsCounter()
    execute(model, ids, flops=dense_f, logits_rows="last")
    execute(model, ids, plan=plan, flops=sparse_f, logits_rows="last")
    t = interleaved_medians({"dense": lambda: execute(model, ids, logits_rows="last"),
                             "sparse": lambda: execute(model, ids, plan=plan, logits_rows="last")}, repeats, warmup=2)
    ideal = dense_f.total() / sparse_f.total()
    speedup = t["dense"] / t["sparse"]
    return {"hidden": hidden, "layers": layers, "batch": batch, "tokens": tokens, "dense_s": t["dense"],
            "sparse_s": t["sparse"], "speedup_vs_dense": speedup, "ideal_flops_ratio": ideal,
            "fraction_of_ideal": (speedup - 1) / (ideal - 1) if ideal > 1 else None,
            "speedup_over_ideal": speedup / ideal}


@torch.no_grad()
def kv_policy_figures(model, routers: RouterSet, test: CalibData, pad_id: int) -> dict[str, dict]:
    """Perplexity / accuracy and KV bytes of each policy (one cache per batch, summed)."""
    out = {}
    for policy in KV_POLICIES:
        totals = {"kv_bytes": 0, "pointer_bytes": 0, "stored_entries": 0, "carried_entries": 0}

        def forward(ids, mask, policy=policy, totals=totals):
            cache = ReuseKVCache(routers.num_layers) if policy == "reuse" else KVCache(routers.num_layers)
            logits, _, cache = sparse_forward(model, routers, ids, attention_mask=mask, policy=policy, cache=cache)
            for k, v in kv_bytes(cache).items():
                totals[k] += v
            return logits

        metrics = token_metrics(forward, test, pad_id)
        out[policy] = {**metrics, **totals}
    full = out["full"]["kv_bytes"]
    for policy, r in out.items():
        r["kv_bytes_saved"] = 1 - r["kv_bytes"] / full
        r["perplexity_change"] = r["perplexity"] - out["full"]["perplexity"]
        if "accuracy" in r:
            r["accuracy_change"] = r["accuracy"] - out["full"]["accuracy"]
    return out


@torch.no_grad()
def cost_model_figures(model, routers: RouterSet, test: CalibData, pad_id: int, length: int = 40) -> dict[str, Any]:
    """SkipOPU-style decode cost at batch 1 and 8 from real routing decisions on held-out text."""
    feats = [f for f in test.features if len(f["input_ids"]) >= length][:8]
    ids = torch.tensor([f["input_ids"][:length] for f in feats])
    _, record, _ = sparse_forward(model, routers, ids)
    attn, mlp = torch.stack(record.attn), torch.stack(record.mlp)  # (L, B, T)
    cfg = model.config
    dims = {"hidden_size": cfg.hidden_size, "num_heads": cfg.num_attention_heads, "num_kv_heads": cfg.num_key_value_heads,
            "head_dim": getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads,
            "intermediate_size": cfg.intermediate_size}
    out = {}
    for b in (1, len(feats)):
        for policy in KV_POLICIES:
            out[f"batch{b}_{policy}"] = decode_cost(attn[:, :b], mlp[:, :b], dims, policy, prompt_len=length // 2,
                                                    buffer_entries=16)
    return out


@torch.no_grad()
def calibration_source_figures(model, tok, data, sparsity: float, seed: int) -> dict[str, dict]:
    """Static methods calibrated on the model's own distribution vs a shifted one (noise + copy only)."""
    from brisklm.pruning.calibration import hf_forward, load_calibration
    from brisklm.pruning.depth import layers_for_sparsity, prune_depth
    from brisklm.pruning.width import activation_norms, prune_unstructured

    pad = tok.pad_token_id
    dense = token_metrics(hf_forward(model), data.test, pad)["accuracy"]
    out: dict[str, dict] = {}
    sources = {"mixed_lm": data.calib,
               "shifted": load_calibration(tok, "shifted", len(data.calib.features), seed=seed)}
    remove = layers_for_sparsity(model.config.num_hidden_layers, sparsity)
    for name, calib in sources.items():
        row = {}
        for method in ("bi", "sleb"):
            pruned, rep = prune_depth(model, calib, pad, remove, method)
            row[method] = {"removed": rep["removed"],
                           "accuracy_kept": token_metrics(hf_forward(pruned), data.test, pad)["accuracy"] / dense}
        pruned = prune_unstructured(model, sparsity, "wanda", activation_norms(model, calib, pad))
        row["wanda"] = {"accuracy_kept": token_metrics(hf_forward(pruned), data.test, pad)["accuracy"] / dense}
        out[name] = row
    return out


def _plot_quality(study: dict, out_dir) -> None:
    fig = new_figure(7, 3.5)
    ax = fig.add_subplot(1, 1, 1)
    levels = list(study["methods"])
    methods = list(study["methods"][levels[0]])
    width = 0.8 / len(methods)
    for i, m in enumerate(methods):
        ax.bar([j + i * width for j in range(len(levels))],
               [study["methods"][lv][m].get("accuracy_kept", 0) for lv in levels], width, label=m)
    ax.set_xticks([j + 0.4 - width / 2 for j in range(len(levels))], [f"sparsity {lv}" for lv in levels])
    ax.set_ylabel("accuracy kept (vs dense)")
    ax.legend(fontsize=7, ncol=2)
    out_dir.mkdir(parents=True, exist_ok=True)
    fig.savefig(out_dir / "pruning_quality.png", bbox_inches="tight")


def bench_pruning(ctx: BenchContext) -> dict:
    """All pruning figures on the mixed-difficulty zoo model."""
    torch.manual_seed(ctx.seed)
    loaded = load(BASE_MODEL, seed=0)
    model, tok = loaded.model, loaded.tokenizer
    q = ctx.quick
    data = study_data(tok, n_test=96 if q else 256, n_calib=32 if q else 64, n_train=1000 if q else 3000, seed=ctx.seed)
    sk = {"router_steps": 120 if q else 300, "lora_steps": 60 if q else 200, "seed": ctx.seed}
    study = run_study(model, tok, data, (0.25, 0.40), {"skipgpt": sk}, progress=ctx.progress)
    routers = study.pop("routers")
    study.pop("lora_models", None)
    r40 = routers["0.40"]
    repeats = 5 if q else 15
    speed = {}
    for batch in ctx.progress([1, 8], desc="speed"):
        ids = torch.tensor([f["input_ids"][:64] for f in data.test.features if len(f["input_ids"]) >= 64][:batch])
        speed[f"mixed_lm_batch{batch}"] = speed_routed(model, r40, ids, repeats)
    rates = study["routing"]["0.40"]["skip_rates"]
    for batch in ctx.progress([1, 8], desc="speed (d=1024)"):
        speed[f"d1024_batch{batch}"] = speed_large(rates["attn"], rates["mlp"], batch, 128, repeats, ctx.seed)
    calib_source = calibration_source_figures(model, tok, data, 0.40, ctx.seed)
    kv = kv_policy_figures(model, r40, data.test, tok.pad_token_id)
    cost = cost_model_figures(model, r40, data.test, tok.pad_token_id)
    real_shape = real_shape_figures(q, ctx.seed, ctx.progress)
    _plot_quality(study, ctx.out_dir)
    realised = {lv: {"target": float(lv), **{m: r["realised_sparsity"] for m, r in res.items()}}
                for lv, res in study["methods"].items()}
    return {
        "model": BASE_MODEL,
        "dense": study["dense"],
        "methods": study["methods"],
        "realised_vs_target_sparsity": realised,
        "skip_rate_by_token_difficulty": {lv: r["skip_rate_by_token_difficulty"] for lv, r in study["routing"].items()},
        "attention_vs_mlp_skip_rates": {lv: r["skip_rates"] for lv, r in study["routing"].items()},
        "speed": speed,
        "kv_policies": kv,
        "calibration_source": calib_source,
        "cost_model": cost,
        "real_shape": real_shape,
        "settings": {"n_test": len(data.test.features), "n_calib": len(data.calib.features),
                     "n_train": len(data.train.features), **sk, "timing_repeats": repeats,
                     "torch_threads": torch.get_num_threads()},
    }
