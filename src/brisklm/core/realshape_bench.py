"""`brisk bench realshape`: the executor and the generation loop on a real model shape, against HF's own code.

A random-weight model with the shape of Qwen2.5-0.5B (d=896, 14 query / 2 KV heads, MLP 4864, 24 layers, vocab
151936, tied embeddings) runs in float32 and bfloat16 (or only `--dtype` when given) on `--device`:
- prefill: the executor's no-op plan vs `model(...)`, batch 1 and 8, 512 tokens (logits of every row, both);
- decoding: 128 greedy tokens with `model.generate` vs `brisklm.generate` (eos disabled, so both run all steps).
Medians of several repeats; ratios are brisklm / HF (below 1 = faster). `--quick` (and any run on a CPU) uses a
narrow, shallow, short form of the same layout so it finishes in seconds; the JSON records the shape used.
"""

from __future__ import annotations

import os
from typing import TYPE_CHECKING, Any, Callable

import torch

from brisklm.core.device import DTYPE_ENV, resolve_device, resolve_dtype
from brisklm.core.executor import execute
from brisklm.core.plan import LayerStep, Plan
from brisklm.core.timing import time_many

if TYPE_CHECKING:  # the harness is a higher layer: only its type is named here
    from brisklm.eval.bench import BenchContext

QWEN25_05B = dict(hidden_size=896, num_attention_heads=14, num_key_value_heads=2, intermediate_size=4864,
                  num_hidden_layers=24, vocab_size=151936, tie_word_embeddings=True, rope_theta=1e6,
                  max_position_embeddings=32768, rms_norm_eps=1e-6)
FULL = dict(shape=QWEN25_05B, batches=(1, 8), seq=512, new_tokens=128, repeats=5)
# Same head layout (14 / 2 heads, GQA 7), narrow and shallow: for CI and CPUs.
SMALL_SHAPE = {**QWEN25_05B, "hidden_size": 224, "intermediate_size": 1216, "num_hidden_layers": 2,
               "vocab_size": 8192}
QUICK = dict(shape=SMALL_SHAPE, batches=(1, 2), seq=64, new_tokens=8, repeats=2)
CPU_FULL = dict(shape={**QWEN25_05B, "num_hidden_layers": 2}, batches=(1, 2), seq=128, new_tokens=16, repeats=3)


def settings(quick: bool, device: torch.device) -> dict[str, Any]:
    """Sizes of a run: the real shape on a GPU, a reduced one with --quick or on a CPU."""
    if quick:
        return QUICK
    return FULL if device.type != "cpu" else CPU_FULL


def random_model(shape: dict[str, Any], device: torch.device, dtype: torch.dtype, seed: int):
    """A random-weight Qwen2 causal LM of `shape`, built directly on `device` (no download), eos disabled."""
    from transformers import Qwen2Config, Qwen2ForCausalLM

    torch.manual_seed(seed)
    with torch.device(device):
        model = Qwen2ForCausalLM(Qwen2Config(**shape, pad_token_id=0, bos_token_id=None, eos_token_id=None))
    model = model.to(dtype).eval()
    model.generation_config.eos_token_id = None  # both loops decode every requested token
    model.generation_config.pad_token_id = 0
    return model


def _synced(fn: Callable[[], Any], device: torch.device) -> Callable[[], Any]:
    """fn, then wait for the device, so wall-clock time covers the queued kernels."""
    def run() -> Any:
        out = fn()
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        return out
    return run


def _median(fn: Callable[[], Any], device: torch.device, repeats: int) -> float:
    return float(time_many(_synced(fn, device), repeats=repeats, warmup=1)["median_s"])


@torch.no_grad()
def measure(model, device: torch.device, batches, seq: int, new_tokens: int, repeats: int, seed: int) -> dict:
    """Prefill and decode figures of one model (one dtype)."""
    from brisklm.core.generate import generate

    vocab = model.config.vocab_size
    layers = model.config.num_hidden_layers
    g = torch.Generator().manual_seed(seed)
    out: dict[str, Any] = {}
    noop = Plan(steps=[LayerStep()] * layers)
    for batch in batches:
        ids = torch.randint(1, vocab, (batch, seq), generator=g).to(device)
        ref = model(ids).logits
        ours = execute(model, ids, plan=noop).logits
        diff = (ours.float() - ref.float()).abs().max().item()
        scale = ref.float().abs().max().item()
        del ref, ours
        hf_s = _median(lambda: model(ids).logits, device, repeats)
        ex_s = _median(lambda: execute(model, ids, plan=noop).logits, device, repeats)
        out[f"prefill_b{batch}_len{seq}"] = {"hf_s": hf_s, "executor_s": ex_s, "executor_over_hf": ex_s / hf_s,
                                             "hf_tokens_per_s": batch * seq / hf_s,
                                             "noop_max_abs_diff": diff, "logit_scale": scale}
    prompt = torch.randint(1, vocab, (1, seq), generator=g).to(device)
    mask = torch.ones_like(prompt)
    options = dict(max_new_tokens=new_tokens, do_sample=False)
    hf_ids = model.generate(prompt, attention_mask=mask, **options)
    our_ids = generate(model, prompt, mask, **options)
    hf_new, our_new = hf_ids[0, seq:], our_ids[0, seq:]
    agree = int((hf_new == our_new).cumprod(0).sum()) if hf_new.shape == our_new.shape else 0
    hf_s = _median(lambda: model.generate(prompt, attention_mask=mask, **options), device, max(2, repeats // 2))
    ours_s = _median(lambda: generate(model, prompt, mask, **options), device, max(2, repeats // 2))
    out[f"greedy_decode_{new_tokens}_after_{seq}"] = {
        "hf_generate_s": hf_s, "brisklm_generate_s": ours_s, "brisklm_over_hf": ours_s / hf_s,
        "hf_tokens_per_s": new_tokens / hf_s, "brisklm_tokens_per_s": new_tokens / ours_s,
        "same_tokens_before_first_difference": agree, "new_tokens": new_tokens,
    }
    return out


def dtypes_to_run(device: torch.device) -> list[torch.dtype]:
    """--dtype when given (via $BRISK_DTYPE), else both float32 and bfloat16."""
    if os.environ.get(DTYPE_ENV):
        return [resolve_dtype("auto", device)]
    return [resolve_dtype("float32", device), resolve_dtype("bfloat16", device)]


def bench_realshape(ctx: BenchContext) -> dict:
    """Executor no-op prefill and brisklm.generate vs HF on a Qwen2.5-0.5B-shaped random model."""
    device = resolve_device("auto")
    size = settings(ctx.quick, device)
    figures: dict[str, Any] = {
        "device": str(device) if device.type != "cuda" else f"{device} ({torch.cuda.get_device_name(device)})",
        "shape": {k: size["shape"][k] for k in ("hidden_size", "num_attention_heads", "num_key_value_heads",
                                                 "intermediate_size", "num_hidden_layers", "vocab_size")},
        "real_shape": size["shape"] == QWEN25_05B,
    }
    for dtype in ctx.progress(dtypes_to_run(device), desc="dtypes"):
        name = str(dtype).replace("torch.", "")
        model = random_model(size["shape"], device, dtype, ctx.seed)
        figures[name] = measure(model, device, size["batches"], size["seq"], size["new_tokens"], size["repeats"],
                                ctx.seed)
        del model
        if device.type == "cuda":
            torch.cuda.empty_cache()
    return figures
