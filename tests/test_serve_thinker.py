"""`brisk serve --policy thinker` on a subword checkpoint: the text thinker runs batched across sessions on
persistent slots, and every session gets exactly what `TextThinkerSession` gives the same text run alone."""

import asyncio
import json

import pytest
import torch
from websockets.asyncio.client import connect

from brisklm.core.text import TextLayer
from brisklm.serve.app import create_app
from brisklm.serve.client import recv_frame, translate_over_ws
from brisklm.serve.server import BackgroundServer
from brisklm.serve.sessions import Limits
from brisklm.serve.thinker_slots import split_segments
from brisklm.streaming.thinker.text import TextThinkerSession, parse_answer, unit_end
from test_serve_checkpoints import http

T = 60
OPTIONS = {"max_unit_tokens": 5, "max_final_tokens": 8}
EXAMPLES = [  # (question, sentences)
    ("Who has the red ball?", ["Ann has a red ball.", "Bob has a blue cap."]),
    ("Where is the cat now?", ["The cat sat on the mat.", "Then it ran to the garden!", "It slept there."]),
    ("What does Carl eat?", ["Carl eats apples."]),
    ("Which hill is green?", ["The north hill is green.", "The south hill is dry."]),
    ("How old is Dana?", ["Dana is ten.", "Her brother is twelve."]),
]


def run(coro):
    return asyncio.run(asyncio.wait_for(coro, 3 * T))


@pytest.fixture(scope="module")
def checkpoint(fixture_checkpoints):
    from brisklm.zoo.store import load

    torch.set_num_threads(1)
    got = load(str(fixture_checkpoints("qwen2")))
    return got.model, TextLayer.for_model(got.model, got.tokenizer)


def alone(model, text, question, sentences, marker=None):
    """TextThinkerSession on one stream: units, final text, answer."""
    session = TextThinkerSession(model, text, 1, marker=marker or unit_end(text)[1],
                                 max_unit_tokens=OPTIONS["max_unit_tokens"], max_final_tokens=OPTIONS["max_final_tokens"])
    session.start([question])
    for sentence in sentences:
        session.read([sentence])
    return session.units[0], session.finish()[0], session.answers[0]


def served(result):
    units = [f["text"] for f in result.frames if f["type"] == "reason" and not f.get("final")]
    final = [f for f in result.frames if f["type"] == "reason" and f.get("final")]
    assert result.final["type"] == "done", result.final
    assert len(final) == 1
    return units, final[0]["text"], final[0]["answer"]


def test_concurrent_thinker_sessions_equal_the_session_run_alone(checkpoint):
    model, text = checkpoint
    expected = [alone(model, text, q, s) for q, s in EXAMPLES]
    assert len({e[0][0] for e in expected}) > 1, "every stream wrote the same unit: the comparison could not fail"
    app = create_app(model, text, policy="thinker", options=OPTIONS, limits=Limits(max_source_words=60))
    with BackgroundServer(app) as srv:
        async def wave(examples, offset):
            return await asyncio.gather(*[
                translate_over_ws(srv.ws_url, " ".join([q, *s]).split(), per_message=1 + (offset + i) % 3, timeout=T)
                for i, (q, s) in enumerate(examples)])

        async def main():
            first = await wave(EXAMPLES[:3], 0)
            second = await wave(EXAMPLES[3:], 1)  # rows given back by the first wave are taken again
            return [*first, *second]

        results = run(main())
        health = http(srv.url + "/health")[1]
    for (question, sentences), result, (units, final, answer) in zip(EXAMPLES, results, expected):
        got = served(result)
        assert got == (units, final, answer)
        assert len(got[0]) == len(sentences)
        assert result.final["words"] == ([answer] if answer else []) and answer == parse_answer(final)
        delays = [f["delay"] for f in result.frames if f["type"] == "reason"]
        assert delays == sorted(delays) and delays[-1] == len(" ".join([question, *sentences]).split())
        # streamed: every unit came before the ack of the whole source, i.e. before the client sent 'end'
        reasons = [f for f in result.frames if f["type"] == "reason"]
        last_ack = max(i for i, f in enumerate(result.frames) if f["type"] == "ack")
        assert result.frames.index(reasons[-2]) < last_ack < result.frames.index(reasons[-1])
    assert health["mean_batch"] > 1, "the thinker sessions were not batched"


