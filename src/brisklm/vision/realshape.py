"""Real-shape speed of the visual-token methods: the `real_shape` section of `brisk bench vision`.

LLaVA-1.5's layout (576 image tokens among ~40 text tokens) on a random-weight LM of Qwen2.5-0.5B shape (d=896,
14/2 heads, MLP 4864, 8 layers), batch 1 and 8, from the merged embeddings (the vision tower is the same for
every method and is left out). Prefill and per-token decode against HF's own forward (and our executor's dense
run; the faster of the two is the baseline), in one run, interleaved medians; FastV, PyramidDrop and VisiPruner
at 75% and 90% of the visual tokens removed, and ViCA; the analytic FLOPs ratio (scoring included) and the
KV-cache bytes. Speed does not depend on the weights, so random ones measure the real cost.
`brisk bench vision --section real_shape [--device D] [--dtype T]` runs only this section and merges it into
benchmarks/results/vision.json (key real_shape, or real_shape_cuda off the cpu; for `make gpu-check`).
"""

from __future__ import annotations

import copy
from typing import Any, Callable

import torch

from brisklm.core.adapter import ModelAdapter
from brisklm.core.cache import KVCache
from brisklm.core.device import resolve_device, resolve_dtype
from brisklm.core.executor import execute
from brisklm.core.realshape_bench import QWEN25_05B, SMALL_SHAPE, random_model
from brisklm.pruning.realshape import interleaved, ratios
from brisklm.vision.common import flops_ratio, layer_macs
from brisklm.vision.prune import PruneSpec, decode_plan_fn, prune_prefill
from brisklm.vision.vica import vica_forward
from brisklm.vision.visipruner import VisiPrunerConfig
from brisklm.vision.vlm import VLMBatch

FULL = dict(shape={**QWEN25_05B, "num_hidden_layers": 8}, image_tokens=576, text_before=5, text_after=35,
            batches=(1, 8), repeats=3, decode_tokens=8)
QUICK = dict(shape={**SMALL_SHAPE, "num_hidden_layers": 4}, image_tokens=48, text_before=3, text_after=9,
             batches=(1, 2), repeats=1, decode_tokens=2)
REMOVED = (0.75, 0.90)
IMAGE_TOKEN_ID = 7  # any id: the methods read the layout from input_ids
VICA_LAYERS = (1, 4)  # |S| = 2 of 8 (scaled to the layer count)


def method_specs(image_tokens: int, num_layers: int) -> dict[str, PruneSpec]:
    """FastV (after layer 1), PyramidDrop (first stage keeps twice the budget, halving) and VisiPruner (fusion
    forced at layer 1 so that the budget, not the model's random statistics, decides what is kept) per budget."""
    specs: dict[str, PruneSpec] = {}
    for removed in REMOVED:
        keep = max(1, round(image_tokens * (1 - removed)))
        tag = f"{int(removed * 100)}%"
        specs[f"fastv_{tag}"] = PruneSpec("fastv", keep=keep, layer=2)
        specs[f"pdrop_{tag}"] = PruneSpec("pdrop", keep=min(image_tokens, 2 * keep))
        forced = VisiPrunerConfig(shallow_layers=0, detect_from=1, layer_threshold=1.01, token_threshold=0.0,
                                  deep_exit=False)
        specs[f"visipruner_{tag}"] = PruneSpec("visipruner", keep=keep, visipruner=forced)
    return specs


def _used_kv_bytes(caches: list[KVCache], batch: int) -> int:
    """Bytes of the keys/values rows actually held (capacity beyond the rows not counted)."""
    total = 0
    for cache in caches:
        for layer in cache.layers:
            if layer.keys is not None:
                per_row = layer.keys.shape[1] * layer.keys.shape[3] * layer.keys.element_size()
                total += 2 * batch * layer.length * per_row
    return total


def _vica_ratio(adapter: ModelAdapter, n_text: int, n_visual: int, layers: tuple[int, ...]) -> float:
    """ViCA's analytic prefill MACs over dense: text rows through every layer, visual K/V at |S| layers."""
    d, m, n = adapter.hidden_size, adapter.intermediate_size, adapter.num_layers
    kv = 2 * n_visual * d * adapter.num_kv_heads * adapter.head_dim * len(layers)
    return float((n * layer_macs(n_text, d, m) + kv) / (n * layer_macs(n_text + n_visual, d, m)))


