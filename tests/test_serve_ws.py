"""`brisk serve` over loopback with a real WebSocket client: exact outputs, isolation, limits, HTTP parts."""

import asyncio
import json
import os
import subprocess
import sys
import time
import urllib.error
import urllib.request

import pytest
import torch
from websockets.asyncio.client import connect

from brisklm.serve.app import create_app
from brisklm.serve.client import recv_frame, run_session, translate_over_ws
from brisklm.serve.policy import GpeWaitKPolicy, register_policy
from brisklm.serve.server import BackgroundServer
from brisklm.serve.sessions import Limits
from brisklm.streaming.policies import gpe_wait_k
from brisklm.tasks import get_task

T = 60  # seconds: every wait on the server is bounded


@pytest.fixture(scope="module")
def gpe():
    from brisklm.zoo.store import load

    torch.set_num_threads(1)
    loaded = load("translate-gpe")
    return loaded.model, loaded.tokenizer


@pytest.fixture(scope="module")
def server(gpe):
    model, tok = gpe
    app = create_app(model, tok, options={"k": 3}, limits=Limits(max_sessions=64, max_source_words=40,
                                                                   max_message_bytes=2048), model_name="translate-gpe")
    with BackgroundServer(app, max_message_bytes=2048) as srv:
        yield srv


def sources(n, seed):
    return [e.meta["source_words"] for e in get_task("translation").examples("test", n, seed=seed)]


def get_json(url):
    with urllib.request.urlopen(url, timeout=T) as response:
        return json.loads(response.read())


def wait_for_sessions(srv, n, timeout=T):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        health = get_json(srv.url + "/health")
        if health["sessions"] == n:
            return health
        time.sleep(0.05)
    raise AssertionError(f"server still holds {health['sessions']} sessions, expected {n}")


def run(coro):
    return asyncio.run(asyncio.wait_for(coro, 3 * T))


def test_fifty_concurrent_sessions_match_offline_engine(gpe, server):
    model, tok = gpe
    srcs = sources(50, seed=7)
    offline = gpe_wait_k(model, tok, srcs, 3).outputs
    before = get_json(server.url + "/health")

    async def main():
        return await asyncio.gather(*[translate_over_ws(server.ws_url, s, per_message=1 + i % 3, timeout=T)
                                      for i, s in enumerate(srcs)])

    results = run(main())
    for src, out, res in zip(srcs, offline, results):
        assert res.final["type"] == "done", res.final
        assert res.words == out.words and res.delays == out.delays
        assert res.final["words"] == out.words and res.final["source_words"] == len(src)
        assert all(f["latency_ms"] >= 0 for f in res.frames if f["type"] == "word")
    health = wait_for_sessions(server, 0)
    assert health["sessions_completed"] - before["sessions_completed"] == 50
    assert health["mean_batch"] > 1.0  # concurrent sessions shared engine calls


def test_disconnect_mid_stream_frees_session_and_spares_others(gpe, server):
    model, tok = gpe
    srcs = sources(3, seed=8)
    offline = gpe_wait_k(model, tok, srcs[1:], 3).outputs
    wait_for_sessions(server, 0)

    async def quitter():
        async with connect(server.ws_url) as ws:
            await ws.send(json.dumps({"type": "words", "words": srcs[0][:5]}))
            while (await recv_frame(ws, T))["type"] != "ack":
                pass
            assert get_json(server.url + "/health")["sessions"] >= 1
        # leaving without 'end'

    async def main():
        return await asyncio.gather(quitter(), *[translate_over_ws(server.ws_url, s, timeout=T) for s in srcs[1:]])

    _, *results = run(main())
    for out, res in zip(offline, results):
        assert res.words == out.words and res.delays == out.delays
    wait_for_sessions(server, 0)


