"""`brisk serve` with the streaming methods' policies (decision heads, StreamingThinker) over a real WebSocket."""

import argparse
import asyncio
import json

import pytest
import torch
from websockets.asyncio.client import connect

from brisklm.errors import BriskError
from brisklm.serve.app import create_app
from brisklm.serve.client import recv_frame, translate_over_ws
from brisklm.serve.server import BackgroundServer
from brisklm.serve.sessions import Limits
from brisklm.streaming.proactive.heads import adaptive_decode, live_decode
from brisklm.streaming.proactive_zoo import proactive_task
from brisklm.serve.method_policies import served_head
from test_serve_ws import get_json, run, wait_for_sessions

T = 60  # seconds: every wait on the server is bounded


@pytest.fixture(scope="module")
def proactive():
    from brisklm.zoo.store import load

    torch.set_num_threads(1)
    loaded = load("translate-proactive")
    return loaded.model, loaded.tokenizer


@pytest.fixture(scope="module")
def thinker():
    from brisklm.zoo.store import load

    torch.set_num_threads(1)
    loaded = load("streaming-thinker")
    return loaded.model, loaded.tokenizer


def head_sources(n, seed):
    return [e.meta["source_words"] for e in proactive_task().examples("test", n, seed=seed)]


def test_head_policies_over_ws_match_offline_decoders(proactive):
    model, tok = proactive
    cases = [("entropy", 0.5), ("entropy", 1.5), ("attention", 0.3), ("probe", None), ("probe", 0.8), ("probe", 0.3)]
    srcs = head_sources(len(cases), seed=21)
    app = create_app(model, tok, policy="probe", options={"threshold": 0.5}, limits=Limits(max_source_words=60),
                     model_name="translate-proactive")
    with BackgroundServer(app) as srv:
        async def main():
            return await asyncio.gather(*[
                translate_over_ws(srv.ws_url, src, per_message=1 + i % 3, timeout=T,
                                  start={"policy": name, "options": {} if thr is None else {"threshold": thr}})
                for i, ((name, thr), src) in enumerate(zip(cases, srcs))])

        results = run(main())
        seen = set()
        for (name, thr), src, res in zip(cases, srcs, results):
            threshold = 0.5 if thr is None else thr  # the server's default options for its default policy
            head = served_head(name, model)
            offline = live_decode(model, tok, src, head, threshold)
            batched = adaptive_decode(model, tok, [src], head, threshold).outputs[0]
            assert res.final["type"] == "done", res.final
            assert res.words == offline.words and res.delays == offline.delays, (name, thr)
            assert res.words == batched.words and res.delays == batched.delays
            assert res.final["words"] == offline.words and res.final["source_words"] == len(src)
            assert all(f["latency_ms"] >= 0 for f in res.frames if f["type"] == "word")
            ready = next(f for f in res.frames if f["type"] == "ready")
            assert ready["policy"] == name
            seen.add((tuple(res.delays), tuple(res.words)))
        assert len(seen) > 2  # the heads and thresholds really decode differently: the comparison can fail
        wait_for_sessions(srv, 0)


def test_head_policy_options_and_cli_errors(proactive, capsys):
    model, tok = proactive
    src = head_sources(1, seed=22)[0]
    with BackgroundServer(create_app(model, tok, policy="entropy", options={"threshold": 0.5})) as srv:
        for options, fragment in (({"threshold": "high"}, "threshold must be a number"),
                                  ({"k": 3}, "takes options threshold"),
                                  ({"min_lag": 0}, "min_lag must be an integer >= 1")):
            res = run(translate_over_ws(srv.ws_url, src, start={"policy": "entropy", "options": options}, timeout=T))
            assert res.errors and res.errors[0]["code"] == "bad_options" and fragment in res.errors[0]["message"]
        res = run(translate_over_ws(srv.ws_url, src, start={"policy": "attention", "options": {"threshold": 0.25}},
                                    timeout=T))
        assert res.words == live_decode(model, tok, src, served_head("attention", model), 0.25).words
        wait_for_sessions(srv, 0)

    from brisklm.serve.cli import add_commands

    parser = argparse.ArgumentParser()
    add_commands(parser.add_subparsers())
    args = parser.parse_args(["serve", "--policy", "nope"])
    with pytest.raises(BriskError, match="unknown --policy 'nope': choose one of") as info:
        args.func(args)
    assert all(name in str(info.value) for name in ("wait-k", "entropy", "attention", "probe", "thinker"))
    args = parser.parse_args(["serve", "--model", "translate-gpe", "--policy", "probe", "--threshold", "0.5"])
    with pytest.raises(BriskError, match="no decision probe"):  # translate-gpe was trained without one
        args.func(args)


