"""Real-shape cost of GPE streaming against re-encoding: the `real_shape` section of `brisk bench streaming`.

A random-weight decoder with the shape of Qwen2.5-0.5B (d=896, 14 query / 2 KV heads, MLP 4864, vocab 151936,
8 layers) and the byte-level BPE tokenizer of the qwen2 fixture (no BOS, ChatML template, multi-token words).
Speed does not depend on the weights, so every decoder writes the same forced target (teacher ids) under the same
wait-k schedule; the section checks that the word delays agree. Compared in one run, interleaved, medians:
- GPE: the two-cache engine (streaming/engine.py), every source and target token encoded once;
- re-encoding: at every read, the whole prefix `prompt source-so-far header target-so-far` is encoded anew;
  between reads (the further tokens of a word) it steps with its own cache. Run twice: HF's `model(...)` with a
  DynamicCache, and brisklm's executor with a KVCache; the faster of the two is the baseline.
Ratios come with the ideal (the forward-token ratio) and the strict (s - 1) / (ideal - 1). `model_calls` counts
forward calls: at batch 1 a call that feeds a token or two reads every weight once, so on a CPU (memory-bound)
the wall time follows the calls more than the tokens.
"""

from __future__ import annotations

import tempfile
from typing import Any, Callable, Sequence

import torch

from brisklm.core.adapter import ModelAdapter
from brisklm.core.cache import KVCache
from brisklm.core.device import resolve_device, resolve_dtype
from brisklm.core.executor import execute
from brisklm.core.realshape_bench import QWEN25_05B, SMALL_SHAPE, random_model
from brisklm.core.text import TextLayer
from brisklm.core.timing import interleaved_medians, speedup_ratios
from brisklm.errors import BriskError
from brisklm.streaming.gpe import stream_frame, token_words, word_segments
from brisklm.streaming.policies import gpe_wait_k

SHAPE = {**QWEN25_05B, "num_hidden_layers": 8}
FULL = dict(shape=SHAPE, lengths=(20, 60), repeats=3, warmup=0)
QUICK = dict(shape=SMALL_SHAPE, lengths=(4, 8), repeats=1, warmup=0)
K = 3
BASELINES = ("reencode_hf", "reencode_executor")


def fixture_tokenizer(style: str = "qwen2", seed: int = 0):
    """The byte-level BPE tokenizer (with its chat template and special tokens) of a real-convention fixture."""
    from transformers import AutoTokenizer

    from brisklm.testing.checkpoints import build_checkpoint

    with tempfile.TemporaryDirectory() as tmp:
        build_checkpoint(style, tmp, seed=seed)
        return AutoTokenizer.from_pretrained(tmp)


def corpus_words(n: int, target: bool = False) -> list[str]:
    """n English words (the fixtures' sentences, cycled; a target starts half-way through): most split into
    several BPE tokens."""
    from brisklm.testing.checkpoints import ENGLISH

    words = " ".join(ENGLISH).split()
    offset = len(words) // 2 if target else 0
    return [words[(offset + i) % len(words)] for i in range(n)]


def schedule(text: TextLayer, target_ids: Sequence[int], n: int, k: int) -> list[int]:
    """Source words read before each written token (the target's tokens, then its end), as the engine reads:
    a token sees what the word it may start needs, min(k + words started so far, n)."""
    started, out = 0, []
    firsts = [i == 0 for word in token_words(text, list(target_ids)) for i in range(len(word))]
    for first in [*firsts, True]:
        out.append(min(k + started, n))
        started += int(first)
    return out


class ReencodeRunner:
    """Forced wait-k decoding that re-encodes the whole prefix at each read and steps with a cache between reads.

    `hf=True` uses the model's own forward and DynamicCache (logits of the last row only); else brisklm's executor
    with a KVCache. `run()` returns the forward tokens and each written word's delay."""

    def __init__(self, model, text: TextLayer, source: Sequence[str], target_ids: Sequence[int], k: int,
                 hf: bool) -> None:
        self.model, self.text, self.hf = model, text, hf
        frame = stream_frame(text)
        self.segments = word_segments(text, list(source), frame.first_at_start)
        self.prompt, self.header = list(frame.prompt), list(frame.batch_separator)
        self.target = [int(t) for t in target_ids]
        self.reads = schedule(text, self.target, len(source), k)
        self.layers = ModelAdapter.from_model(model).num_layers
        self.device = next(model.parameters()).device

    def _forward(self, ids: list[int], cache):
        batch = torch.tensor([ids], dtype=torch.long, device=self.device)
        if self.hf:
            from transformers import DynamicCache

            cache = DynamicCache(config=self.model.config) if cache is None else cache
            out = self.model(input_ids=batch, cache=cache, use_cache=True, logits_to_keep=1)
            return out.cache, out.logits[0, -1]
        cache = KVCache(self.layers) if cache is None else cache
        return cache, execute(self.model, batch, cache=cache, logits_rows="last").logits[0, -1]

    @torch.no_grad()
    def run(self) -> tuple[int, list[int]]:
        forward, cache, read, delays = 0, None, -1, []
        firsts = [i == 0 for word in token_words(self.text, self.target) for i in range(len(word))]
        for i, p in enumerate(self.reads):
            if p != read:  # a read: re-encode everything with a fresh cache
                ids = self.prompt + [t for seg in self.segments[:p] for t in seg] + self.header + self.target[:i]
                cache, logits = self._forward(ids, None)
                forward += len(ids)
            else:
                cache, logits = self._forward([self.target[i - 1]], cache)
                forward += 1
            int(logits.argmax())  # the greedy choice every decoder makes (forced ids are written instead)
            if i < len(self.target) and firsts[i]:
                delays.append(p)
            read = p
        return forward, delays