def test_bad_messages_get_error_frames_and_the_session_goes_on(gpe, server):
    model, tok = gpe
    src = sources(1, seed=9)[0]
    offline = gpe_wait_k(model, tok, [src], 3).outputs[0]

    async def main():
        async with connect(server.ws_url, max_size=2**22) as ws:
            frames = []

            async def send_expect(raw, code):
                await ws.send(raw)
                frame = await recv_frame(ws, T)
                while frame["type"] in ("ready", "ack"):
                    frame = await recv_frame(ws, T)
                frames.append(frame)
                assert frame["type"] == "error" and frame["code"] == code and not frame["fatal"], frame
                assert frame["message"]

            await ws.send(json.dumps({"type": "words", "words": src[:2]}))
            await send_expect("{not json", "malformed")
            await send_expect(json.dumps({"type": "words", "words": [1, 2]}), "malformed")
            await send_expect(json.dumps({"type": "words", "words": ["zzzunknown", src[2]]}), "unknown_word")
            await send_expect(json.dumps({"type": "words", "text": "x " * 1500}), "oversized")
            await send_expect(json.dumps({"type": "words", "text": "x " * 100_000}), "oversized")  # 200 KB
            await send_expect(json.dumps({"type": "words", "words": [src[0]] * 39}), "oversized")  # > 40 words
            await send_expect(json.dumps({"type": "start"}), "bad_state")
            assert "zzzunknown" in frames[2]["message"]
            rest = await run_session(ws, src[2:], timeout=T)
            assert rest.final["type"] == "done"
            assert rest.final["words"] == offline.words and rest.final["delays"] == offline.delays
            await ws.send(json.dumps({"type": "end"}))  # no session open any more
            frame = await recv_frame(ws, T)
            assert frame["type"] == "error" and frame["code"] == "bad_state"
            again = await run_session(ws, src, timeout=T)  # the same connection can stream another session
            assert again.words == offline.words

    async def both():  # a clean session runs alongside the misbehaving one and is not affected
        other_src = sources(1, seed=14)[0]
        _, clean = await asyncio.gather(main(), translate_over_ws(server.ws_url, other_src, timeout=T))
        assert clean.words == gpe_wait_k(model, tok, [other_src], 3).outputs[0].words

    run(both())
    assert get_json(server.url + "/health")["status"] == "ok"
    wait_for_sessions(server, 0)


def test_too_many_sessions_is_refused_cleanly(gpe):
    model, tok = gpe
    srcs = sources(2, seed=11)
    offline = gpe_wait_k(model, tok, srcs, 2).outputs
    app = create_app(model, tok, options={"k": 2}, limits=Limits(max_sessions=2))
    with BackgroundServer(app) as srv:
        async def main():
            holders = [await connect(srv.ws_url) for _ in range(2)]
            for ws, src in zip(holders, srcs):
                await ws.send(json.dumps({"type": "words", "words": src[:1]}))
                assert (await recv_frame(ws, T))["type"] == "ready"
            async with connect(srv.ws_url) as extra:
                await extra.send(json.dumps({"type": "words", "words": srcs[0][:1]}))
                frame = await recv_frame(extra, T)
                assert frame["type"] == "error" and frame["code"] == "too_many_sessions" and frame["fatal"]
                with pytest.raises(Exception):
                    await recv_frame(extra, T)  # closed by the server (1013)
                assert extra.close_code == 1013
            outs = []
            for ws, src in zip(holders, srcs):
                outs.append(await run_session(ws, src[1:], timeout=T))
                await ws.close()
            return outs

        results = run(main())
        for out, res in zip(offline, results):
            assert res.final["words"] == out.words and res.final["delays"] == out.delays
        wait_for_sessions(srv, 0)