@torch.no_grad()
def _one_batch(model, size: dict, batch: int, device: torch.device, g: torch.Generator) -> dict[str, Any]:
    adapter = ModelAdapter.from_model(model)
    vocab, n_vis = model.config.vocab_size, size["image_tokens"]
    text = torch.randint(IMAGE_TOKEN_ID + 1, vocab, (batch, size["text_before"] + size["text_after"]), generator=g)
    ids = torch.cat([text[:, :size["text_before"]], torch.full((batch, n_vis), IMAGE_TOKEN_ID),
                     text[:, size["text_before"]:]], dim=1).to(device)
    mask = torch.ones_like(ids)
    positions = torch.arange(ids.shape[1], device=device)[None].expand(batch, -1)
    embeds = model.get_input_embeddings()(ids)
    embeds[ids == IMAGE_TOKEN_ID] = torch.randn(batch * n_vis, embeds.shape[-1], generator=g).to(embeds)
    vlm = VLMBatch(ids, mask, positions, torch.zeros(1, device=device))
    visual = ids == IMAGE_TOKEN_ID
    layers = tuple(min(x, adapter.num_layers - 1) for x in VICA_LAYERS)
    specs = method_specs(n_vis, adapter.num_layers)
    sync = (lambda: torch.cuda.synchronize(device)) if device.type == "cuda" else (lambda: None)

    def timed(fn: Callable[[], Any]) -> Callable[[], Any]:
        def run():
            out = fn()
            sync()
            return out
        return run

    def pruned(spec: PruneSpec):
        cache = KVCache(adapter.num_layers)
        logits, record = prune_prefill(model, vlm, spec, cache=cache, embeds=embeds)
        return cache, logits, record

    def vica():
        cache = KVCache(adapter.num_layers)
        out, _, context = vica_forward(model, embeds, visual, positions, mask, layers, cache=cache, logits_rows="last")
        return cache, out.logits[:, -1], context

    prefill = {"hf_dense": timed(lambda: model(inputs_embeds=embeds, attention_mask=mask, position_ids=positions,
                                               logits_to_keep=1)),
               "executor_dense": timed(lambda: execute(model, inputs_embeds=embeds, attention_mask=mask,
                                                       logits_rows="last")),
               **{name: timed(lambda s=spec: pruned(s)) for name, spec in specs.items()},
               "vica": timed(vica)}
    t = interleaved(prefill, size["repeats"])
    dense_s = min(t["hf_dense"], t["executor_dense"])
    out: dict[str, Any] = {
        "batch": batch, "tokens": ids.shape[1], "image_tokens": n_vis,
        "hf_dense_prefill_s": t["hf_dense"], "executor_dense_prefill_s": t["executor_dense"],
        "dense_baseline": "hf_forward" if t["hf_dense"] <= t["executor_dense"] else "executor",
    }
    # decoding: `decode_tokens` single-token steps from a copy of each prefill's cache
    steps = size["decode_tokens"]
    dense_cache = KVCache(adapter.num_layers)
    dense_logits = execute(model, inputs_embeds=embeds, cache=dense_cache, attention_mask=mask,
                           logits_rows="last").logits[:, -1]
    first = dense_logits.argmax(-1)[:, None]
    from transformers import DynamicCache

    from brisklm.core.generate import generate

    hf_cache = model(inputs_embeds=embeds, attention_mask=mask, position_ids=positions, cache=DynamicCache(config=model.config),
                     use_cache=True).cache

    def hf_decode():
        cache, token, pos = copy.deepcopy(hf_cache), first, positions[:, -1:]
        for _ in range(steps):
            pos = pos + 1
            out_ = model(input_ids=token, cache=cache, position_ids=pos, use_cache=True)
            cache, token = out_.cache, out_.logits[:, -1].argmax(-1)[:, None]

    options = dict(max_new_tokens=steps, do_sample=False, eos_token_id=None, pad_token_id=0)
    decode = {"hf_dense": timed(hf_decode),
              "brisklm_dense": timed(lambda: generate(model, first, cache=copy.deepcopy(dense_cache), **options))}
    kv_bytes = {"dense": _used_kv_bytes([dense_cache], batch)}
    for name, spec in specs.items():
        cache, logits, record = pruned(spec)
        ideal = 1.0 / flops_ratio(record, adapter, mask.sum(dim=1))
        out[name] = {"flops_ratio": 1.0 / ideal, "prefill_s": t[name],
                     "prefill": ratios(dense_s, t[name], ideal),
                     "prefill_vs_executor_dense": ratios(t["executor_dense"], t[name], ideal),
                     "visual_tokens_per_layer": [int(v.max()) for v in record.visual]}
        kv_bytes[name] = _used_kv_bytes([cache], batch)
        plan_fn = decode_plan_fn(record.plan.visibility)
        decode[name] = timed(lambda c=cache, p=plan_fn: generate(model, first, cache=copy.deepcopy(c), plan_fn=p,
                                                                 **options))
    cache, logits, context = vica()
    ideal = 1.0 / _vica_ratio(adapter, ids.shape[1] - n_vis, n_vis, layers)
    out["vica"] = {"layers": list(layers), "flops_ratio": 1.0 / ideal, "prefill_s": t["vica"],
                   "prefill": ratios(dense_s, t["vica"], ideal),
                   "prefill_vs_executor_dense": ratios(t["executor_dense"], t["vica"], ideal)}
    kv_bytes["vica"] = _used_kv_bytes([cache, context], batch)
    decode["vica"] = timed(lambda: generate(model, first, cache=copy.deepcopy(cache), context=[context], **options))
    d = interleaved(decode, size["repeats"])
    dense_decode = min(d["hf_dense"], d["brisklm_dense"])
    out["decode"] = {"tokens": steps, "hf_dense_ms_per_token": 1000 * d["hf_dense"] / steps,
                     "brisklm_dense_ms_per_token": 1000 * d["brisklm_dense"] / steps,
                     "dense_baseline": "hf_forward" if d["hf_dense"] <= d["brisklm_dense"] else "brisklm_generate"}
    for name in [*specs, "vica"]:
        out[name]["decode_ms_per_token"] = 1000 * d[name] / steps
        out[name]["decode_speedup"] = dense_decode / d[name]
        out[name]["kv_bytes"] = kv_bytes[name]
        out[name]["kv_bytes_vs_dense"] = kv_bytes[name] / kv_bytes["dense"]
    out["dense_kv_bytes"] = kv_bytes["dense"]
    return out


