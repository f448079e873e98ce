"""Real-shape speed of pruning, against HF's own forward: the `real_shape` section of `brisk bench pruning`.

A random-weight decoder with the shape of Qwen2.5-0.5B (d=896, 14 query / 2 KV heads, MLP 4864, vocab 151936,
8 layers): SkipGPT sparse execution at 25% and 40% module sparsity (routers whose biases give those skip rates)
against HF's dense forward and against masked (gate-multiplied) execution, prefill of 512 tokens at batch 1 and 8
and greedy decoding after a 512-token prompt; and a structured-width model against the dense one. Speed does not
depend on the weights, so random ones measure the real cost. Every ratio comes with the ideal FLOPs ratio i and both
s / i and the stricter (s - 1) / (i - 1) (the share of the ideal saving that became wall-clock saving).
"""

from __future__ import annotations

import copy
from typing import Any, Callable

import torch

from brisklm.core.adapter import ModelAdapter
from brisklm.core.cache import KVCache
from brisklm.core.executor import execute
from brisklm.core.flops import FlopsCounter, layer_macs
from brisklm.core.plan import LayerStep, Plan
from brisklm.core.realshape_bench import QWEN25_05B, random_model
from brisklm.core.timing import interleaved_medians as interleaved
from brisklm.core.timing import speedup_ratios as ratios
from brisklm.pruning.calibration import CalibData
from brisklm.pruning.gating import GatedRouting
from brisklm.pruning.routers import EXECUTE, RouterSet
from brisklm.pruning.sparse import RoutingRecord, sparse_forward, sparse_generate

SHAPE = {**QWEN25_05B, "num_hidden_layers": 8}
SPARSITIES = (0.25, 0.40)
FULL = dict(prefill=((1, 512), (8, 512)), prompt=512, new_tokens=32, repeats=5, masked_batches=(1, 8))
QUICK = dict(prefill=((1, 512), (8, 32)), prompt=512, new_tokens=8, repeats=2, masked_batches=(1,))


@torch.no_grad()
def rate_routers(model, ids: torch.Tensor, rate: float, seed: int = 0) -> RouterSet:
    """Random-direction linear routers whose biases make `rate` of the rows of `ids` skip each module at each layer.

    Biases are set layer by layer on the routed hidden states (the inputs the routers really see), so the rate
    holds per layer and module on `ids` and approximately on other text.
    """
    adapter = ModelAdapter.from_model(model)
    torch.manual_seed(seed)
    routers = RouterSet(adapter.num_layers, adapter.hidden_size).follow(model).eval()
    for router in list(routers.attn) + list(routers.mlp):
        router.out.weight.normal_(0, 1.0)
        router.out.bias.zero_()

    def decide(layer_idx: int, hidden: torch.Tensor, meta, step) -> LayerStep:
        for router in (routers.attn[layer_idx], routers.mlp[layer_idx]):
            z = router(hidden)
            margin = (z[..., EXECUTE] - z[..., 1 - EXECUTE])[meta["valid"]]
            router.out.bias[EXECUTE] -= torch.quantile(margin.float(), rate)
        attn, mlp = routers.decisions(layer_idx, hidden)
        return LayerStep(attn_rows=attn, mlp_rows=mlp)

    execute(model, ids, plan=Plan(decide=decide), logits_rows="last")
    return routers


def decode_ideal(adapter: ModelAdapter, records: list[RoutingRecord], context: int, policy: str = "full") -> float:
    """Ideal FLOPs ratio dense / routed over decode steps, from the routing decisions (lm_head included).

    Per step and layer: q, o and the attention scores (2 * heads * head_dim * context MACs) when attention runs;
    k/v when attention runs (always under FULL); the MLP when it runs; the LM head always."""
    heads, hd = adapter.num_heads, adapter.head_dim
    head = adapter.hidden_size * adapter.vocab_size
    dense = routed = 0
    for step, rec in enumerate(records):
        ctx = context + step + 1
        for layer, (attn, mlp) in enumerate(zip(rec.attn, rec.mlp)):
            macs = layer_macs(adapter, layer)
            attn_cost = macs["q_proj"] + macs["o_proj"] + 2 * heads * hd * ctx
            a, m = float(attn.float().mean()), float(mlp.float().mean())
            dense += attn_cost + macs["kv_proj"] + macs["mlp"]
            routed += a * attn_cost + (1.0 if policy == "full" else a) * macs["kv_proj"] + m * macs["mlp"]
        dense += head
        routed += head
    return dense / routed