def test_time_and_memory_limits_end_only_the_offending_session(gpe):
    model, tok = gpe
    src = sources(1, seed=12)[0]
    with BackgroundServer(create_app(model, tok, options={"k": 3}, limits=Limits(max_memory_bytes=20_000))) as srv:
        async def memory():
            res = await translate_over_ws(srv.ws_url, src, timeout=T)
            assert res.final["type"] == "error" and res.final["code"] == "memory_limit" and res.final["fatal"]
        run(memory())
        wait_for_sessions(srv, 0)
    with BackgroundServer(create_app(model, tok, options={"k": 3}, limits=Limits(max_session_seconds=3.0))) as srv:
        async def silent():  # sends two words, then nothing: the watchdog must end it
            async with connect(srv.ws_url) as ws:
                await ws.send(json.dumps({"type": "words", "words": src[:2]}))
                for _ in range(10):
                    frame = await recv_frame(ws, T)
                    if frame["type"] == "error":
                        return frame

        async def main():
            return await asyncio.gather(silent(), translate_over_ws(srv.ws_url, src[:4], timeout=T))

        error, other = run(main())
        assert error["code"] == "time_limit" and error["fatal"]
        assert other.final["words"] == gpe_wait_k(model, tok, [src[:4]], 3).outputs[0].words
        wait_for_sessions(srv, 0)


class OnlyMinimalProtocol:
    """A policy with just on_words/on_end (how heads/thinker plug in): the server must run it unbatched."""

    name = "minimal"

    def __init__(self, model, tokenizer, k=3):
        self.inner = GpeWaitKPolicy(model, tokenizer, k)

    def check_words(self, words):
        self.inner.check_words(words)

    def on_words(self, words):
        return self.inner.on_words(words)

    def on_end(self):
        return self.inner.on_end()

    def memory_bytes(self):
        return self.inner.memory_bytes()


def test_plugged_in_policy_and_http_endpoints(gpe, server):
    model, tok = gpe
    register_policy("minimal-test", lambda m, t, **o: OnlyMinimalProtocol(m, t, **o))
    src = sources(1, seed=13)[0]
    offline = gpe_wait_k(model, tok, [src], 2).outputs[0]
    res = run(translate_over_ws(server.ws_url, src, start={"policy": "minimal-test", "options": {"k": 2}}, timeout=T))
    assert res.final["words"] == offline.words and res.final["delays"] == offline.delays
    bad = run(translate_over_ws(server.ws_url, src, start={"policy": "nope"}, timeout=5, closed_loop=False))
    assert bad.errors and bad.errors[0]["code"] == "bad_options"

    health = get_json(server.url + "/health")
    assert health["status"] == "ok" and health["policy"] == "wait-k" and health["max_sessions"] == 64
    spec = get_json(server.url + "/openapi.json")
    assert spec["openapi"].startswith("3.") and {"/health", "/api/translate"} <= set(spec["paths"])
    request = urllib.request.Request(server.url + "/api/translate", data=json.dumps({"text": " ".join(src)}).encode(),
                                     headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(request, timeout=T) as response:
        done = json.loads(response.read())
    assert done["words"] == gpe_wait_k(model, tok, [src], 3).outputs[0].words
    request = urllib.request.Request(server.url + "/api/translate", data=b'{"text": "zzzunknown"}')
    with pytest.raises(urllib.error.HTTPError) as info:
        urllib.request.urlopen(request, timeout=T)
    assert info.value.code == 400 and json.loads(info.value.read())["code"] == "unknown_word"
    page = urllib.request.urlopen(server.url + "/", timeout=T).read().decode()
    assert "<title>brisklm" in page and "/static/app.js" in page


def test_cli_serves_and_reports_its_port(tmp_path):
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.Popen([sys.executable, "-m", "brisklm.cli", "serve", "--port", "0", "--k", "2"],
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env)
    try:
        deadline = time.monotonic() + 120
        line = ""
        while "http://" not in line:
            assert time.monotonic() < deadline and proc.poll() is None, f"brisk serve did not start: {line}"
            line = proc.stdout.readline()
        url = line.split("on ", 1)[1].split()[0].rstrip("/")
        health = None
        for _ in range(100):
            try:
                health = get_json(url + "/health")
                break
            except OSError:
                time.sleep(0.1)
        assert health is not None and health["options"]["k"] == 2
    finally:
        proc.terminate()
        proc.wait(timeout=30)
