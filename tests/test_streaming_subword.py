"""GPE streaming on real-convention subword checkpoints: multi-token words, no BOS (qwen2), no pad + two eos
ids (llama3), SentencePiece-style (gemma2, mistral), plain or chat-template framing: the engine equals one full
masked pass, batched or not."""

import pytest
import torch

from brisklm.cli import main
from brisklm.core import MatrixVisibility, Plan, execute
from brisklm.core.text import TextLayer, as_text_layer
from brisklm.errors import BriskError
from brisklm.streaming.engine import StreamingSession, reference_logits
from brisklm.streaming.gpe import StreamLayout, build_layout, collate, stream_frame, token_words, word_segments
from brisklm.streaming.policies import gpe_wait_k
from brisklm.zoo.store import load

TOL = 1e-4
SOURCES = [["the", "quick", "brownish", "foxes", "jumped", "over", "lazy", "dogs"],
           ["hello", "worldwide", "translation"],
           ["streaming", "models", "read", "while", "writing"]]
TARGETS = [["der", "schnelle", "braune", "Fuchs", "sprang"], ["hallo", "Welt"], ["Modelle", "lesen", "beim", "Schreiben"]]

pytestmark = pytest.mark.usefixtures("one_thread")


INSTRUCTION = "Translate the following text:"
CASES = [("qwen2", "plain"), ("qwen2", "chat"), ("llama3", "plain"), ("llama3", "chat"), ("gemma2", "chat"),
         ("mistral", "chat")]


@pytest.fixture(scope="module", params=CASES, ids=[f"{s}-{f}" for s, f in CASES])
def checkpoint(request, fixture_checkpoints):
    """(style, model, text layer, instruction): chat = the template's turns with an instruction opening the source."""
    style, framing = request.param
    loaded = load(str(fixture_checkpoints(style)))
    torch.manual_seed(0)
    with torch.no_grad():  # larger weights than the fixture's init: position or visibility errors show in logits
        for p in loaded.model.parameters():
            p.mul_(4.0 if p.dim() > 1 else 1.0)
    text = TextLayer.for_model(loaded.model, loaded.tokenizer, chat_template=framing == "chat")
    return style, loaded.model, text, INSTRUCTION if framing == "chat" else None


def targets_of(tok):
    return [[t for seg in word_segments(tok, words) for t in seg] for words in TARGETS]


def test_fixture_words_split_into_several_tokens(checkpoint):
    style, _, tok, instruction = checkpoint
    frame = stream_frame(tok, instruction)
    segments = [word_segments(tok, s) for s in SOURCES]
    assert sum(len(seg) > 1 for segs in segments for seg in segs) >= 5  # the test is about multi-token words
    if style == "qwen2" and instruction is None:
        assert frame.prompt == ()  # no BOS: the prompt segment is empty
    if style == "llama3":
        assert as_text_layer(tok).roles.pad_source == "eos" and len(as_text_layer(tok).roles.eos_ids) == 2
    if instruction is not None:  # the template's user turn and the instruction open the source group
        assert INSTRUCTION in tok.tokenizer.decode(list(frame.prompt)) and not frame.first_at_start
        assert frame.target_end == as_text_layer(tok).end_id
    # reads in chunks give the ids of the whole sentence (a chunk continues earlier text)
    for src in SOURCES:
        chunked = word_segments(tok, src[:2]) + word_segments(tok, src[2:], at_start=False)
        assert chunked == word_segments(tok, src)


@torch.no_grad()
@pytest.mark.parametrize("k", [1, 3])
def test_engine_equals_full_masked_pass_batched(checkpoint, k):
    _, model, tok, instruction = checkpoint
    targets = targets_of(tok)
    result = gpe_wait_k(model, tok, SOURCES, k, batch_size=3, forced=targets, keep_logits=True,
                        instruction=instruction)
    worst = 0.0
    for src, words, tgt, out in zip(SOURCES, TARGETS, targets, result.outputs):
        ref = reference_logits(model, tok, src, tgt, k, instruction=instruction)
        assert out.logits.shape == ref.shape == (len(tgt) + 1, ref.shape[1])
        worst = max(worst, (out.logits - ref).abs().max().item())
        assert out.words == words
        assert out.delays == [min(k + j, len(src)) for j in range(len(words))]  # words read at each first token
    assert worst < TOL


@torch.no_grad()
def test_old_one_row_shift_mask_does_not_match_on_multi_token_words(checkpoint):
    """Negative control: the word-level mask (only a word's last row sees the next word) differs from the engine."""
    _, model, tok, instruction = checkpoint
    src, tgt = SOURCES[0], targets_of(tok)[0]
    out = gpe_wait_k(model, tok, [src], 1, forced=[tgt], keep_logits=True, instruction=instruction).outputs[0]
    layout = build_layout(tok, src, target_segments=token_words(tok, tgt), instruction=instruction)
    old = StreamLayout(layout.source, layout.target, next_segment_rows=False)
    batch = collate([old], [1], stream_frame(tok, instruction).pad)
    plan = Plan(position_ids=batch["position_ids"], visibility=MatrixVisibility(batch["visibility"]))
    logits = execute(model, batch["input_ids"], plan=plan, attention_mask=batch["attention_mask"]).logits[0]
    start = len(layout.source_ids) + len(layout.target[0]) - 1
    assert (out.logits - logits[start:start + len(tgt) + 1]).abs().max().item() > 1e-2


