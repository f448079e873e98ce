"""The serving section of the demo report: a live loopback run of `brisk serve` with concurrent sessions."""

from __future__ import annotations

import asyncio
import html
import json
import time
import urllib.request

from brisklm.core.timing import one_torch_thread
from brisklm.eval.report import DemoContext, MethodRow, Section, table_html


def demo_sections(ctx: DemoContext) -> list[Section]:
    from brisklm.serve.app import create_app
    from brisklm.serve.client import translate_over_ws
    from brisklm.serve.server import BackgroundServer
    from brisklm.streaming.policies import gpe_wait_k
    from brisklm.tasks import get_task
    from brisklm.zoo.store import load

    with one_torch_thread():
        loaded = load("translate-gpe")
        n = 10 if ctx.quick else 30
        sources = [e.meta["source_words"] for e in get_task("translation").examples("test", n, seed=ctx.seed)]
        offline = gpe_wait_k(loaded.model, loaded.tokenizer, sources, 3).outputs
        with BackgroundServer(create_app(loaded.model, loaded.tokenizer, options={"k": 3},
                                         model_name="translate-gpe")) as srv:
            async def clients():
                return await asyncio.gather(*[translate_over_ws(srv.ws_url, s, timeout=120) for s in sources])

            start = time.perf_counter()
            results = asyncio.run(clients())
            wall = time.perf_counter() - start
            with urllib.request.urlopen(srv.url + "/health", timeout=30) as response:
                health = json.loads(response.read())
    same = sum(r.words == o.words and r.delays == o.delays for r, o in zip(results, offline))
    first = results[0]
    rows = [{"frame": f["type"], "target word": f.get("word", ""), "source words read (delay)": f.get("delay", ""),
             "server latency (ms)": f.get("latency_ms", "")} for f in first.frames if f["type"] in ("word", "done")]
    summary = [{"concurrent sessions": n, "wall (s)": round(wall, 2), "sessions/s": round(n / wall, 2),
                "identical to offline gpe_wait_k": f"{same}/{n}", "engine calls": health["engine_calls"],
                "mean sessions per engine call": health["mean_batch"]}]
    intro = ("<p><code>brisk serve</code> streams source words in over a WebSocket and sends each target word "
             "back as soon as the policy writes it, with its delay. Concurrent sessions share batched engine "
             "calls. Below: " f"{n} clients on loopback, one word per message (in-process server). "
             "Start it with <code>brisk serve --model translate-gpe --k 3</code> and open "
             "<code>http://127.0.0.1:8000/</code> for the live page.</p>")
    transcript = f"<p>Session 1 source: <code>{html.escape(' '.join(sources[0]))}</code></p>" + table_html(rows)
    methods = [MethodRow(f"brisk serve, {n} concurrent wait-3 sessions", "translate-gpe",
                         f"{same}/{n} streams identical to offline GPE wait-3", None,
                         "one session at a time", "brisk bench serve")]
    return [Section("Serving streams (brisk serve)", intro + table_html(summary) + transcript, methods)]
