"""ProactiveLLM on subword checkpoints: heads decide at word starts, decoding equals the full masked pass of the
schedule it took, the word-level decoder is reproduced exactly, training + probe on a user corpus via the CLI."""

import io
import json
import sys

import pytest
import torch

from brisklm.cli import main
from brisklm.core import MatrixVisibility, Plan, execute
from brisklm.core.text import TextLayer
from brisklm.streaming.gpe import build_layout, padded_batch, position_ids, token_words
from brisklm.streaming.proactive.heads import Head, LinearProbe, adaptive_decode, never_write, sufficiency_data
from brisklm.streaming.proactive.subword import HEADER_SEES, head_decode, sufficiency_data_text
from brisklm.streaming.proactive.train import schedule_visibility
from brisklm.tasks.base import Example
from brisklm.tasks.tokenizer import build_word_tokenizer
from brisklm.tasks.translation import TranslationTask
from brisklm.zoo.architecture import new_model, tiny_llama_config
from brisklm.zoo.store import load

pytestmark = pytest.mark.usefixtures("one_thread")
TOL = 1e-4
SOURCES = [["the", "quick", "brownish", "foxes", "jumped", "over"], ["hello", "worldwide", "translation"]]
PAIRS = [("the quick brownish foxes jumped", "der schnelle braune Fuchs sprang"),
         ("hello worldwide translation", "hallo weltweite Ubersetzung"),
         ("streaming models read while writing", "Modelle lesen beim Schreiben"),
         ("a small cat sleeps on the warm mat", "eine kleine Katze schlaeft auf der warmen Matte")]
CASES = [("qwen2", False, None), ("llama3", True, "Translate the following text:"), ("gemma2", True, None)]


@pytest.fixture(scope="module", params=CASES, ids=[c[0] for c in CASES])
def checkpoint(request, fixture_checkpoints):
    style, chat, instruction = request.param
    loaded = load(str(fixture_checkpoints(style)))
    with torch.no_grad():  # larger weights: visibility errors show in the logits, and the heads disagree
        for p in loaded.model.parameters():
            p.mul_(4.0 if p.dim() > 1 else 1.0)
    return loaded.model, TextLayer.for_model(loaded.model, loaded.tokenizer, chat_template=chat), instruction


def per_word_schedule_suffices(row_seen, words, word_seen):
    """True when every token of a word was predicted from rows that saw what its first token saw (then the
    training mask, one schedule entry per word, is the decoder's mask)."""
    per_token = [seen for w, seen in zip(words, word_seen) for _ in w]
    return all(r == t for r, t in zip(row_seen, per_token))


@torch.no_grad()
@pytest.mark.parametrize("name, threshold", [("entropy", 4.0), ("attention", 0.3)])
def test_head_decoding_equals_full_masked_pass_of_its_schedule(checkpoint, name, threshold):
    model, text, instruction = checkpoint
    result = head_decode(model, text, SOURCES, Head(name), threshold, max_words=6, instruction=instruction,
                         keep_logits=True)
    assert any("R" in a[1:] for a in result.actions)  # the head read between words somewhere
    multi = 0
    for b, src in enumerate(SOURCES):
        words = token_words(text, result.written[b])
        multi += sum(len(w) > 1 for w in words)
        assert len(result.segments_seen[b]) == len(words)
        layout = build_layout(text, src, target_segments=words, instruction=instruction)
        n = len(src)
        mask = schedule_visibility(layout, [HEADER_SEES, *result.segments_seen[b], n + 1])
        s_len, start = len(layout.source_ids), len(layout.source_ids) + len(layout.target[0]) - 1
        segment = torch.tensor(layout.source_segment_of_tokens())
        for i, sees in enumerate(result.row_segments_seen[b]):  # each written row sees what was read when it was fed
            mask[start + i, :s_len] = segment <= sees
        if per_word_schedule_suffices(result.row_segments_seen[b], words, result.segments_seen[b]):
            assert torch.equal(mask, schedule_visibility(layout, [HEADER_SEES, *result.segments_seen[b], n + 1]))
        batch = padded_batch([layout], 0, [position_ids(layout)])
        plan = Plan(position_ids=batch["position_ids"], visibility=MatrixVisibility(mask[None]))
        full = execute(model, batch["input_ids"], plan=plan).logits[0].float()
        kept = torch.stack(result.outputs[b].logits)
        assert len(kept) == len(result.row_segments_seen[b])
        ref = full[start:start + len(kept)]
        finite = torch.isfinite(kept)
        assert (kept[finite] - ref[finite]).abs().max() < TOL
        # a word's delay is the words read when its first token was written (closed streams: the end is no word)
        assert result.outputs[b].delays == [min(s, n) for s in result.segments_seen[b]][:len(result.outputs[b].delays)]
    assert multi >= 0 and all(len(w) >= 1 for w in words)


