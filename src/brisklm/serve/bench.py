"""`brisk bench serve`: sessions/s and per-word latency of `brisk serve` on loopback vs the engine alone.

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


def percentile(values: Sequence[float], q: float) -> float:
    """The q-th percentile (0..100) by linear interpolation."""
    if not values:
        return float("nan")
    ordered = sorted(values)
    pos = (len(ordered) - 1) * q / 100
    lo = int(pos)
    hi = min(lo + 1, len(ordered) - 1)
    return ordered[lo] + (ordered[hi] - ordered[lo]) * (pos - lo)


def engine_rounds(model, tokenizer, sources: Sequence[Sequence[str]], concurrency: int) -> dict[str, Any]:
    """The engine alone: `concurrency` sessions at a time, one word each per round, steps batched per kind."""
    from brisklm.serve.batching import run_batched
    from brisklm.serve.policy import CLOSE, READ, WRITE, GpeWaitKPolicy

    word_ms: list[float] = []
    outputs: list[list[str]] = [[] for _ in sources]
    queue = list(range(len(sources)))
    live: dict[int, tuple[GpeWaitKPolicy, int]] = {}
    start = time.perf_counter()
    for _ in range(100_000):  # bounded
        while queue and len(live) < concurrency:
            i = queue.pop(0)
            live[i] = (GpeWaitKPolicy(model, tokenizer, K), 0)
        if not live:
            break
        t0 = time.perf_counter()
        for i, (policy, at) in list(live.items()):
            if at < len(sources[i]):
                policy.push([sources[i][at]])
            else:
                policy.push_end()
            live[i] = (policy, at + 1)
        for _ in range(10_000):
            progressed = False
            for phase in (READ, CLOSE, WRITE, "finish"):
                group = [(i, p, st) for i, (p, _) in live.items() if (st := p.next_step()) is not None and st.kind == phase]
                if not group:
                    continue
                progressed = True
                if phase == "finish":
                    for i, p, st in group:
                        p.apply_step(st)
                    continue
                written = run_batched(phase, [p.engine for _, p, _ in group], [st.words for _, _, st in group])
                for (i, p, st), word in zip(group, written):
                    p.apply_step(st, word)
            if not progressed:
                break
        elapsed = (time.perf_counter() - t0) * 1000
        for i, (policy, at) in list(live.items()):
            if at <= len(sources[i]):
                word_ms.append(elapsed)  # this round answered one message of this session
            if policy.finished:
                outputs[i] = list(policy.engine.outputs[0].words)
                del live[i]
    wall = time.perf_counter() - start
    return {"word_ms": word_ms, "wall_s": wall, "outputs": outputs}


class ServerProcess:
    """`brisk serve --port 0` in a subprocess; reads the port from its first line."""

    def __init__(self, *extra: str) -> None:
        env = {**os.environ, "OMP_NUM_THREADS": "1"}
        self.proc = subprocess.Popen([sys.executable, "-m", "brisklm.cli", "serve", "--port", "0", "--k", str(K),
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


def bench(ctx: BenchContext) -> dict[str, Any]:
    import torch

    from brisklm.streaming.policies import gpe_wait_k
    from brisklm.tasks import get_task
    from brisklm.zoo.store import load

    torch.set_num_threads(1)
    repeats = 1 if ctx.quick else 3
    per_level = {1: 4, 10: 20, 50: 50} if ctx.quick else {1: 12, 10: 40, 50: 100}
    loaded = load("translate-gpe")
    pool = [e.meta["source_words"] for e in get_task("translation").examples("test", max(per_level.values()), seed=ctx.seed)]
    reference = gpe_wait_k(loaded.model, loaded.tokenizer, pool, K).outputs
    levels: dict[str, Any] = {}
    identical = True
    server = ServerProcess()
    try:
        for c in ctx.progress(CONCURRENCY, desc="serve bench"):
            sources = pool[:per_level[c]]
            runs = []
            for _ in range(repeats):
                engine = engine_rounds(loaded.model, loaded.tokenizer, sources, c)
                served = asyncio.run(_clients(server.ws_url, sources, c))
                identical &= all(o == r.words for o, r in zip(served["outputs"], reference))
                identical &= all(o == r.words for o, r in zip(engine["outputs"], reference))
                runs.append(_figures(served, engine, len(sources)))
            levels[str(c)] = {key: statistics.median(r[key] for r in runs) for key in runs[0]}
    finally:
        server.close()
    unbatched = ServerProcess("--no-batching")
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
        "policy": f"wait-k k={K}", "model": "translate-gpe", "repeats": repeats,
        "outputs_identical_to_offline": bool(identical),
        "concurrency": levels,
        "sessions_per_s": {c: levels[c]["server_sessions_per_s"] for c in levels},
        "added_word_ms_p50": {c: levels[c]["added_word_ms_p50"] for c in levels},
        "added_word_ms_p99": {c: levels[c]["added_word_ms_p99"] for c in levels},
        "unbatched_server_sessions_per_s_at_50": round(unbatched_rate, 3),
        "batching_speedup_at_50": round(batched_rate / unbatched_rate, 3),
        "note": ("closed-loop clients, one source word per message, latency = send -> ack; engine baseline = the "
                 "same sessions in lock-step batched rounds without the server; loopback, server in a subprocess"),
    }
