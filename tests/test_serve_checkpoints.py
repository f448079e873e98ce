"""`brisk serve` on real-convention checkpoints (subword tokenizers, no BOS / no pad / several eos, chat
templates): text in, words with delays out, equal to offline wait-k; bad input; access control."""

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
from websockets.exceptions import InvalidStatus

from brisklm.core.text import TextLayer
from brisklm.errors import BriskError
from brisklm.serve.access import check_exposure, is_loopback
from brisklm.serve.app import create_app
from brisklm.serve.client import connect_options, recv_frame, run_session, translate_over_ws
from brisklm.serve.server import BackgroundServer
from brisklm.serve.sessions import Limits
from brisklm.streaming.policies import gpe_wait_k

T = 60
SOURCES = [["the", "cat", "sat", "on", "mats"], ["we", "read", "books", "today"], ["green", "hills", "roll"]]


def run(coro):
    return asyncio.run(asyncio.wait_for(coro, 3 * T))


def loaded(fixture_checkpoints, style):
    from brisklm.zoo.store import load

    torch.set_num_threads(1)
    got = load(str(fixture_checkpoints(style)))
    return got.model, TextLayer.for_model(got.model, got.tokenizer)


def http(url, token=None, origin=None, method="GET", body=None):
    request = urllib.request.Request(url, data=body, method=method)
    if token:
        request.add_header("Authorization", f"Bearer {token}")
    if origin:
        request.add_header("Origin", origin)
    try:
        with urllib.request.urlopen(request, timeout=T) as response:
            return response.status, json.loads(response.read())
    except urllib.error.HTTPError as error:
        return error.code, json.loads(error.read() or b"null")


def chunks_of(words, size=3):
    """The words as raw text cut every `size` characters (words split across messages)."""
    text = " ".join(words)
    return [text[i:i + size] for i in range(0, len(text), size)]


async def text_session(url, words, **options):
    async with connect(url, open_timeout=T, **options) as ws:
        for piece in chunks_of(words):
            await ws.send(json.dumps({"type": "text", "text": piece}))
        await ws.send(json.dumps({"type": "end"}))
        frames = []
        while True:
            frames.append(await recv_frame(ws, T))
            if frames[-1]["type"] in ("done", "error"):
                return frames


@pytest.mark.parametrize("style", ["qwen2", "qwen3", "llama3", "mistral", "gemma2", "gemma3", "phi3"])
def test_fixture_sessions_equal_offline_wait_k(fixture_checkpoints, style):
    """Concurrent sessions (words, several words per message, raw text chunks that split words) on one batched
    engine give the words and delays of offline wait-k, through the chat-template framing."""
    model, text = loaded(fixture_checkpoints, style)
    offline = gpe_wait_k(model, text, SOURCES, 2).outputs
    assert all(len(o.words) >= 2 for o in offline), "the fixture writes (next to) nothing: the check would be empty"
    app = create_app(model, text, options={"k": 2}, limits=Limits(max_source_words=20))
    with BackgroundServer(app) as srv:
        async def main():
            return await asyncio.gather(
                translate_over_ws(srv.ws_url, SOURCES[0], per_message=1, timeout=T),
                translate_over_ws(srv.ws_url, SOURCES[1], per_message=2, timeout=T),
                text_session(srv.ws_url, SOURCES[2]))

        first, second, chunked = run(main())
        health = http(srv.url + "/health")[1]
    for result, out in ((first, offline[0]), (second, offline[1])):
        assert result.final["type"] == "done", result.final
        assert (result.final["words"], result.final["delays"]) == (out.words, out.delays)
        assert (result.words, result.delays) == (out.words, out.delays)
    assert chunked[-1]["type"] == "done", chunked[-1]
    assert (chunked[-1]["words"], chunked[-1]["delays"]) == (offline[2].words, offline[2].delays)
    assert chunked[-1]["source_words"] == len(SOURCES[2])
    assert health["mean_batch"] > 1, "the sessions were not batched"


HEAD_SOURCES = [*SOURCES, ["the", "quick", "brown", "fox", "jumps", "over"]]


