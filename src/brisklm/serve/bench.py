"""`brisk bench serve`: sessions/s and per-word latency of `brisk serve` on loopback vs the engine alone, for
wait-k (translate-gpe) and the entropy decision head (translate-proactive).

At 1, 10 and 50 concurrent sessions, closed-loop clients stream test-split sources one word per message and
wait for the server's ack (all writes that word allowed are done) before the next word. The baseline is the
engine alone doing the same work in the same process layout minus the server: the same number of sessions
advanced in lock-step rounds, their steps batched exactly as the scheduler batches them, one word per session
per round. Latency added by the server = server per-word latency - engine per-word latency (p50 and p99).
The server runs as a `brisk serve` subprocess (its own interpreter, like a deployment).
"""

from __future__ import annotations

import asyncio
import os
import statistics
import subprocess
import sys
import time
from typing import Any, Sequence

from brisklm.errors import BriskError
from brisklm.eval.bench import BenchContext

CONCURRENCY = (1, 10, 50)
K = 3
HEAD_THRESHOLD = 0.5  # the entropy head's default threshold (nats), as `brisk stream translate`


def percentile(values: Sequence[float], q: float) -> float:
    """The q-th percentile (0..100) by linear interpolation."""
    if not values:
        return float("nan")
    ordered = sorted(values)
    pos = (len(ordered) - 1) * q / 100
    lo = int(pos)
    hi = min(lo + 1, len(ordered) - 1)
    return ordered[lo] + (ordered[hi] - ordered[lo]) * (pos - lo)


def engine_rounds(model, tokenizer, sources: Sequence[Sequence[str]], concurrency: int, policy: str = "wait-k",
                  options: dict[str, Any] | None = None) -> dict[str, Any]:
    """The engine alone: `concurrency` sessions at a time on one slot engine, one word each per round, every
    round's steps batched per kind exactly as the scheduler batches them (serve.scheduler.run_round)."""
    from brisklm.core.text import TextLayer
    from brisklm.serve.policy import make_policy
    from brisklm.serve.scheduler import run_round
    from brisklm.serve.slots import EnginePool

    text = TextLayer.for_model(model, tokenizer)
    pool = EnginePool(model, text)
    options = {"k": K} if options is None and policy == "wait-k" else dict(options or {})
    word_ms: list[float] = []
    outputs: list[list[str]] = [[] for _ in sources]
    queue = list(range(len(sources)))
    live: dict[int, list] = {}  # session -> [policy, words sent, items]
    start = time.perf_counter()
    for _ in range(100_000):  # bounded
        while queue and len(live) < concurrency:
            i = queue.pop(0)
            live[i] = [make_policy(policy, model, text, engines=pool, **options), 0, []]
        if not live:
            break
        t0 = time.perf_counter()
        for i, entry in live.items():
            p, at = entry[0], entry[1]
            if at < len(sources[i]):
                p.push([sources[i][at]])
            elif at == len(sources[i]):
                p.push_end()
            entry[1] = at + 1
        for _ in range(10_000):
            if not any(entry[0].next_step() is not None for entry in live.values()):
                break
            results = {i: ([], None) for i in live}
            run_round([(i, entry[0]) for i, entry in live.items()], results)
            for i, (items, error) in results.items():
                if error is not None:
                    raise BriskError(f"engine baseline session {i} failed: {error['message']}")
                live[i][2] += items
            pool.compact()
        elapsed = (time.perf_counter() - t0) * 1000
        for i, entry in list(live.items()):
            if entry[1] <= len(sources[i]):
                word_ms.append(elapsed)  # this round answered one message of this session
            if entry[0].finished:
                outputs[i] = [item.text for item in entry[2] if item.kind == "word"]
                entry[0].release()
                del live[i]
    wall = time.perf_counter() - start
    return {"word_ms": word_ms, "wall_s": wall, "outputs": outputs}


class ServerProcess:
    """`brisk serve --port 0` in a subprocess; reads the port from its first line."""

    def __init__(self, *extra: str) -> None:
        env = {**os.environ, "OMP_NUM_THREADS": "1"}
        self.proc = subprocess.Popen([sys.executable, "-m", "brisklm.cli", "serve", "--port", "0",
                                      "--max-sessions", "256", *extra],
                                     stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env)
        deadline = time.monotonic() + 300
        line = ""
        while "http://" not in line:
            if self.proc.poll() is not None or time.monotonic() > deadline:
                self.close()
                raise BriskError(f"brisk serve did not start: {line.strip()}")
            line = self.proc.stdout.readline()
        self.url = line.split(" on ", 1)[1].split()[0].rstrip("/")
        self.ws_url = self.url.replace("http://", "ws://") + "/ws"

    def close(self) -> None:
        self.proc.terminate()
        try:
            self.proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            self.proc.kill()


async def _clients(ws_url: str, sources: Sequence[Sequence[str]], concurrency: int) -> dict[str, Any]:
    """`concurrency` closed-loop clients, each on one connection, taking sessions from a shared queue."""
    from websockets.asyncio.client import connect

    from brisklm.serve.client import run_session

    queue = list(range(len(sources)))
    outputs: list[list[str]] = [[] for _ in sources]
    word_ms: list[float] = []

    async def client() -> None:
        async with connect(ws_url, open_timeout=60, max_size=2**22) as ws:
            while queue:
                i = queue.pop(0)
                result = await run_session(ws, sources[i], timeout=120)
                if result.final is None or result.final["type"] != "done":
                    raise BriskError(f"session {i} failed: {result.final}")
                outputs[i] = result.final["words"]
                word_ms.extend(result.word_ms)

    start = time.perf_counter()
    await asyncio.gather(*[client() for _ in range(concurrency)])
    return {"word_ms": word_ms, "wall_s": time.perf_counter() - start, "outputs": outputs}