@torch.no_grad()
def prefill_figures(model, routers: dict[str, RouterSet], ids: torch.Tensor, repeats: int, masked: bool) -> dict:
    """HF dense forward vs SkipGPT sparse execution (and masked execution) on one batch, last-row logits."""
    fns: dict[str, Callable[[], Any]] = {"hf_dense": lambda: model(input_ids=ids, logits_to_keep=1)}
    out: dict[str, Any] = {"batch": ids.shape[0], "tokens": ids.shape[1]}
    dense_f = FlopsCounter()
    execute(model, ids, flops=dense_f, logits_rows="last")
    for key, r in routers.items():
        sparse_f = FlopsCounter()
        _, record, _ = sparse_forward(model, r, ids, flops=sparse_f, logits_rows="last")
        out[key] = {"skip_rates": record.skip_rates(), "ideal_flops_ratio": dense_f.total() / sparse_f.total()}
        fns[f"sparse_{key}"] = lambda r=r: sparse_forward(model, r, ids, logits_rows="last")
        if masked:
            def run_masked(r=r):
                with GatedRouting(model, r, mode="argmax"):
                    model(input_ids=ids, logits_to_keep=1)
            fns[f"masked_{key}"] = run_masked
    t = interleaved(fns, repeats)
    out["hf_dense_s"] = t["hf_dense"]
    for key in routers:
        row = out[key]
        row["sparse_s"] = t[f"sparse_{key}"]
        row["vs_hf_dense"] = ratios(t["hf_dense"], row["sparse_s"], row["ideal_flops_ratio"])
        if masked:
            row["masked_s"] = t[f"masked_{key}"]
            row["vs_masked"] = ratios(row["masked_s"], row["sparse_s"], row["ideal_flops_ratio"])
    return out


@torch.no_grad()
def decode_figures(model, routers: dict[str, RouterSet], prompt: torch.Tensor, new_tokens: int, repeats: int) -> dict:
    """Decoding `new_tokens` after a cached prompt: HF generate and brisklm.generate (dense) vs SkipGPT through
    brisklm.generate (FULL and EVICT policies).

    The prompt (all but its last token) is cached once outside the timing; each timed call gets a copy of that
    cache and decodes from the last prompt token, so only single-token steps are timed. Tokens are sampled with a
    fixed seed (HF's default top-k 50 in both loops): a random-weight model's greedy choice repeats one token,
    whose fixed hidden states would route identically at every step."""
    from transformers import DynamicCache

    from brisklm.core.generate import generate

    adapter = ModelAdapter.from_model(model)
    head, last = prompt[:, :-1], prompt[:, -1:]
    options = dict(max_new_tokens=new_tokens, do_sample=True, top_k=50, eos_token_id=None, pad_token_id=0)

    def seeded(fn: Callable[[], Any]) -> Callable[[], Any]:
        def run():
            torch.manual_seed(0)
            return fn()
        return run

    hf_cache = model(input_ids=head, cache=DynamicCache(config=model.config), use_cache=True).cache
    caches, fns, out = {}, {}, {"batch": prompt.shape[0], "prompt_tokens": prompt.shape[1], "new_tokens": new_tokens}
    attn_mask = torch.ones_like(prompt)
    fns["hf_generate"] = seeded(lambda: model.generate(prompt, attention_mask=attn_mask,
                                                cache=copy.deepcopy(hf_cache), **options))
    dense_cache = KVCache(adapter.num_layers)
    execute(model, head, cache=dense_cache, logits_rows="last")
    fns["brisklm_dense"] = seeded(lambda: generate(model, last, cache=copy.deepcopy(dense_cache), **options))
    for key, r in routers.items():
        for policy in ("full", "evict"):
            cache = KVCache(adapter.num_layers)
            sparse_forward(model, r, head, policy=policy, cache=cache, logits_rows="last")
            caches[key, policy] = cache
            fns[f"sparse_{key}_{policy}"] = seeded(lambda r=r, c=cache, p=policy: sparse_generate(
                model, r, last, policy=p, cache=copy.deepcopy(c), **options))
    t = interleaved(fns, repeats)
    out["hf_generate_s"] = t["hf_generate"]
    out["hf_ms_per_token"] = 1000 * t["hf_generate"] / new_tokens
    out["brisklm_dense_generate_s"] = t["brisklm_dense"]
    out["brisklm_dense_ms_per_token"] = 1000 * t["brisklm_dense"] / new_tokens
    for key, r in routers.items():
        for policy in ("full", "evict"):
            records: list[RoutingRecord] = []
            torch.manual_seed(0)
            sparse_generate(model, r, last, policy=policy, cache=copy.deepcopy(caches[key, policy]), records=records,
                            **options)
            from brisklm.pruning.study import merged_rates

            ideal = decode_ideal(adapter, records, head.shape[1], policy)
            seconds = t[f"sparse_{key}_{policy}"]
            out[f"{key}_{policy}"] = {"skip_rates": merged_rates(records), "ideal_flops_ratio": ideal,
                                      "sparse_s": seconds, "ms_per_token": 1000 * seconds / new_tokens,
                                      "vs_hf_generate": ratios(t["hf_generate"], seconds, ideal),
                                      "vs_brisklm_dense": ratios(t["brisklm_dense"], seconds, ideal)}
    return out