@torch.no_grad()
def real_shape_figures(quick: bool, seed: int = 0, progress: Callable = lambda x, **k: x,
                       on_batch: Callable[[dict], None] | None = None) -> dict[str, Any]:
    """Every real-shape figure (module docstring), on $BRISK_DEVICE in $BRISK_DTYPE (cpu float32 by default).
    quick: a narrow 4-layer model, 48 image tokens, one repeat (checks that the section runs; not a timing)."""
    size = QUICK if quick else FULL
    device = resolve_device("auto")
    dtype = resolve_dtype("auto", device)
    model = random_model(size["shape"], device, dtype, seed)
    model.config.image_token_id = IMAGE_TOKEN_ID
    g = torch.Generator().manual_seed(seed)
    out: dict[str, Any] = {
        "shape": {k: size["shape"][k] for k in ("hidden_size", "num_attention_heads", "num_key_value_heads",
                                                 "intermediate_size", "num_hidden_layers", "vocab_size")},
        "device": str(device) if device.type != "cuda" else f"{device} ({torch.cuda.get_device_name(device)})",
        "dtype": str(dtype).replace("torch.", ""), "torch_threads": torch.get_num_threads(),
        "repeats": size["repeats"], "quick": quick,
        "note": "ratios vs the faster dense run (HF forward or our executor; named in dense_baseline); "
                "fraction_of_ideal = (speed-up - 1) / (ideal - 1), ideal = 1 / analytic FLOPs ratio (scoring included)",
    }
    for batch in progress(list(size["batches"]), desc="vision real-shape"):
        out[f"batch_{batch}"] = _one_batch(model, size, batch, device, g)
        if on_batch is not None:  # partial figures survive a run that is stopped later
            on_batch(out)
    return out


def real_shape_key(device: str) -> str:
    """`real_shape` for the CPU, else e.g. `real_shape_cuda` (a GPU run keeps the CPU figures beside it)."""
    return "real_shape" if device == "cpu" else "real_shape_" + device.split(":")[0].split()[0]