def test_never_write_reads_everything_first_and_delays_count_words(checkpoint):
    model, text, instruction = checkpoint
    head = Head("entropy")
    out = head_decode(model, text, [SOURCES[0]], head, never_write(head), max_words=4, instruction=instruction)
    assert out.outputs[0].delays and set(out.outputs[0].delays) == {len(SOURCES[0])}
    assert out.actions[0].startswith("R" * (len(SOURCES[0]) + 1))  # every word and the end marker before writing


def test_probe_rows_are_one_per_target_word_start(checkpoint):
    model, text, instruction = checkpoint
    examples = [Example(s, t, t, {"source_words": s.split(), "target_words": t.split()}) for s, t in PAIRS]
    data = sufficiency_data_text(model, text, examples, seed=0, instruction=instruction)
    # rows: target words predicted while the source is open, never more than the words (not one per subword token)
    assert 0 < len(data.label) <= sum(len(t.split()) for _, t in PAIRS)
    assert data.hidden.shape == (len(data.label), model.config.hidden_size)
    assert torch.isfinite(data.entropy).all() and ((data.attention >= 0) & (data.attention <= 1 + 1e-5)).all()


def test_word_level_decoder_is_reproduced_exactly():
    task = TranslationTask(variable_lookahead=True, min_len=4, max_len=10)
    tok = build_word_tokenizer(task.vocabulary())
    config = tiny_llama_config(len(tok), pad_token_id=tok.pad_token_id, bos_token_id=tok.bos_token_id,
                               eos_token_id=tok.eos_token_id, hidden_size=32, num_hidden_layers=2, intermediate_size=64)
    model = new_model(config, 0).eval()
    sources = [e.meta["source_words"] for e in task.examples("test", 6, seed=3)]
    torch.manual_seed(0)
    for head, threshold in ((Head("entropy"), 5.0), (Head("attention"), 0.3),
                            (Head("probe", LinearProbe(32)), 0.5)):
        old = adaptive_decode(model, tok, sources, head, threshold)
        new = head_decode(model, TextLayer.for_model(model, tok), sources, head, threshold)
        assert [o.words for o in new.outputs] == [o.words for o in old.outputs]
        assert [o.delays for o in new.outputs] == [o.delays for o in old.outputs]
        assert new.actions == old.actions
    assert len(sufficiency_data(model, tok, task.examples("train", 4, seed=1)).label) > 0  # the word-level path stays


@pytest.mark.parametrize("style", ["qwen2", "llama3", "gemma2", "mistral"])
def test_cli_trains_on_your_corpus_and_runs_the_three_heads(style, fixture_checkpoints, tmp_path, capsys, monkeypatch):
    data = tmp_path / "train.jsonl"
    pairs = PAIRS + [(" ".join(s.split()[::-1]), " ".join(t.split()[::-1])) for s, t in PAIRS]  # 8 pairs
    data.write_text("".join(json.dumps({"source": s, "target": t}) + "\n" for s, t in pairs))
    out = tmp_path / "model"
    assert main(["stream", "train", "--model", str(fixture_checkpoints(style)), "--objective", "proactive",
                 "--spsd", "1.0", "--data", str(data), "--steps", "2", "--batch-size", "4", "--n-probe", "8",
                 "--probe-steps", "5", "--out", str(out)]) == 0
    assert (out / "proactive_probe.pt").exists() and "8 pairs of train.jsonl" in capsys.readouterr().out
    for policy in ("entropy", "attention", "probe"):
        monkeypatch.setattr(sys, "stdin", io.StringIO("the quick brownish\nfoxes jumped\n"))
        assert main(["stream", "translate", "--model", str(out), "--policy", policy, "--max-words", "5"]) == 0
        captured = capsys.readouterr()
        delays = [int(line.split("delay=")[1]) for line in captured.out.splitlines() if "delay=" in line]
        assert 1 <= len(delays) <= 5 and delays == sorted(delays) and 1 <= delays[0] and delays[-1] <= 5
        assert f"{policy} head" in captured.err


@torch.no_grad()
def test_heads_are_asked_only_where_a_word_starts(checkpoint):
    """starts_word (the decision point) agrees with the text layer's word grouping on multi-token words."""
    from brisklm.streaming.engine import StreamingSession
    from brisklm.streaming.gpe import word_segments
    from brisklm.streaming.proactive.subword import starts_word

    model, text, instruction = checkpoint
    target = [t for seg in word_segments(text, ["schnelle", "braune", "Fuchsbau", "sprang"]) for t in seg]
    groups = token_words(text, target)
    assert any(len(g) > 1 for g in groups)
    firsts = {sum(len(g) for g in groups[:j]) for j in range(len(groups))}
    session = StreamingSession(model, text, instruction=instruction)
    session.read(["the", "quick", "fox"])
    asked = []
    for i, token in enumerate(target):
        asked.append(starts_word(session, 0, token))
        session.write(forced=[token])
    assert asked == [i in firsts for i in range(len(target))]