def length_figures(model, text: TextLayer, n: int, repeats: int, warmup: int, k: int = K) -> dict[str, Any]:
    """GPE vs both re-encoding runners on one n-word source (forced n-word target): tokens, seconds, ratios."""
    source, target_words = corpus_words(n), corpus_words(n, target=True)
    target = [t for seg in word_segments(text, target_words) for t in seg]
    device = next(model.parameters()).device

    runners = {name: ReencodeRunner(model, text, source, target, k, hf=name == "reencode_hf") for name in BASELINES}
    last: dict[str, Any] = {}  # each decoder's latest result, checked after the timing (no extra untimed runs)
    calls = {"now": "", **{name: 0 for name in ("gpe", *BASELINES)}}  # model calls (embedding lookups) per run

    def keep(name: str, fn: Callable[[], Any]) -> Callable[[], Any]:
        def run() -> None:
            calls["now"], calls[name] = name, 0
            last[name] = fn()
            if device.type == "cuda":
                torch.cuda.synchronize(device)
        return run

    def count(*_: Any) -> None:
        calls[calls["now"]] += 1

    fns = {"gpe": keep("gpe", lambda: gpe_wait_k(model, text, [source], k, batch_size=1, forced=[target]))}
    fns.update({name: keep(name, runner.run) for name, runner in runners.items()})
    hook = model.get_input_embeddings().register_forward_hook(count)
    try:
        seconds = interleaved_medians(fns, repeats=repeats, warmup=warmup)
    finally:
        hook.remove()
    gpe_delays = last["gpe"].outputs[0].delays
    tokens = {"gpe": last["gpe"].forward_tokens}
    for name in BASELINES:
        forward, delays = last[name]
        if delays != gpe_delays:
            raise BriskError(f"{name} and GPE followed different schedules at {n} words: {delays} vs {gpe_delays}")
        tokens[name] = forward
    baseline = min(BASELINES, key=lambda b: seconds[b])
    out: dict[str, Any] = {
        "source_words": n, "source_tokens": sum(len(s) for s in word_segments(text, source)),
        "target_words": len(target_words), "target_tokens": len(target),
        "forward_tokens": tokens, "model_calls": {name: calls[name] for name in ("gpe", *BASELINES)},
        "wall_s": {k_: round(v, 4) for k_, v in seconds.items()},
        "baseline": baseline, "same_schedule": True,
    }
    for name in BASELINES:
        ideal = tokens[name] / tokens["gpe"]
        r = speedup_ratios(seconds[name], seconds["gpe"], ideal)
        out[f"vs_{name}"] = {"forward_tokens_ratio": round(ideal, 2), "wall_ratio": round(r["speedup"], 2),
                             "fraction_of_ideal": None if r["fraction_of_ideal"] is None
                             else round(r["fraction_of_ideal"], 3)}
    out["wall_ratio"] = out[f"vs_{baseline}"]["wall_ratio"]
    out["forward_tokens_ratio"] = out[f"vs_{baseline}"]["forward_tokens_ratio"]
    out["fraction_of_ideal"] = out[f"vs_{baseline}"]["fraction_of_ideal"]
    return out


def real_shape_figures(quick: bool, seed: int = 0, progress: Callable = lambda x, **_: x) -> dict[str, Any]:
    """The section's figures (see the module docstring); --quick: a narrow 2-layer model, 4 and 8 words, 1 run.

    Runs on `--device` / `--dtype` (via $BRISK_DEVICE / $BRISK_DTYPE; float32 on the CPU)."""
    size = QUICK if quick else FULL
    device = resolve_device("auto")
    dtype = resolve_dtype("auto", device)
    tokenizer = fixture_tokenizer(seed=seed)
    model = random_model(size["shape"], device, dtype, seed)
    text = TextLayer.for_model(model, tokenizer)
    out: dict[str, Any] = {
        "shape": {k: size["shape"][k] for k in ("hidden_size", "num_attention_heads", "num_key_value_heads",
                                                 "intermediate_size", "num_hidden_layers", "vocab_size")},
        "real_shape": size["shape"] == SHAPE, "tokenizer": "qwen2 fixture (byte-level BPE, ChatML template)",
        "device": str(device), "dtype": str(dtype).replace("torch.", ""), "torch_threads": torch.get_num_threads(),
        "k": K, "repeats": size["repeats"], "quick": quick, "batch": 1,
    }
    for n in progress(list(size["lengths"]), desc="real-shape streaming"):
        out[f"n{n}"] = length_figures(model, text, n, size["repeats"], size["warmup"])
    return out


def real_shape_figure(figures: dict[str, Any]):
    """Wall seconds per stream of GPE and the re-encoding baselines, by source length."""
    from brisklm.eval.report import new_figure

    fig = new_figure(6.0, 4.0)
    ax = fig.add_subplot(111)
    keys = sorted((k for k in figures if k.startswith("n") and k[1:].isdigit()), key=lambda k: int(k[1:]))
    xs = [figures[k]["source_words"] for k in keys]
    for name, marker in zip(("gpe", *BASELINES), "osD"):
        ax.plot(xs, [figures[k]["wall_s"][name] for k in keys], marker=marker, label=name)
    ax.set_xlabel("source words")
    ax.set_ylabel("wall seconds per stream (median)")
    ax.set_title(f"streaming at Qwen2.5-0.5B shape ({figures['shape']['num_hidden_layers']} layers, "
                 f"{figures['device']}, {figures['dtype']})")
    ax.legend()
    ax.grid(alpha=0.3)
    return fig
