"""Server building blocks without a server: batched engine steps equal one-session runs equal offline wait-k."""

import random

import pytest
import torch

from brisklm.errors import BriskError
from brisklm.serve.batching import run_batched
from brisklm.serve.policy import CLOSE, READ, WRITE, GpeWaitKPolicy, is_stepping, make_policy, policy_names
from brisklm.serve.protocol import ProtocolError, parse_message
from brisklm.streaming.policies import gpe_wait_k
from brisklm.tasks import get_task


@pytest.fixture(scope="module")
def gpe():
    from brisklm.zoo.store import load

    torch.set_num_threads(1)
    loaded = load("translate-gpe")
    return loaded.model, loaded.tokenizer


def sources(n, seed):
    return [e.meta["source_words"] for e in get_task("translation").examples("test", n, seed=seed)]


def collect(items):
    words = [i.text for i in items if i.kind == "word"]
    return words, [i.delay for i in items if i.kind == "word"]


def lockstep(policies, arrivals):
    """Feed each policy its chunks one per round; run every round's steps batched across policies."""
    items = [[] for _ in policies]
    at = [0] * len(policies)
    calls = []
    for _ in range(10_000):  # bounded
        if all(p.finished for p in policies):
            break
        for i, p in enumerate(policies):
            if p.next_step() is None and not p.finished and not p.ended:
                if at[i] < len(arrivals[i]):
                    p.push(arrivals[i][at[i]])
                    at[i] += 1
                else:
                    p.push_end()
        for phase in (READ, CLOSE, WRITE, "finish"):
            group = [(i, p, st) for i, p in enumerate(policies) if (st := p.next_step()) is not None and st.kind == phase]
            if not group:
                continue
            if phase == "finish":
                for i, p, st in group:
                    items[i] += p.apply_step(st)
                continue
            calls.append(len(group))
            written = run_batched(phase, [p.engine for _, p, _ in group], [st.words for _, _, st in group])
            for (i, p, st), word in zip(group, written):
                items[i] += p.apply_step(st, word)
    else:
        raise AssertionError("sessions did not finish")
    return items, calls


def chunks(words, rng):
    out, i = [], 0
    while i < len(words):
        n = rng.randint(1, 4)
        out.append(words[i:i + n])
        i += n
    return out


@pytest.mark.parametrize("k", [1, 4])
def test_batched_sessions_equal_single_and_offline(gpe, k):
    model, tok = gpe
    srcs = sources(6, seed=10 + k)
    offline = gpe_wait_k(model, tok, srcs, k, batch_size=1).outputs
    rng = random.Random(k)
    arrivals = [chunks(s, rng) for s in srcs]  # each session gets its words in different-sized pieces
    batched, calls = lockstep([GpeWaitKPolicy(model, tok, k) for _ in srcs], arrivals)
    assert max(calls) > 1, "nothing was batched"
    for src, out, items in zip(srcs, offline, batched):
        single = GpeWaitKPolicy(model, tok, k)
        alone = []
        for w in src:
            alone += single.on_words([w])
        alone += single.on_end()
        assert collect(alone) == (out.words, out.delays)
        assert collect(items) == (out.words, out.delays)
        assert alone[-1].kind == "end" and items[-1].kind == "end"


def test_batched_write_caches_match_single_session(gpe):
    """After batched steps each session's caches hold the same keys (to fp tolerance) as a one-session run."""
    model, tok = gpe
    srcs = sources(4, seed=3)
    pols = [GpeWaitKPolicy(model, tok, 2) for _ in srcs]
    lockstep(pols, [[[w] for w in s] for s in srcs])
    for src, p in zip(srcs, pols):
        alone = GpeWaitKPolicy(model, tok, 2)
        for w in src:
            alone.on_words([w])
        alone.on_end()
        for mine, ref in ((p.engine.target_cache, alone.engine.target_cache), (p.engine.source_cache, alone.engine.source_cache)):
            for a, b in zip(mine.layers, ref.layers):
                assert a.keys.shape == b.keys.shape
                assert torch.allclose(a.keys, b.keys, atol=1e-5)
                assert torch.equal(a.meta["valid"], b.meta["valid"])


def test_policy_protocol_and_errors(gpe):
    model, tok = gpe
    assert "wait-k" in policy_names()
    policy = make_policy("wait-k", model, tok, k=2)
    assert is_stepping(policy)
    with pytest.raises(BriskError, match="unknown word"):
        policy.check_words(["notaword"])
    with pytest.raises(BriskError, match="unknown policy"):
        make_policy("nope", model, tok)
    with pytest.raises(BriskError, match="empty"):
        policy.on_end()
    with pytest.raises(BriskError):
        make_policy("wait-k", model, tok, k=0)


@pytest.mark.parametrize("raw, code", [
    ("not json", "malformed"), ("[1, 2]", "malformed"), ('{"type": "nope"}', "malformed"),
    ('{"type": "words"}', "malformed"), ('{"type": "words", "words": "a b"}', "malformed"),
    ('{"type": "words", "words": ["a b"]}', "malformed"), ('{"type": "words", "words": []}', "malformed"),
    ('{"type": "words", "words": ["a"], "x": 1}', "malformed"), ('{"type": "start", "options": 3}', "malformed"),
    ('{"type": "words", "text": "' + "a " * 600 + '"}', "oversized"),
    ('{"type": "words", "words": ["' + "a" * 100 + '"]}', "oversized"),
])
def test_parse_message_rejects(raw, code):
    with pytest.raises(ProtocolError) as info:
        parse_message(raw, max_bytes=1000)
    assert info.value.code == code and info.value.message


def test_parse_message_accepts():
    assert parse_message('{"type": "words", "text": " a  b "}', 100).words == ["a", "b"]
    assert parse_message(b'{"type": "words", "words": ["a"]}', 100).words == ["a"]
    start = parse_message('{"type": "start", "policy": "wait-k", "options": {"k": 2}}', 100)
    assert start.policy == "wait-k" and start.options == {"k": 2}
    assert parse_message('{"type": "end"}', 100).type == "end"
