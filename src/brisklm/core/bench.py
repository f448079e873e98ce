"""`brisk bench core`: the executor's no-op plan against the dense model, with and without a cache."""

from __future__ import annotations

import torch
from transformers import DynamicCache, LlamaConfig, LlamaForCausalLM, Qwen2Config, Qwen2ForCausalLM

from brisklm.core.executor import execute
from brisklm.core.plan import LayerStep, Plan
from brisklm.core.timing import time_many
from brisklm.eval.bench import BenchContext, register


def _random_models(seed: int):
    torch.manual_seed(seed)
    kw = dict(vocab_size=211, hidden_size=128, intermediate_size=352, num_hidden_layers=4,
              num_attention_heads=4, num_key_value_heads=2)
    return {"llama": LlamaForCausalLM(LlamaConfig(**kw)).eval(), "qwen2": Qwen2ForCausalLM(Qwen2Config(**kw)).eval()}


@register("core")
@torch.no_grad()
def bench_core(ctx: BenchContext) -> dict:
    """Max |logit diff| of a no-op plan vs model(...), and the executor's overhead vs the HF forward."""
    g = torch.Generator().manual_seed(ctx.seed)
    noop, noop_cache, rows = 0.0, 0.0, {}
    repeats = 3 if ctx.quick else 10
    for family, model in ctx.progress(list(_random_models(ctx.seed).items()), desc="families"):
        ids = torch.randint(0, 211, (4, 64), generator=g)
        ref = model(ids).logits
        plan = Plan(steps=[LayerStep()] * model.config.num_hidden_layers)
        noop = max(noop, (execute(model, ids, plan=plan).logits - ref).abs().max().item())
        cache = DynamicCache()
        parts = [execute(model, ids[:, a:b], cache=cache).logits for a, b in [(0, 40), (40, 41), (41, 64)]]
        noop_cache = max(noop_cache, (torch.cat(parts, 1) - ref).abs().max().item())
        hf = time_many(lambda: model(ids), repeats=repeats)["median_s"]
        ours = time_many(lambda: execute(model, ids), repeats=repeats)["median_s"]
        rows[family] = {"hf_forward_s": hf, "executor_forward_s": ours, "executor_over_hf": ours / hf}
    return {"noop_max_abs_diff": noop, "noop_cache_max_abs_diff": noop_cache, "timing_batch4_len64": rows}