def test_thinker_shape_errors_are_one_frame_each(checkpoint):
    model, text = checkpoint
    app = create_app(model, text, policy="thinker", options=OPTIONS, limits=Limits(max_source_words=60))
    with BackgroundServer(app) as srv:
        async def errors_for(words):
            async with connect(srv.ws_url, open_timeout=T) as ws:
                await ws.send(json.dumps({"type": "words", "words": words}))
                await ws.send(json.dumps({"type": "end"}))
                while (frame := await recv_frame(ws, T))["type"] not in ("error", "done"):
                    pass
                return frame

        async def main():
            return await asyncio.gather(errors_for(["no", "question", "here."]),
                                        errors_for(["Who?", "Ann", "has", "it"]),
                                        errors_for(["Who", "is", "it?"]),
                                        translate_over_ws(srv.ws_url, "Who is it? It is Ann.".split(), timeout=T))

        *errors, good = run(main())
    assert [e["type"] for e in errors] == ["error"] * 3
    assert "no question" in errors[0]["message"] and "does not end" in errors[1]["message"]
    assert "no context" in errors[2]["message"]
    assert good.final["type"] == "done"


def test_split_segments():
    assert split_segments(["Q", "a?", "b", "c.", "d?", "e"], False) == ([["Q", "a?"], ["b", "c."], ["d?"]], ["e"])
    assert split_segments(["x.", "y"], False) == ([], ["x.", "y"])
    assert split_segments(["x.", "y!"], True) == ([["x."], ["y!"]], [])


def test_the_checkpoints_thinker_settings_are_used(fixture_checkpoints, tmp_path):
    """thinker.json beside the checkpoint (written by `brisk think train`): its unit end and plain layout."""
    import shutil

    from brisklm.streaming.thinker.text import save_settings
    from brisklm.zoo.store import load

    folder = tmp_path / "qwen2"
    shutil.copytree(fixture_checkpoints("qwen2"), folder)
    save_settings(folder, ";", chat_template=False)
    got = load(str(folder))
    served_text = TextLayer.for_model(got.model, got.tokenizer)
    assert served_text.chat_template, "the fixture has a chat template: the plain layout would go untested"
    plain = TextLayer.for_model(got.model, got.tokenizer, chat_template=False)
    expected = [alone(got.model, plain, q, s, marker=unit_end(plain, ";")[1]) for q, s in EXAMPLES[:2]]
    default = alone(got.model, served_text, *EXAMPLES[0])
    assert default != expected[0], "the settings change nothing here: the check could not fail"
    app = create_app(got.model, served_text, policy="thinker", options=OPTIONS, limits=Limits(max_source_words=60))
    with BackgroundServer(app) as srv:
        async def main():
            return await asyncio.gather(*[translate_over_ws(srv.ws_url, " ".join([q, *s]).split(), timeout=T)
                                          for q, s in EXAMPLES[:2]])

        results = run(main())
    assert [served(r) for r in results] == expected


def test_the_minimal_protocol_runs_the_same_steps(checkpoint):
    """on_words / on_end (one session alone, as with --no-batching) give the units and final of the session alone."""
    from brisklm.serve.policy import make_policy

    model, text = checkpoint
    question, sentences = EXAMPLES[1]
    policy = make_policy("thinker", model, text, **OPTIONS)
    words = " ".join([question, *sentences]).split()
    items = policy.on_words(words[:7]) + policy.on_words(words[7:]) + policy.on_end()
    units = [i.text for i in items if i.kind == "reason" and not i.extra.get("final")]
    final = next(i for i in items if i.extra.get("final"))
    assert (units, final.text, final.extra["answer"]) == alone(model, text, question, sentences)
    assert items[-1].kind == "end" and policy.finished
