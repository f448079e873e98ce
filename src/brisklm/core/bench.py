"""`brisk bench core`: the executor's no-op plan against the dense model for every family, with and without
a cache; sliding windows under a custom rule; bf16 against fp32; the executor's overhead vs the HF forward."""

from __future__ import annotations

import copy
from typing import TYPE_CHECKING

import torch
from transformers import DynamicCache

from brisklm.core.executor import execute
from brisklm.core.families import family_classes
from brisklm.core.plan import LayerStep, MatrixVisibility, Plan
from brisklm.core.timing import time_many

if TYPE_CHECKING:  # the harness is a higher layer: only its type is named here
    from brisklm.eval.bench import BenchContext

VOCAB, LENGTH, WINDOW = 211, 64, 16
_SLIDING = dict(use_sliding_window=True, sliding_window=WINDOW, max_window_layers=2)
_GEMMA = dict(head_dim=32, sliding_window=WINDOW)
FAMILY_SETTINGS = {  # family -> config settings: windows shorter than the sequence
    "llama": {},
    "qwen2": _SLIDING,
    "qwen3": _SLIDING,
    "mistral": dict(sliding_window=WINDOW),
    "gemma2": _GEMMA,  # default soft-caps 50 / 30, alternating layers
    "gemma3": dict(_GEMMA, layer_types=["sliding_attention", "full_attention"] * 2),
    "phi3": dict(sliding_window=WINDOW, pad_token_id=None, eos_token_id=2),
}


def _random_models(seed: int) -> dict:
    """One random fp32 model per family: d=128, 4 layers, 4 heads with 2 KV heads."""
    models = {}
    for family, extra in FAMILY_SETTINGS.items():
        config_cls, model_cls = family_classes(family)
        torch.manual_seed(seed)
        config = config_cls(vocab_size=VOCAB, hidden_size=128, intermediate_size=352, num_hidden_layers=4,
                            num_attention_heads=4, num_key_value_heads=2, **extra)
        models[family] = model_cls(config).eval()
    return models


def _diff(a: torch.Tensor, b: torch.Tensor) -> float:
    return (a.float() - b.float()).abs().max().item()


@torch.no_grad()
def bench_core(ctx: BenchContext) -> dict:
    """Max |logit diff| of a no-op plan vs model(...) per family, windows, bf16 vs fp32, and the overhead."""
    g = torch.Generator().manual_seed(ctx.seed)
    repeats = 3 if ctx.quick else 10
    out: dict = {}
    noop, noop_cache, bf16, rows = {}, {}, {}, {}
    window_rule, window_ignored = {}, {}
    for family, model in ctx.progress(list(_random_models(ctx.seed).items()), desc="families"):
        ids = torch.randint(0, VOCAB, (4, LENGTH), generator=g)
        ref = model(ids).logits
        plan = Plan(steps=[LayerStep()] * model.config.num_hidden_layers)
        noop[family] = _diff(execute(model, ids, plan=plan).logits, ref)
        cache = DynamicCache()
        parts = [execute(model, ids[:, a:b], cache=cache).logits for a, b in [(0, 40), (40, 41), (41, LENGTH)]]
        noop_cache[family] = _diff(torch.cat(parts, 1), ref)
        if family in ("mistral", "gemma2"):  # a custom rule equal to plain causal keeps the model's window
            causal = MatrixVisibility(torch.tril(torch.ones(4, LENGTH, LENGTH, dtype=torch.bool)))
            window_rule[family] = _diff(execute(model, ids, plan=Plan(visibility=causal)).logits, ref)
            window_ignored[family] = _diff(
                execute(model, ids, plan=Plan(visibility=causal, apply_window=False)).logits, ref)
        low = copy.deepcopy(model).to(torch.bfloat16)
        bf16[family] = {"executor": _diff(execute(low, ids).logits, execute(model, ids).logits),
                        "hf": _diff(low(ids).logits, ref)}
        hf = time_many(lambda: model(ids), repeats=repeats)["median_s"]
        ours = time_many(lambda: execute(model, ids), repeats=repeats)["median_s"]
        rows[family] = {"hf_forward_s": hf, "executor_forward_s": ours, "executor_over_hf": ours / hf}
    out["noop_max_abs_diff"] = max(noop.values())
    out["noop_cache_max_abs_diff"] = max(noop_cache.values())
    out.update({f"noop_max_abs_diff_{f}": v for f, v in noop.items()})
    out.update({f"noop_cache_max_abs_diff_{f}": v for f, v in noop_cache.items()})
    out["bf16_vs_fp32_max_abs_diff"] = max(v["executor"] for v in bf16.values())
    out["hf_bf16_vs_fp32_max_abs_diff"] = max(v["hf"] for v in bf16.values())
    out["bf16_vs_fp32_by_family"] = bf16
    out["window_custom_rule_max_abs_diff"] = max(window_rule.values())
    out["window_ignored_max_abs_diff"] = window_ignored  # what a plan's rule gave before windows composed
    out["timing_batch4_len64"] = rows
    return out
