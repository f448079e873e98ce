"""`brisk bench vision`: accuracy kept vs visual tokens kept (VisiPruner, FastV, PyramidDrop, random), analytic
FLOPs ratios, CPU prefill/decode speed-ups vs dense at batch 1 and 16, the three-stage profile, and ViCA; and
the `real_shape` section (LLaVA-1.5 layout on a Qwen2.5-0.5B-shaped LM, `brisklm.vision.realshape`).

All ratios are against the dense model measured in the same run; timings are medians of repeats, LM only
(from the merged embeddings; the shared vision tower is excluded and reported separately).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import torch

from brisklm.core.adapter import ModelAdapter
from brisklm.core.cache import KVCache
from brisklm.core.generate import generate
from brisklm.core.timing import median_seconds
from brisklm.eval.bench import BenchContext
from brisklm.tasks import get_task
from brisklm.tasks.base import Example
from brisklm.vision.prune import PruneSpec, decode_plan_fn, prune_prefill
from brisklm.vision.study import evaluate_method, layer_profile
from brisklm.vision.vica import vica_forward, vica_layers_of, visual_compute_fraction
from brisklm.vision.visipruner import VisiPrunerConfig
from brisklm.vision.vlm import LoadedVLM, embed_multimodal, load_vlm, visual_mask
from brisklm.vision.zoo import TASK_OPTIONS, chance_accuracy, vica_accuracy

FLOPS_CONVENTION = ("LM prefill MACs, SparseVLM per-layer count 4nd^2 + 2n^2d + 3ndm with each sample's real "
                    "token count n_l per layer (vision tower and LM head excluded), pruned sum / dense sum")


def _sweep(n_visual: int, quick: bool) -> list[PruneSpec]:
    """Budgets per method: fixed keeps for the baselines, relative token thresholds for VisiPruner."""
    keeps = sorted({k for k in (1, 2, 4, 8, n_visual // 2) if 0 < k < n_visual})
    if quick:
        keeps = [k for k in keeps if k in (1, 4, 8)] or keeps[:2]
    specs = [PruneSpec("fastv", keep=k) for k in keeps]
    specs += [PruneSpec("random", keep=k) for k in keeps]
    specs += [PruneSpec("pdrop", keep=k) for k in sorted({2 * k for k in keeps if 2 * k <= n_visual})]
    thresholds = (0.02, 0.05, 0.1, 0.2) if quick else (0.01, 0.02, 0.05, 0.1, 0.15, 0.2, 0.3)
    specs += [PruneSpec("visipruner", visipruner=VisiPrunerConfig(token_threshold=t)) for t in thresholds]
    # calibrated to the tiny model's profile (fusion cosine drop ~0.14 at one layer, <0.02 elsewhere; layer 0
    # matters by leave-one-layer-out): no shallow masking, fusion when some token moves o by > 5% cosine
    specs += [PruneSpec("visipruner", visipruner=VisiPrunerConfig(shallow_layers=0, layer_threshold=0.95,
                                                                  token_threshold=t)) for t in thresholds]
    specs.append(PruneSpec("fastv", keep=0, layer=1))  # every visual token gone after layer 0 (text read them once)
    return specs


def _label(spec: PruneSpec) -> str:
    if spec.method == "visipruner":
        c = spec.visipruner
        return f"visipruner(shallow={c.shallow_layers},tau_layer={c.layer_threshold},tau_tok={c.token_threshold})"
    return f"{spec.method}(keep={spec.keep})"


@torch.no_grad()
def _timings(loaded: LoadedVLM, examples, specs: dict[str, PruneSpec], vica: LoadedVLM | None, repeats: int,
             decode_tokens: int) -> dict[str, Any]:
    """Median prefill seconds and decode seconds/token at batch 1 and 16, each method vs dense (same run)."""
    out: dict[str, Any] = {}
    model, processor = loaded.model, loaded.processor
    layers = ModelAdapter.from_model(model).num_layers
    for bs in (1, 16):
        chunk = examples[:bs]
        batch = processor([e.meta["image"] for e in chunk], [e.prompt for e in chunk])
        embeds = embed_multimodal(model, batch.input_ids, batch.pixel_values)
        vision_s = median_seconds(lambda: embed_multimodal(model, batch.input_ids, batch.pixel_values), repeats)
        row: dict[str, Any] = {"vision_tower_s": vision_s}

        def run(spec: PruneSpec, m=model):
            cache = KVCache(layers)
            logits, record = prune_prefill(m, batch, spec, cache=cache, embeds=embeds)
            return cache, logits, record

        for name, spec in {"dense": PruneSpec("dense"), **specs}.items():
            prefill = median_seconds(lambda: run(spec), repeats)
            cache, logits, record = run(spec)
            snapshot = [(lk.keys, lk.values, lk.meta) for lk in cache.layers]

            def decode():
                for lk, (k, v, meta) in zip(cache.layers, snapshot):
                    lk.keys, lk.values, lk.meta = k, v, meta
                generate(model, logits.argmax(-1)[:, None], cache=cache, plan_fn=decode_plan_fn(record.plan.visibility),
                         max_new_tokens=decode_tokens, do_sample=False, eos_token_id=None)

            per_token = median_seconds(decode, repeats) / decode_tokens
            row[name] = {"prefill_s": prefill, "decode_s_per_token": per_token, "kv_bytes": cache.nbytes()}
        if vica is not None:
            vlayers = vica_layers_of(vica.model)
            vembeds = embed_multimodal(vica.model, batch.input_ids, batch.pixel_values)
            visual = visual_mask(batch.input_ids, vica.model.config.image_token_id)

            def vrun():
                cache = KVCache(layers)
                out, _, context = vica_forward(vica.model, vembeds, visual, batch.position_ids, batch.attention_mask,
                                               vlayers, cache=cache, logits_rows="last")
                return cache, context, out.logits[:, -1]

            prefill = median_seconds(vrun, repeats)
            cache, context, logits = vrun()
            snapshot = [(lk.keys, lk.values, lk.meta) for lk in cache.layers]

            def vdecode():
                for lk, (k, v, meta) in zip(cache.layers, snapshot):
                    lk.keys, lk.values, lk.meta = k, v, meta
                generate(vica.model, logits.argmax(-1)[:, None], cache=cache, context=[context],
                         max_new_tokens=decode_tokens, do_sample=False, eos_token_id=None)

            per_token = median_seconds(vdecode, repeats) / decode_tokens
            row["vica"] = {"prefill_s": prefill, "decode_s_per_token": per_token,
                           "kv_bytes": cache.nbytes() + context.nbytes()}
        dense = row["dense"]
        for name, value in row.items():
            if isinstance(value, dict) and name != "dense":
                value["prefill_speedup"] = dense["prefill_s"] / value["prefill_s"]
                value["decode_speedup"] = dense["decode_s_per_token"] / value["decode_s_per_token"]
        out[f"batch_{bs}"] = row
    return out


def _plots(ctx: BenchContext, rows: list[dict], profile: dict, dense_acc: float, vica_point: dict | None) -> list[str]:
    """Accuracy-kept vs FLOPs ratio per method, and the per-layer cosine / attention-mass profile."""
    from brisklm.eval.report import new_figure

    ctx.out_dir.mkdir(parents=True, exist_ok=True)
    fig = new_figure(6.0, 4.0)
    ax = fig.add_subplot(1, 1, 1)
    groups = (("visipruner", "o", lambda r: r["method"] == "visipruner" and "shallow=0" not in r["label"]),
              ("visipruner calibrated", "D", lambda r: r["method"] == "visipruner" and "shallow=0" in r["label"]),
              ("fastv", "s", lambda r: r["method"] == "fastv" and r["keep"]), ("pdrop", "^", lambda r: r["method"] == "pdrop"),
              ("random", "x", lambda r: r["method"] == "random"))
    for method, marker, pick in groups:
        pts = sorted((r["flops_ratio"], r["accuracy_kept"]) for r in rows if pick(r))
        if pts:
            ax.plot([p[0] for p in pts], [p[1] for p in pts], marker=marker, label=method)
    if vica_point:
        ax.scatter([vica_point["flops_ratio"]], [vica_point["accuracy_kept"]], marker="*", s=120, color="k", label="ViCA")
    ax.axhline(1.0, color="grey", lw=0.5)
    ax.set_xlabel("analytic LM prefill FLOPs ratio (vs dense)")
    ax.set_ylabel("accuracy kept (vs dense)")
    ax.set_title(f"ShapesVQA, dense accuracy {dense_acc:.3f}")
    ax.legend()
    paths = [str(ctx.out_dir / "vision-accuracy-vs-flops.png")]
    fig.savefig(paths[0], bbox_inches="tight")
    fig = new_figure(6.0, 4.0)
    ax = fig.add_subplot(1, 1, 1)
    layers = list(range(len(profile["cos_drop"])))
    ax.plot(layers, profile["cos_drop"], marker="o", label="max_j 1-cos(o-c_j, o)")
    ax.set_ylabel("removal cosine drop")
    ax.set_xlabel("layer")
    ax2 = ax.twinx()
    ax2.plot(layers, profile["visual_mass"], marker="s", color="tab:orange", label="attention mass on visual")
    ax2.plot(layers, profile["sink_mass"], marker="^", color="tab:green", label="mass on first visual token")
    ax2.set_ylabel("last-token attention mass")
    fig.legend(loc="upper right")
    paths.append(str(ctx.out_dir / "vision-layer-profile.png"))
    fig.savefig(paths[1], bbox_inches="tight")
    return [Path(path).name for path in paths]  # file names: the plots sit beside the results


def blank_image(example: Example) -> Example:
    """The same question on an all-black image: what the model answers without seeing the scene."""
    return Example(example.prompt, example.completion, example.answer,
                   {**example.meta, "image": np.zeros_like(example.meta["image"])})


SECTIONS = ("zoo", "real_shape")  # `brisk bench vision --section NAME` runs one and merges it into vision.json


def bench(ctx: BenchContext) -> dict:
    """The zoo section (pruning sweep, FLOPs, CPU timings, layer profile and ViCA on the ShapesVQA LLaVA models)
    and the real-shape section (LLaVA-1.5 layout on a Qwen2.5-0.5B-shaped LM, `brisklm.vision.realshape`)."""
    torch.set_grad_enabled(False)
    figures: dict = {}
    if ctx.wants("real_shape"):  # first: needs no zoo model
        from brisklm.vision.realshape import real_shape_figures, real_shape_key

        real = real_shape_figures(ctx.quick, ctx.seed, ctx.progress)
        figures[real_shape_key(real["device"])] = real
    if ctx.wants("zoo"):
        figures.update(zoo_figures(ctx))
    return figures


def zoo_figures(ctx: BenchContext) -> dict:
    """Pruning sweep, FLOPs, CPU timings, layer profile and ViCA on the zoo's ShapesVQA LLaVA models."""
    loaded = load_vlm("shapes-llava")
    vica = load_vlm("shapes-vica")
    task = get_task("shapes_vqa", **TASK_OPTIONS)
    n_test = 256 if ctx.quick else 800
    examples = task.examples("test", n_test, seed=ctx.seed)
    train = task.examples("train", 2000, seed=ctx.seed)
    dense = evaluate_method(loaded, examples, PruneSpec("dense"))
    blank = evaluate_method(loaded, [blank_image(e) for e in examples], PruneSpec("dense"))  # image-blind reference
    n_visual = loaded.processor.tokens_per_image
    rows = []
    for spec in ctx.progress(_sweep(n_visual, ctx.quick), desc="pruning sweep"):
        result = evaluate_method(loaded, examples, spec)
        rows.append({"label": _label(spec), "method": spec.method, "keep": spec.keep,
                     "token_threshold": spec.visipruner.token_threshold if spec.method == "visipruner" else None,
                     "accuracy_kept": result["accuracy"] / dense["accuracy"], **result})
    profile = layer_profile(loaded, examples[:128])
    vica_acc = vica_accuracy(vica.model, vica.processor, examples, vica_layers_of(vica.model))
    vlayers = vica_layers_of(vica.model)
    adapter = ModelAdapter.from_model(vica.model)
    n_tokens = dense_tokens = None
    from brisklm.vision.common import layer_macs

    # ViCA analytic FLOPs: text rows through every layer + visual K/V projections at |S| layers
    batch = loaded.processor([examples[0].meta["image"]], [examples[0].prompt])
    n_tokens = int(batch.attention_mask.sum())
    d, m, L = adapter.hidden_size, adapter.intermediate_size, adapter.num_layers
    text_rows = n_tokens - n_visual
    vica_macs = L * layer_macs(text_rows, d, m) + len(vlayers) * 2 * n_visual * d * adapter.num_kv_heads * adapter.head_dim
    dense_tokens = layer_macs(n_tokens, d, m) * L
    vica_point = {"accuracy": vica_acc["accuracy"], "accuracy_kept": vica_acc["accuracy"] / dense["accuracy"],
                  "flops_ratio": vica_macs / dense_tokens}
    timing_specs = {"visipruner": PruneSpec("visipruner"), "fastv(keep=4)": PruneSpec("fastv", keep=4),
                    "pdrop(keep=8)": PruneSpec("pdrop", keep=8)}
    timings = _timings(loaded, examples, timing_specs, vica, repeats=5 if ctx.quick else 15,
                       decode_tokens=4 if ctx.quick else 8)
    plots = _plots(ctx, rows, profile, dense["accuracy"], vica_point)
    vq = vica.quality or {}
    return {
        "model": {"name": "shapes-llava", "visual_tokens_per_image": n_visual, "test_examples": len(examples),
                  "layers": L, "hidden": d},
        "dense_accuracy": dense["accuracy"],
        "dense_accuracy_by_family": {k[9:]: v for k, v in dense.items() if k.startswith("accuracy_")},
        "chance_accuracy": chance_accuracy(train, examples),
        "blank_image_accuracy": blank["accuracy"],
        "blank_image_accuracy_by_family": {k[9:]: v for k, v in blank.items() if k.startswith("accuracy_")},
        "flops_convention": FLOPS_CONVENTION,
        "sweep": rows,
        "layer_profile": profile,
        "vica": {"layers": list(vlayers), "accuracy": vica_acc["accuracy"],
                 "accuracy_kept": vica_point["accuracy_kept"],
                 "accuracy_by_family": {k[9:]: v for k, v in vica_acc.items() if k.startswith("accuracy_")},
                 "visual_compute_fraction": visual_compute_fraction(vica.model, vlayers),
                 "flops_ratio": vica_point["flops_ratio"],
                 "training_free_accuracy": vq.get("training_free_accuracy"),
                 "layer_importance": vq.get("layer_importance"),
                 "prefill_speedup_b1": timings["batch_1"]["vica"]["prefill_speedup"],
                 "prefill_speedup_b16": timings["batch_16"]["vica"]["prefill_speedup"]},
        "timings": timings,
        "plots": plots,
    }