@pytest.mark.parametrize("head, threshold", [("entropy", 4.0), ("attention", 0.3), ("probe", 0.5)])
def test_heads_on_a_subword_checkpoint_equal_head_decode(fixture_checkpoints, tmp_path, head, threshold):
    """Concurrent head sessions on one batched engine give head_decode's words and delays: the head decides at
    word starts only, a token continuing the open word is always written, word j waits for j source words.
    The probe is a random linear probe stored beside a copy of the checkpoint (its weights do not matter here)."""
    import shutil

    from brisklm.serve.method_policies import served_head
    from brisklm.streaming.proactive.heads import LinearProbe, save_probe
    from brisklm.streaming.proactive.subword import head_decode

    folder = tmp_path / "qwen2"
    shutil.copytree(fixture_checkpoints("qwen2"), folder)
    if head == "probe":
        torch.manual_seed(0)
        save_probe(LinearProbe(64), folder)
    model, text = loaded(lambda style: folder, "qwen2")
    expected = head_decode(model, text, HEAD_SOURCES, served_head(head, model), threshold, max_words=6).outputs
    assert sum(len(o.words) for o in expected) > 4, "the fixture writes (next to) nothing: the check would be empty"
    assert any(d > 1 for o in expected for d in o.delays), "no READ decision: the head's rule would go untested"
    app = create_app(model, text, policy=head, options={"threshold": threshold, "max_words": 6},
                     limits=Limits(max_source_words=20))
    with BackgroundServer(app) as srv:
        async def main():
            return await asyncio.gather(*[translate_over_ws(srv.ws_url, s, per_message=1 + i % 2, timeout=T)
                                          for i, s in enumerate(HEAD_SOURCES)])

        results = run(main())
        health = http(srv.url + "/health")[1]
    for result, out in zip(results, expected):
        assert result.final["type"] == "done", result.final
        assert (result.words, result.delays) == (out.words, out.delays)
        assert (result.final["words"], result.final["delays"]) == (out.words, out.delays)
    assert health["mean_batch"] > 1, "the sessions were not batched"


def test_bad_input_gets_one_error_frame_and_spares_other_sessions(fixture_checkpoints):
    model, text = loaded(fixture_checkpoints, "mistral")
    clean = SOURCES[0]
    offline = gpe_wait_k(model, text, [clean], 3).outputs[0]
    app = create_app(model, text, options={"k": 3}, limits=Limits(max_source_words=20))
    with BackgroundServer(app) as srv:
        async def reply(ws):  # the next frame that answers a message ('ack' frames may come at any time)
            while (frame := await recv_frame(ws, T))["type"] == "ack":
                pass
            return frame

        async def bad_ones():
            errors = []
            async with connect(srv.ws_url, open_timeout=T) as ws:
                await ws.send(json.dumps({"type": "start", "policy": "no-such-policy"}))
                errors.append(await reply(ws))
                await ws.send(json.dumps({"type": "start", "policy": "wait-k", "options": {"k": 3}}))
                assert (await reply(ws))["type"] == "ready"
                await ws.send(json.dumps({"type": "end"}))  # nothing sent: an empty source
                errors.append(await reply(ws))
                await ws.send(json.dumps({"type": "words", "words": ["the", "日本語"]}))  # not encodable
                errors.append(await reply(ws))
                result = await run_session(ws, ["cat", "sat"], timeout=T)  # the same session carries on
            return errors, result

        async def main():
            return await asyncio.gather(bad_ones(), translate_over_ws(srv.ws_url, clean, timeout=T))

        (errors, after), good = run(main())
    assert [e["code"] for e in errors] == ["bad_options", "empty_source", "unknown_word"]
    assert all(e["type"] == "error" and e["message"] for e in errors)
    assert "no-such-policy" in errors[0]["message"] and "日本語" in errors[2]["message"]
    assert after.final["type"] == "done" and after.final["source_words"] == 2
    assert (good.final["words"], good.final["delays"]) == (offline.words, offline.delays)