@torch.no_grad()
def test_free_decoding_batched_equals_single_streams(checkpoint):
    _, model, tok, instruction = checkpoint
    batched = gpe_wait_k(model, tok, SOURCES, 2, batch_size=3, keep_logits=True, instruction=instruction).outputs
    for src, out in zip(SOURCES, batched):
        single = gpe_wait_k(model, tok, [src], 2, batch_size=1, keep_logits=True,
                            instruction=instruction).outputs[0]
        assert single.words == out.words and single.delays == out.delays
        assert (single.logits - out.logits).abs().max().item() < TOL
        assert out.delays == sorted(out.delays) and all(1 <= d <= len(src) for d in out.delays)
        assert len(out.words) == len(out.delays)


@torch.no_grad()
def test_words_complete_with_their_first_token_delay(checkpoint):
    """Forced ids with hand-made reads: a word's delay is the source words read when its first token was written."""
    _, model, tok, instruction = checkpoint
    words = TARGETS[0][:3]
    ids = [seg for seg in word_segments(tok, words)]
    assert any(len(seg) > 1 for seg in ids)
    session = StreamingSession(model, tok, instruction=instruction)
    session.read(["the"])
    flat = [t for seg in ids for t in seg]
    reads = iter(["quick", "brownish", "foxes", "jumped"])
    for i, token in enumerate(flat):
        session.write(forced=[token])
        if i in (0, len(ids[0])):  # read one more word after the first token of words 1 and 2
            session.read([next(reads)])
    assert session.outputs[0].words == words[:2] and session.words_started(0) == 3
    session.close()
    session.write(forced=[stream_frame(tok, instruction).target_end])
    out = session.outputs[0]
    assert session.done[0] and out.words == words and out.delays == [1, 2, 3]


def test_cli_translate_prints_words_with_delays(checkpoint, capsys, fixture_checkpoints):
    style, _, _, instruction = checkpoint
    framing = ["--instruction", instruction] if instruction else ["--no-chat-template"]
    code = main(["stream", "translate", "--model", str(fixture_checkpoints(style)), "--k", "2", "--max-words", "5",
                 "--text", "the quick brownish foxes jumped over", *framing])
    assert code == 0
    lines = [line for line in capsys.readouterr().out.splitlines() if "\tdelay=" in line]
    assert 1 <= len(lines) <= 5
    delays = [int(line.rsplit("delay=", 1)[1]) for line in lines]
    assert delays == sorted(delays) and delays[0] >= 2 and delays[-1] <= 6


@torch.no_grad()
def test_baselines_on_subword_checkpoints(checkpoint):
    """Re-encoding (strict wait-k), offline and interleaved: words from the WordDecoder, delays at first tokens."""
    from brisklm.streaming.policies import interleaved_wait_k, offline, reencode_wait_k

    _, model, tok, instruction = checkpoint
    short = SOURCES[1:]  # random weights write runaway words up to the token cap; keep the re-encoding short
    strict = reencode_wait_k(model, tok, short, 2, strict=True)
    for src, out in zip(short, strict.outputs):
        assert out.words and out.delays == [min(2 + j, len(src)) for j in range(len(out.words))]
    for src, out in zip(short, offline(model, tok, short).outputs):
        assert out.words and set(out.delays) == {len(src)}
    for src, out in zip(short, interleaved_wait_k(model, tok, short, 2).outputs):
        assert out.words and len(out.delays) == len(out.words)
        assert out.delays == sorted(out.delays) and 2 <= out.delays[0] and out.delays[-1] <= len(src)


def test_interleaved_sequence_reads_before_the_next_word_may_start(checkpoint):
    """Arrival order on subwords: after a word's first token come the reads the next word needs."""
    from brisklm.streaming.policies import interleaved_sequence

    _, _, tok, instruction = checkpoint
    frame = stream_frame(tok)
    src = word_segments(tok, ["hello", "worldwide"], frame.first_at_start)
    tgt = word_segments(tok, ["hallo", "Welt"])
    seq = interleaved_sequence(tok, ["hello", "worldwide"], ["hallo", "Welt"], 1)
    expected = [*frame.prompt, *src[0], tgt[0][0], *src[1], *tgt[0][1:], tgt[1][0], *frame.batch_separator, *tgt[1][1:],
                frame.target_end]
    assert seq["input_ids"] == expected
    labelled = [t for t, lab in zip(seq["input_ids"], seq["labels"]) if lab != -100]
    assert labelled == [*tgt[0], *tgt[1], frame.target_end]


def test_decision_heads_run_on_subword_checkpoints(checkpoint):
    from brisklm.streaming.proactive.heads import Head, adaptive_decode, live_decode

    _, model, tok, instruction = checkpoint
    batch = adaptive_decode(model, tok, [["hello", "worldwide"]], Head("entropy"), 0.5)
    live = live_decode(model, tok, ["hello", "worldwide"], Head("entropy"), 0.5)
    assert batch.outputs[0].words == live.words and batch.outputs[0].delays == live.delays  # (proactive/subword.py)


def test_bad_source_text_gets_one_clear_error(checkpoint):
    style, model, tok, instruction = checkpoint
    session = StreamingSession(model, tok, instruction=instruction)
    with pytest.raises(BriskError, match="empty"):
        session.close()
    with pytest.raises(BriskError, match="whitespace"):
        session.read(["two words"])
    if style in ("mistral", "gemma2"):  # SentencePiece-style fixtures have no byte fallback: 日本 is <unk>
        with pytest.raises(BriskError, match="cannot encode"):
            session.read(["fine", "日本"])
    else:  # byte-level BPE encodes any text
        assert sum(len(seg) for seg in word_segments(tok, ["日本"])) >= 2
    session.read(["fine"])  # the session carries on
    session.close()
    assert session.finish(max_target_words=2)[0].source_words == 1
