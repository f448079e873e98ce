"""Server building blocks without a server: batched engine steps equal one-session runs equal offline wait-k."""

import random

import pytest
import torch

from brisklm.errors import BriskError
from brisklm.serve.policy import GpeWaitKPolicy, is_stepping, make_policy, policy_names
from brisklm.serve.protocol import ProtocolError, parse_message
from brisklm.serve.scheduler import run_round
from brisklm.serve.slots import EnginePool, compact_cache
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
    """Feed each policy its chunks one per round; run every round's steps batched across policies (slots)."""
    from collections import Counter

    items = [[] for _ in policies]
    at = [0] * len(policies)
    sizes = Counter()
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
        results = {i: ([], None) for i in range(len(policies))}
        run_round(list(enumerate(policies)), results, 64, sizes)
        for i, (got, error) in results.items():
            assert error is None, error
            items[i] += got
    else:
        raise AssertionError("sessions did not finish")
    return items, [n for n, c in sizes.items() for _ in range(c)]


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
    pool = EnginePool(model, tok)
    batched, calls = lockstep([GpeWaitKPolicy(model, tok, k, engines=pool) for _ in srcs], arrivals)
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


def valid_keys(cache, row):
    """Per layer: the keys of one batch row that any query may see, in cache order."""
    return [layer.keys[row][:, layer.meta["valid"][row]] for layer in cache.layers]


def test_batched_slot_caches_match_single_session(gpe):
    """After batched steps each slot's row holds the same visible keys (to fp tolerance) as a one-session run,
    also after compaction packs every row's keys to the left."""
    model, tok = gpe
    srcs = sources(4, seed=3)
    pool = EnginePool(model, tok)
    pols = [GpeWaitKPolicy(model, tok, 2, engines=pool) for _ in srcs]
    arrivals = [[[w] for w in s] for s in srcs]
    for p, a in zip(pols, arrivals):  # every source but its last word, then compare mid-stream
        for chunk in a[:-1]:
            p.push(chunk)
    for _ in range(50):
        results = {i: ([], None) for i in range(len(pols))}
        run_round(list(enumerate(pols)), results, 64)
        if not any(p.next_step() for p in pols):
            break
    engine = pols[0].engine
    assert engine.size >= len(srcs) and engine.live == len(srcs)
    for force in (False, True):
        if force:
            assert compact_cache(engine.session.target_cache, force=True)
        for src, p in zip(srcs, pols):
            alone = GpeWaitKPolicy(model, tok, 2)
            alone.on_words(src[:-1])
            for cache, ref in ((engine.session.target_cache, alone.engine.session.target_cache),
                               (engine.session.source_cache, alone.engine.session.source_cache)):
                for a, b in zip(valid_keys(cache, p.row), valid_keys(ref, 0)):
                    assert a.shape == b.shape
                    assert torch.allclose(a, b, atol=1e-5)


def test_slots_are_reused_grown_and_shrunk(gpe):
    """Sessions that come and go in one engine (rows taken, given back, reused; the engine doubles, compacts and
    shrinks) still equal offline wait-k."""
    model, tok = gpe
    srcs = sources(12, seed=5)
    offline = gpe_wait_k(model, tok, srcs, 2).outputs
    pool = EnginePool(model, tok, max_rows=4)  # up to 7 live sessions: a second engine is needed
    pending = list(range(len(srcs)))
    live, items, sizes = {}, {i: [] for i in range(len(srcs))}, set()
    for round_ in range(10_000):
        while pending and len(live) < (2, 6, 3, 7, 1)[round_ % 5]:  # a changing number of live sessions
            i = pending.pop(0)
            live[i] = GpeWaitKPolicy(model, tok, 2, engines=pool)
            live[i].push(srcs[i][:2])
        if not live:
            break
        for i, p in live.items():
            if p.next_step() is None and not p.ended:
                rest = srcs[i][p.received:]
                p.push(rest[:1]) if rest else p.push_end()
        results = {i: ([], None) for i in live}
        run_round(list(live.items()), results, 64)
        pool.compact()
        sizes |= {engine.size for engine in pool.engines[0]}
        for i, (got, error) in results.items():
            assert error is None
            items[i] += got
        for i in [i for i, p in live.items() if p.finished]:
            live.pop(i).release()
    assert not pending and not live
    engines = pool.engines[0]
    assert len(engines) == 2 and sum(e.joined for e in engines) == len(srcs) and max(sizes) == 4
    for out, got in zip(offline, items.values()):
        assert collect(got) == (out.words, out.delays)
    width = max(layer.length for layer in engines[0].session.target_cache.layers)
    assert width < sum(len(o.words) for o in offline), "the cache was never compacted"


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


def test_engine_shrinks_when_most_slots_are_free_and_sessions_carry_on(gpe):
    model, tok = gpe
    srcs = sources(9, seed=8)
    offline = gpe_wait_k(model, tok, srcs, 2).outputs
    pool = EnginePool(model, tok)
    pols = [GpeWaitKPolicy(model, tok, 2, engines=pool) for _ in srcs]
    items = {i: [] for i in range(len(srcs))}

    def rounds(chosen):
        for _ in range(1000):
            results = {i: ([], None) for i in chosen}
            run_round([(i, pols[i]) for i in chosen], results, 64)
            for i, (got, error) in results.items():
                assert error is None
                items[i] += got
            if not any(pols[i].next_step() for i in chosen):
                return

    for i, p in enumerate(pols):
        p.push(srcs[i][:3])
    rounds(range(9))
    engine = pols[0].engine
    assert engine.size == 16 and engine.live == 9
    for i in range(6):  # six sessions end; their slots go back
        pols[i].push(srcs[i][3:])
        pols[i].push_end()
    rounds(range(6))
    for i in range(6):
        pols[i].release()
    assert engine.size == 8 and engine.live == 3  # live rows moved to the front, half the rows dropped
    rows = [pols[i].row for i in range(6, 9)]
    assert len(set(rows)) == 3 and max(rows) < 8
    for i in range(6, 9):
        pols[i].push(srcs[i][3:])
        pols[i].push_end()
    rounds(range(6, 9))
    for out, got in zip(offline, items.values()):
        assert collect(got) == (out.words, out.delays)