def test_token_and_origin_are_enforced_and_a_clean_session_carries_on(fixture_checkpoints):
    model, text = loaded(fixture_checkpoints, "qwen2")
    offline = gpe_wait_k(model, text, [SOURCES[1]], 2).outputs[0]
    app = create_app(model, text, options={"k": 2}, token="s3cret", allow_origins=["https://ok.example"])
    with BackgroundServer(app) as srv:
        assert http(srv.url + "/health")[0] == 401
        assert http(srv.url + "/health", token="wrong")[0] == 401
        assert http(srv.url + "/health", token="s3cret")[0] == 200
        status, body = http(srv.url + "/api/translate", token="s3cret", origin="https://evil.example",
                            method="POST", body=b'{"text": "we read"}')
        assert status == 403 and body["code"] == "forbidden"
        with urllib.request.urlopen(srv.url + "/", timeout=T) as page:  # the page itself holds no data
            assert page.status == 200

        async def refused(**options):
            with pytest.raises(InvalidStatus) as info:
                async with connect(srv.ws_url, open_timeout=T, **options):
                    pass
            return info.value.response.status_code

        async def main():
            codes = [await refused(), await refused(**connect_options("wrong")),
                     await refused(**connect_options("s3cret", origin="https://evil.example"))]
            good = await translate_over_ws(srv.ws_url, SOURCES[1], token="s3cret", timeout=T)
            allowed = await translate_over_ws(srv.ws_url, SOURCES[1], token="s3cret", origin="https://ok.example",
                                              timeout=T)
            same_host = await translate_over_ws(srv.ws_url, SOURCES[1], token="s3cret", timeout=T,
                                                origin=f"http://127.0.0.1:{srv.port}")
            async with connect(srv.ws_url + "?access_token=s3cret", open_timeout=T) as ws:  # browsers
                browser = await run_session(ws, SOURCES[1], timeout=T)
            return codes, [good, allowed, same_host, browser]

        codes, sessions = run(main())
        health = http(srv.url + "/health", token="s3cret")[1]
    assert codes == [403, 403, 403]
    for result in sessions:
        assert (result.final["words"], result.final["delays"]) == (offline.words, offline.delays)
    assert health["sessions"] == 0 and health["sessions_completed"] == 4


def test_exposure_needs_a_token():
    assert is_loopback("127.0.0.1") and is_loopback("::1") and is_loopback("localhost")
    assert not is_loopback("0.0.0.0") and not is_loopback("192.168.1.4")
    check_exposure("127.0.0.1", None)
    check_exposure("0.0.0.0", "t")
    with pytest.raises(BriskError, match="--token"):
        check_exposure("0.0.0.0", None)


def test_brisk_serve_cli_and_client_print_words_with_delays(fixture_checkpoints, capsys, monkeypatch):
    """`brisk serve --model F` in a subprocess (token from the environment), the client prints words + delays."""
    from brisklm.cli import main
    from brisklm.serve.client import main as client_main

    path = fixture_checkpoints("llama3")
    monkeypatch.delenv("BRISK_SERVE_TOKEN", raising=False)
    assert main(["serve", "--model", str(path), "--host", "0.0.0.0", "--port", "0"]) == 2
    assert "brisk: error: --host 0.0.0.0" in capsys.readouterr().err
    env = {**os.environ, "OMP_NUM_THREADS": "1", "BRISK_SERVE_TOKEN": "t0k"}
    proc = subprocess.Popen([sys.executable, "-m", "brisklm.cli", "serve", "--model", str(path), "--port", "0",
                             "--k", "2"], stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env)
    try:
        deadline, line = time.monotonic() + 120, ""
        while "http://" not in line:
            assert proc.poll() is None and time.monotonic() < deadline, line
            line = proc.stdout.readline()
        assert "bearer token required" in line
        url = line.split(" on ", 1)[1].split()[0].rstrip("/").replace("http://", "ws://") + "/ws"
        assert client_main(["--url", url, "--text", " ".join(SOURCES[0])]) == 1  # no token: refused
        monkeypatch.setenv("BRISK_SERVE_TOKEN", "t0k")
        capsys.readouterr()
        assert client_main(["--url", url, "--text", " ".join(SOURCES[0])]) == 0
    finally:
        proc.terminate()
        proc.wait(timeout=30)
    lines = capsys.readouterr().out.splitlines()
    assert lines and all("\tdelay=" in row for row in lines)
    delays = [int(row.split("delay=")[1].split()[0]) for row in lines]
    assert delays == sorted(delays) and delays[0] >= 2