def _figures(server: dict[str, Any], engine: dict[str, Any], n: int) -> dict[str, Any]:
    s50, s99 = percentile(server["word_ms"], 50), percentile(server["word_ms"], 99)
    e50, e99 = percentile(engine["word_ms"], 50), percentile(engine["word_ms"], 99)
    return {"sessions": n, "server_sessions_per_s": round(n / server["wall_s"], 3),
            "engine_sessions_per_s": round(n / engine["wall_s"], 3),
            "throughput_ratio_server_vs_engine": round(engine["wall_s"] / server["wall_s"], 3),
            "server_word_ms_p50": round(s50, 3), "server_word_ms_p99": round(s99, 3),
            "engine_word_ms_p50": round(e50, 3), "engine_word_ms_p99": round(e99, 3),
            "added_word_ms_p50": round(s50 - e50, 3), "added_word_ms_p99": round(s99 - e99, 3)}


def measure(ctx: BenchContext, model_name: str, policy: str, options: dict[str, Any], pool, reference,
            server_args: Sequence[str]) -> dict[str, Any]:
    """Server vs engine alone at 1/10/50 sessions (medians of repeats), and the unbatched server at 50."""
    from brisklm.zoo.store import load

    loaded = load(model_name)
    repeats = 1 if ctx.quick else 3
    per_level = {1: 4, 10: 20, 50: 50} if ctx.quick else {1: 12, 10: 40, 50: 100}
    levels: dict[str, Any] = {}
    identical = True
    server = ServerProcess("--model", model_name, "--policy", policy, *server_args)
    try:
        for c in ctx.progress(CONCURRENCY, desc=f"serve bench {policy}"):
            sources = pool[:per_level[c]]
            runs = []
            for _ in range(repeats):
                engine = engine_rounds(loaded.model, loaded.tokenizer, sources, c, policy, options)
                served = asyncio.run(_clients(server.ws_url, sources, c))
                identical &= all(o == r.words for o, r in zip(served["outputs"], reference))
                identical &= all(o == r.words for o, r in zip(engine["outputs"], reference))
                runs.append(_figures(served, engine, len(sources)))
            levels[str(c)] = {key: statistics.median(r[key] for r in runs) for key in runs[0]}
    finally:
        server.close()
    unbatched = ServerProcess("--model", model_name, "--policy", policy, *server_args, "--no-batching")
    try:
        sources = pool[:per_level[50]]
        times = []
        for _ in range(repeats):
            served = asyncio.run(_clients(unbatched.ws_url, sources, 50))
            identical &= all(o == r.words for o, r in zip(served["outputs"], reference))
            times.append(served["wall_s"])
        unbatched_rate = len(sources) / statistics.median(times)
    finally:
        unbatched.close()
    batched_rate = levels["50"]["server_sessions_per_s"]
    return {
        "model": model_name, "repeats": repeats,
        "outputs_identical_to_offline": bool(identical),
        "concurrency": levels,
        "sessions_per_s": {c: levels[c]["server_sessions_per_s"] for c in levels},
        "added_word_ms_p50": {c: levels[c]["added_word_ms_p50"] for c in levels},
        "added_word_ms_p99": {c: levels[c]["added_word_ms_p99"] for c in levels},
        "unbatched_server_sessions_per_s_at_50": round(unbatched_rate, 3),
        "batching_speedup_at_50": round(batched_rate / unbatched_rate, 3),
    }


def bench(ctx: BenchContext) -> dict[str, Any]:
    import torch

    from brisklm.streaming.policies import gpe_wait_k
    from brisklm.streaming.proactive.heads import Head, adaptive_decode
    from brisklm.streaming.proactive_zoo import proactive_task
    from brisklm.tasks import get_task
    from brisklm.zoo.store import load

    torch.set_num_threads(1)
    most = 50 if ctx.quick else 100
    gpe = load("translate-gpe")
    pool = [e.meta["source_words"] for e in get_task("translation").examples("test", most, seed=ctx.seed)]
    reference = gpe_wait_k(gpe.model, gpe.tokenizer, pool, K).outputs
    wait_k = measure(ctx, "translate-gpe", "wait-k", {"k": K}, pool, reference, ["--k", str(K)])
    proactive = load("translate-proactive")
    head_pool = [e.meta["source_words"] for e in proactive_task().examples("test", most, seed=ctx.seed)]
    head_reference = adaptive_decode(proactive.model, proactive.tokenizer, head_pool, Head("entropy"),
                                     HEAD_THRESHOLD).outputs
    entropy = measure(ctx, "translate-proactive", "entropy", {"threshold": HEAD_THRESHOLD}, head_pool,
                      head_reference, ["--threshold", str(HEAD_THRESHOLD)])
    return {
        "policy": f"wait-k k={K}", **wait_k,
        "entropy_head": {"policy": f"entropy threshold={HEAD_THRESHOLD}", **entropy},
        "before_slots": {"added_word_ms_p99_at_50": 396.75, "added_word_ms_p50_at_50": 150.535,
                         "note": "wait-k with per-step cache stacking (serve/batching.py), 2026-11-27"},
        "note": ("closed-loop clients, one source word per message, latency = send -> ack; engine baseline = the "
                 "same sessions in lock-step rounds on one slot engine (the same batched calls) without the server; "
                 "loopback, server in a subprocess; the entropy head runs batched across sessions (slot policy). "
                 "The machine (2 cores) was shared with other jobs while measuring: absolute figures are noisy."),
    }