@torch.no_grad()
def structured_figures(model, ids: torch.Tensor, repeats: int, sparsity: float = 0.25, heads_per_group: int = 2) -> dict:
    """A structured-width model (MLP channels + query heads per GQA group removed) vs the dense one, HF forward."""
    from brisklm.pruning.width import activation_norms, prune_structured

    g = torch.Generator().manual_seed(0)
    calib = CalibData([{"input_ids": row, "labels": [-100] + row[1:]}
                       for row in torch.randint(1, model.config.vocab_size, (2, 64), generator=g).tolist()], None, "random")
    norms = activation_norms(model, calib, pad_id=0)
    narrow, report = prune_structured(model, sparsity, norms, heads_per_group)
    dense_f, narrow_f = FlopsCounter(), FlopsCounter()
    execute(model, ids, flops=dense_f, logits_rows="last")
    execute(narrow, ids, flops=narrow_f, logits_rows="last")
    ideal = dense_f.total() / narrow_f.total()
    t = interleaved({"dense": lambda: model(input_ids=ids, logits_to_keep=1),
                     "structured": lambda: narrow(input_ids=ids, logits_to_keep=1)}, repeats)
    del narrow
    return {"batch": ids.shape[0], "tokens": ids.shape[1], **{k: report[k] for k in (
            "realised_sparsity", "intermediate_size", "num_attention_heads", "mlp_channels_removed")},
            "dense_s": t["dense"], "structured_s": t["structured"], "ideal_flops_ratio": ideal,
            "vs_hf_dense": ratios(t["dense"], t["structured"], ideal)}


@torch.no_grad()
def real_shape_figures(quick: bool, seed: int = 0, progress: Callable = lambda x, **k: x) -> dict[str, Any]:
    """Every real-shape figure (see the module docstring); quick: batch 8 at 32 tokens, 8 new tokens, 2 repeats."""
    size = QUICK if quick else FULL
    model = random_model(SHAPE, torch.device("cpu"), torch.float32, seed)
    vocab = model.config.vocab_size
    g = torch.Generator().manual_seed(seed)
    calib_ids = torch.randint(1, vocab, (1, 512), generator=g)
    routers = {f"{s:.2f}": rate_routers(model, calib_ids, s, seed) for s in SPARSITIES}
    out: dict[str, Any] = {
        "shape": {k: SHAPE[k] for k in ("hidden_size", "num_attention_heads", "num_key_value_heads",
                                        "intermediate_size", "num_hidden_layers", "vocab_size")},
        "device": "cpu", "torch_threads": torch.get_num_threads(), "repeats": size["repeats"], "quick": quick,
    }
    for batch, tokens in progress(list(size["prefill"]), desc="real-shape prefill"):
        ids = calib_ids if batch == 1 and tokens == 512 else torch.randint(1, vocab, (batch, tokens), generator=g)
        out[f"prefill_b{batch}_len{tokens}"] = prefill_figures(model, routers, ids, size["repeats"],
                                                              masked=batch in size["masked_batches"])
    out[f"decode_b1_{size['new_tokens']}_after_{size['prompt']}"] = decode_figures(
        model, routers, calib_ids[:, :size["prompt"]], size["new_tokens"], size["repeats"])
    out["structured_prefill_b1_len512"] = structured_figures(model, calib_ids, size["repeats"])
    return out