def test_thinker_policy_over_ws_matches_thinker_session(thinker):
    from brisklm.streaming.thinker.data import thinker_task
    from brisklm.streaming.thinker.session import ThinkerSession

    model, tok = thinker
    examples = thinker_task().examples("test", 3, seed=5)
    app = create_app(model, tok, policy="thinker", limits=Limits(max_source_words=80), model_name="streaming-thinker")
    with BackgroundServer(app) as srv:
        depths = ("D2", "D1", "D3")

        async def main():
            return await asyncio.gather(*[
                translate_over_ws(srv.ws_url, " ".join(e.meta["segments"]).split(), per_message=1 + 2 * i, timeout=T,
                                  start={"policy": "thinker", "options": {"depth": depth}})
                for i, (e, depth) in enumerate(zip(examples, depths))])

        results = run(main())
        for e, depth, res in zip(examples, depths, results):
            session = ThinkerSession(model, tok, depth)
            units = session.read_question(e.meta["question"])
            delays = [len(e.meta["question"].split())]
            for fact in e.meta["facts"]:
                units += session.read_fact(fact)
                delays.append(delays[-1] + len(fact.split()))
            final, answer = session.finish()
            assert res.final["type"] == "done", res.final
            reasons = [f for f in res.frames if f["type"] == "reason"]
            assert [f["text"] for f in reasons if not f.get("final")] == units
            assert [f["delay"] for f in reasons if not f.get("final")] == delays  # each unit once its fact is in
            assert reasons[-1]["final"] and reasons[-1]["text"] == final and reasons[-1]["answer"] == answer
            assert final.split()[0] == depth and res.final["words"] == [answer]
            # streamed: every unit came before the ack of the whole source, i.e. before the client sent 'end'
            last_ack = max(i for i, f in enumerate(res.frames) if f["type"] == "ack")
            assert res.frames.index(reasons[-2]) < last_ack < res.frames.index(reasons[-1])

        async def out_of_order():
            async with connect(srv.ws_url) as ws:
                await ws.send(json.dumps({"type": "words", "words": examples[0].meta["facts"][0].split()}))
                while (frame := await recv_frame(ws, T))["type"] != "error":
                    pass
                return frame

        error = run(out_of_order())
        assert error["code"] == "bad_state" and error["fatal"] and "send the question first" in error["message"]
        wait_for_sessions(srv, 0)
        health = get_json(srv.url + "/health")
        assert health["policy"] == "thinker"
        assert health["mean_batch"] > 1, "the thinker sessions were not batched"


def test_batch_cot_thinker_sessions_are_batched_and_equal_thinker_session():
    """thinker-batch-cot (mode batch: every unit after the input ends, reasoning positions after the input):
    concurrent sessions on one slot engine give what a ThinkerSession alone gives."""
    from brisklm.streaming.thinker.data import thinker_task
    from brisklm.streaming.thinker.session import ThinkerSession
    from brisklm.zoo.store import load

    torch.set_num_threads(1)
    loaded = load("thinker-batch-cot")
    model, tok = loaded.model, loaded.tokenizer
    examples = thinker_task().examples("test", 3, seed=6)
    options = {"mode": "batch", "depth": "D2"}
    app = create_app(model, tok, policy="thinker", options=options, limits=Limits(max_source_words=80))
    with BackgroundServer(app) as srv:
        async def main():
            return await asyncio.gather(*[translate_over_ws(srv.ws_url, " ".join(e.meta["segments"]).split(),
                                                            per_message=2, timeout=T) for e in examples])

        results = run(main())
        health = get_json(srv.url + "/health")
    for e, res in zip(examples, results):
        session = ThinkerSession(model, tok, "D2", mode="batch")
        session.read_question(e.meta["question"])
        for fact in e.meta["facts"]:
            session.read_fact(fact)
        final, answer = session.finish()
        reasons = [f for f in res.frames if f["type"] == "reason"]
        assert [f["text"] for f in reasons if not f.get("final")] == session.units
        assert reasons[-1]["text"] == final and res.final["words"] == [answer]
    assert health["mean_batch"] > 1
