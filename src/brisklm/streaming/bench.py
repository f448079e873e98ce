"""`brisk bench streaming`: BLEU / AL / LAAL of GPE, re-encoding, offline and interleaved; cost of GPE vs re-encoding.

Sections (`--section NAME` runs one alone and merges it into the saved results):
- zoo: models translate-gpe (GPE engine), translate-offline (batch LLM: offline, and wait-k with full
  re-encoding), translate-interleaved (arrival order, one cache); costs measured in the same run, same streams;
- kv_cache_append_cost: KVCache's per-token write cost as a stream grows (flat), against a cat per token;
- real_shape: GPE vs re-encoding on a Qwen2.5-0.5B-shaped random model with a BPE tokenizer (realshape.py).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Callable, Sequence

from brisklm.core.timing import one_torch_thread, time_many
from brisklm.eval.bench import BenchContext
from brisklm.eval.metrics import LatencyInstance, bleu, corpus_latency
from brisklm.eval.report import save_figure
from brisklm.streaming.engine import reference_logits
from brisklm.streaming.policies import DecodeResult, gpe_wait_k, interleaved_wait_k, offline, reencode_wait_k
from brisklm.tasks.translation import TranslationTask

KS = (1, 3, 5)
METHODS = ("gpe", "reencode", "reencode_strict", "interleaved", "offline")


def latency(result: DecodeResult, references: Sequence[str], metric: str) -> float:
    """Corpus AL or LAAL in words (reference length, SimulEval's default); an empty output counts as delay |X|."""
    items = [LatencyInstance(o.delays or [o.source_words], o.source_words, len(ref.split()))
             for o, ref in zip(result.outputs, references)]
    return corpus_latency(items, metric)


def _load(name: str):
    from brisklm.zoo.store import load

    return load(name)


def quality_table(n_examples: int, ks: Sequence[int] = KS, seed: int = 0,
                  progress: Callable = lambda x, **_: x) -> dict[str, Any]:
    """BLEU, AL and LAAL of each method at each k on the translation test split."""
    gpe, off, inter = _load("translate-gpe"), _load("translate-offline"), _load("translate-interleaved")
    test = TranslationTask().examples("test", n_examples, seed=seed)
    sources, refs = [e.meta["source_words"] for e in test], [e.completion for e in test]
    figures: dict[str, Any] = {"bleu": {}, "laal": {}, "al": {}}
    runs = [("gpe", k, lambda k: gpe_wait_k(gpe.model, gpe.tokenizer, sources, k)) for k in ks]
    runs += [("reencode", k, lambda k: reencode_wait_k(off.model, off.tokenizer, sources, k)) for k in ks]
    runs += [("reencode_strict", k, lambda k: reencode_wait_k(off.model, off.tokenizer, sources, k, strict=True))
             for k in ks]
    runs += [("interleaved", k, lambda k: interleaved_wait_k(inter.model, inter.tokenizer, sources, k)) for k in ks]
    runs += [("offline", None, lambda k: offline(off.model, off.tokenizer, sources))]
    extra_reads: dict[str, float] = {}
    for method, k, fn in progress(runs, desc="streaming quality"):
        result = fn(k)
        key = f"k{k}" if k is not None else "all"
        if method == "reencode":
            extra_reads[key] = round(extra_read_fraction(result, k), 3)
        for name, value in (("bleu", bleu(result.hypotheses, refs)), ("laal", latency(result, refs, "LAAL")),
                            ("al", latency(result, refs, "AL"))):
            figures[name].setdefault(method, {})[key] = round(value, 3)
    figures["n_test_sentences"] = len(test)
    figures["reencode_extra_read_word_fraction"] = extra_reads
    figures["feasible_word_fraction"] = {f"k{k}": round(feasible_fraction(test, k), 3) for k in ks}
    return figures


def extra_read_fraction(result: DecodeResult, k: int) -> float:
    """Share of written words whose delay exceeds the wait-k schedule (read more instead of ending early)."""
    extra = total = 0
    for out in result.outputs:
        for j, d in enumerate(out.delays):
            extra += d > min(k + j, out.source_words)
            total += 1
    return extra / max(total, 1)


def feasible_fraction(examples, k: int) -> float:
    """Share of reference words whose oracle source need is met by wait-k (the rest must be guessed)."""
    ok = total = 0
    for e in examples:
        n = len(e.meta["source_words"])
        for j, need in enumerate(e.meta["source_needed"]):
            ok += need <= min(k + j, n)
            total += 1
    return ok / total


def cost_table(lengths: Sequence[int], n_streams: int, k: int, repeats: int, seed: int = 0,
               progress: Callable = lambda x, **_: x) -> dict[str, Any]:
    """Forward tokens and median wall seconds of GPE vs re-encoding on sources of fixed lengths (same streams)."""
    gpe, off = _load("translate-gpe"), _load("translate-offline")
    out: dict[str, Any] = {}
    for n in progress(list(lengths), desc="streaming cost"):
        test = TranslationTask(min_len=n, max_len=n).examples("test", n_streams, seed=seed)
        sources = [e.meta["source_words"] for e in test]
        g = gpe_wait_k(gpe.model, gpe.tokenizer, sources, k, batch_size=n_streams)
        r = reencode_wait_k(off.model, off.tokenizer, sources, k, batch_size=n_streams)
        wall_g = time_many(lambda: gpe_wait_k(gpe.model, gpe.tokenizer, sources, k, batch_size=n_streams), repeats)
        wall_r = time_many(lambda: reencode_wait_k(off.model, off.tokenizer, sources, k, batch_size=n_streams), repeats)
        out[f"n{n}"] = {
            "forward_tokens_gpe": g.forward_tokens, "forward_tokens_reencode": r.forward_tokens,
            "forward_tokens_ratio": round(r.forward_tokens / g.forward_tokens, 2),
            "target_words_gpe": sum(len(o.words) for o in g.outputs),
            "target_words_reencode": sum(len(o.words) for o in r.outputs),
            "wall_gpe_s": round(wall_g["median_s"], 4), "wall_reencode_s": round(wall_r["median_s"], 4),
            "wall_ratio": round(wall_r["median_s"] / wall_g["median_s"], 2),
        }
    return out


def engine_exactness(n_streams: int, k: int = 3, seed: int = 0) -> float:
    """Max |logit difference| between the engine (teacher-forced) and the full masked pass on the GPE model."""
    gpe = _load("translate-gpe")
    test = TranslationTask().examples("test", n_streams, seed=seed)
    sources = [e.meta["source_words"] for e in test]
    targets = [gpe.tokenizer.convert_tokens_to_ids(e.meta["target_words"]) for e in test]
    result = gpe_wait_k(gpe.model, gpe.tokenizer, sources, k, forced=targets, keep_logits=True)
    worst = 0.0
    for src, tgt, out in zip(sources, targets, result.outputs):
        ref = reference_logits(gpe.model, gpe.tokenizer, src, tgt, k)
        worst = max(worst, float((out.logits - ref).abs().max()))
    return worst


WINDOWS = (64, 128, 256, 512, 1024, 2048, 4096)


def cache_write_cost(length: int = 4096, windows: Sequence[int] = WINDOWS, layers: int = 8,
                     kv_heads: int = 2, head_dim: int = 64, repeats: int = 3) -> dict[str, Any]:
    """Microseconds per appended token per layer of KVCache.update, by stream-length window, against the old
    append (a torch.cat of the whole cache per token per layer) in the same run, alternating; medians of
    `repeats` streams.

    Qwen2.5-0.5B's K/V shape (2 kv heads of 64); one token per step, as a streaming writer appends."""
    import time

    import torch

    from brisklm.core.cache import KVCache, cat_meta

    def stream(grow: bool) -> list[float]:
        cache = KVCache(layers)
        token = torch.randn(1, kv_heads, 1, head_dim)
        meta = {"order": torch.zeros(1, 1, dtype=torch.long), "position": torch.zeros(1, 1, dtype=torch.long),
                "valid": torch.ones(1, 1, dtype=torch.bool)}
        marks, start = [], time.perf_counter()
        for t in range(1, length + 1):
            for idx in range(layers):
                if grow:
                    cache.update(token, token, meta, idx)
                else:  # the previous KVCache: concatenate the whole layer per token
                    layer = cache.layers[idx]
                    if layer.keys is None:
                        layer.keys, layer.values, layer.meta = token, token, dict(meta)
                    else:
                        layer.keys = torch.cat([layer.keys, token], 2)
                        layer.values = torch.cat([layer.values, token], 2)
                        layer.meta = cat_meta([layer.meta, meta])
            if t in windows:
                marks.append(time.perf_counter())
        edges, out, before = [0, *windows], [], start
        for (lo, hi), when in zip(zip(edges, edges[1:]), marks):
            out.append((when - before) / ((hi - lo) * layers) * 1e6)
            before = when
        return out

    figures: dict[str, Any] = {"layers": layers, "kv_heads": kv_heads, "head_dim": head_dim, "repeats": repeats}
    variants = (("grown_buffer", True), ("cat_per_token", False))
    samples: dict[str, list[list[float]]] = {name: [] for name, _ in variants}
    for r in range(repeats):  # alternate the two (first one, then the other) so shared-CPU load hits both alike
        for name, grow in variants[r % 2:] + variants[:r % 2]:
            samples[name].append(stream(grow))
    for name, _ in variants:
        runs = samples[name]
        figures[f"us_per_token_layer_{name}"] = {
            f"{lo}-{hi}": round(sorted(r[i] for r in runs)[len(runs) // 2], 2)
            for i, (lo, hi) in enumerate(zip([0, *windows], windows))}
    return figures


def bleu_laal_figure(figures: dict[str, Any], out_dir: Path | None = None):
    """BLEU against LAAL for each method (points at k = 1, 3, 5; offline is one point)."""
    from brisklm.eval.report import new_figure

    fig = new_figure(6.0, 4.0)
    ax = fig.add_subplot(111)
    for method, marker in zip(METHODS, "osDv*"):
        bleus, laals = figures["bleu"].get(method, {}), figures["laal"].get(method, {})
        keys = sorted(bleus)
        ax.plot([laals[x] for x in keys], [bleus[x] for x in keys], marker=marker, label=method)
        for x in keys:
            ax.annotate(x, (laals[x], bleus[x]), fontsize=7, textcoords="offset points", xytext=(3, 3))
    ax.set_xlabel("LAAL (source words)")
    ax.set_ylabel("BLEU")
    ax.set_title("simultaneous translation: quality vs latency")
    ax.legend()
    ax.grid(alpha=0.3)
    save_figure(fig, out_dir, "streaming_bleu_vs_laal.png")
    return fig


def cache_cost_figure(figures: dict[str, Any], out_dir: Path | None = None):
    """Microseconds per appended token per layer against stream length: KVCache's buffer vs a cat per token."""
    from brisklm.eval.report import new_figure

    fig = new_figure(6.0, 4.0)
    ax = fig.add_subplot(111)
    for name, marker in (("grown_buffer", "o"), ("cat_per_token", "s")):
        cost = figures[f"us_per_token_layer_{name}"]
        ax.plot([int(k.split("-")[1]) for k in cost], list(cost.values()), marker=marker, label=name)
    ax.set_xscale("log", base=2)
    ax.set_xlabel("stream length (tokens held, end of window)")
    ax.set_ylabel("µs per appended token per layer")
    ax.set_title("KVCache append cost as a stream grows")
    ax.legend()
    ax.grid(alpha=0.3)
    save_figure(fig, out_dir, "streaming_kv_append_cost.png")
    return fig


SECTIONS = ("zoo", "kv_cache_append_cost", "real_shape")  # `brisk bench streaming --section NAME` runs one


def streaming_benchmark(ctx: BenchContext) -> dict[str, Any]:
    """All streaming figures: quality per method and k, cost of GPE vs re-encoding, engine exactness (zoo
    models), the KV-cache append cost, and the real-shape cost section."""
    figures: dict[str, Any] = {}
    with one_torch_thread():
        if ctx.wants("zoo"):
            figures.update(zoo_figures(ctx))
        if ctx.wants("kv_cache_append_cost"):
            cost = cache_write_cost(1024 if ctx.quick else 4096, WINDOWS[:5] if ctx.quick else WINDOWS,
                                    repeats=1 if ctx.quick else 5)
            figures["kv_cache_append_cost"] = cost
            cache_cost_figure(cost, ctx.out_dir)
        if ctx.wants("real_shape"):
            from brisklm.streaming.realshape import real_shape_figure, real_shape_figures

            real = real_shape_figures(ctx.quick, ctx.seed, ctx.progress)
            key = real_shape_key(real["device"], real["dtype"])  # a GPU run keeps the CPU figures beside it
            figures[key] = real
            save_figure(real_shape_figure(real), ctx.out_dir, f"streaming_{key}.png")
    return figures


def real_shape_key(device: str, dtype: str) -> str:
    """`real_shape` for the CPU in float32, else e.g. `real_shape_cuda_bfloat16`."""
    if device == "cpu" and dtype == "float32":
        return "real_shape"
    return f"real_shape_{device.split(':')[0]}_{dtype}"


def zoo_figures(ctx: BenchContext) -> dict[str, Any]:
    """Quality, cost and exactness figures on the zoo's translation models."""
    figures = quality_table(100 if ctx.quick else 300, seed=ctx.seed, progress=ctx.progress)
    lengths = (10, 20, 40) if ctx.quick else (10, 20, 40, 60)
    cost = cost_table(lengths, 8 if ctx.quick else 16, k=3, repeats=3 if ctx.quick else 5, seed=ctx.seed,
                      progress=ctx.progress)
    figures["cost_by_source_length_k3"] = cost
    for key in ("forward_tokens_gpe", "forward_tokens_reencode", "wall_gpe_s", "wall_reencode_s"):
        figures[key] = cost["n20"][key]
    figures["forward_tokens_ratio_n20"] = cost["n20"]["forward_tokens_ratio"]
    figures["wall_ratio_n20"] = cost["n20"]["wall_ratio"]
    figures["engine_vs_full_max_abs_diff"] = engine_exactness(10 if ctx.quick else 30, seed=ctx.seed)
    for other in ("reencode", "reencode_strict"):
        figures[f"bleu_gap_gpe_minus_{other}"] = {
            f"k{k}": round(figures["bleu"]["gpe"][f"k{k}"] - figures["bleu"][other][f"k{k}"], 2) for k in KS}
    bleu_laal_figure(figures, ctx.out_dir)
    return figures
