"""Tests for brisklm.tasks: tokenizer round trips, determinism, split disjointness and task-specific oracles."""

from __future__ import annotations

import numpy as np
import pytest
from transformers import AutoTokenizer, PreTrainedTokenizerFast

from brisklm.errors import BriskError, VocabularyError
from brisklm.tasks import TASKS, build_word_tokenizer, decode_ids, encode_words, get_task, split_of
from brisklm.tasks.base import Example
from brisklm.tasks.cot_arithmetic import is_correct, parse_answer
from brisklm.tasks.icl import TASK_SPECS, IclTask, knowledge_statements, label_rule
from brisklm.tasks.shapes_vqa import COLORS, NUMBER_WORDS, SHAPES, ShapesVQATask, render, shape_mask
from brisklm.tasks.translation import SOURCE_ADJECTIVES, TranslationTask, align, translate

N = 40


def _text_words(example: Example) -> list[str]:
    """All words of an example's prompt and completion."""
    return example.prompt.split() + example.completion.split()


# ---------------------------------------------------------------- tokenizer


def test_tokenizer_ids_are_deterministic_and_specials_first() -> None:
    tok = build_word_tokenizer(["b", "a", "c", "a"], extra_special=["<image>"])
    vocab = tok.get_vocab()
    assert [vocab[t] for t in ["<pad>", "<unk>", "<bos>", "<eos>", "<sep>", "<image>", "a", "b", "c"]] == list(range(9))
    assert tok.pad_token_id == 0
    assert isinstance(tok, PreTrainedTokenizerFast)
    assert build_word_tokenizer(["c", "b", "a"], extra_special=["<image>"]).get_vocab() == vocab


def test_tokenizer_round_trip_via_auto_tokenizer(tmp_path) -> None:
    words = get_task("translation").vocabulary()
    tok = build_word_tokenizer(words)
    tok.save_pretrained(tmp_path)
    loaded = AutoTokenizer.from_pretrained(tmp_path)
    assert isinstance(loaded, PreTrainedTokenizerFast)
    sentence = get_task("translation").examples("train", 1)[0].prompt
    ids = encode_words(tok, sentence.split())
    assert len(ids) == len(sentence.split())
    assert encode_words(loaded, sentence.split()) == ids
    assert loaded(sentence)["input_ids"] == ids  # the HF call path agrees word for word
    assert decode_ids(loaded, ids) == sentence.split()
    assert loaded.decode(ids) == sentence
    assert loaded.pad_token_id == 0 and loaded.eos_token == "<eos>" and loaded.sep_token == "<sep>"


def test_unknown_word_raises_vocabulary_error() -> None:
    tok = build_word_tokenizer(["a", "b"])
    with pytest.raises(VocabularyError, match="zzz"):
        encode_words(tok, ["a", "zzz", "b"])
    with pytest.raises(VocabularyError):
        decode_ids(tok, [999])
    assert encode_words(tok, "a b <eos>") == [5, 6, 3]


def test_tokenizer_rejects_words_with_spaces() -> None:
    with pytest.raises(BriskError):
        build_word_tokenizer(["two words"])


# ---------------------------------------------------------------- all tasks


@pytest.mark.parametrize("name", list(TASKS))
def test_same_seed_same_examples(name: str) -> None:
    task = get_task(name)
    a, b = task.examples("train", 10, seed=3), task.examples("train", 10, seed=3)
    assert [(e.prompt, e.completion) for e in a] == [(e.prompt, e.completion) for e in b]
    c = task.examples("train", 10, seed=4)
    assert [e.prompt for e in a] != [e.prompt for e in c]


@pytest.mark.parametrize("name", list(TASKS))
def test_train_and_test_are_disjoint(name: str) -> None:
    task = get_task(name)
    train, test = task.examples("train", N), task.examples("test", N)
    assert all(split_of(task.split_key(e)) == "train" for e in train)
    assert all(split_of(task.split_key(e)) == "test" for e in test)
    assert not {task.split_key(e) for e in train} & {task.split_key(e) for e in test}


@pytest.mark.parametrize("name", list(TASKS))
def test_every_word_is_in_vocabulary_and_tokenizes(name: str) -> None:
    task = get_task(name)
    vocab = set(task.vocabulary())
    assert len(vocab) < 300
    tok = build_word_tokenizer(vocab)
    for example in task.examples("train", N) + task.examples("test", N):
        words = _text_words(example)
        assert set(words) <= vocab, set(words) - vocab
        assert len(encode_words(tok, words)) == len(words)
        for key in ("verbose_cot", "minimal_cot"):
            if key in example.meta:
                assert set(example.meta[key].split()) <= vocab


def test_get_task_errors() -> None:
    with pytest.raises(BriskError, match="translation"):
        get_task("nope")
    with pytest.raises(BriskError, match="min_len"):
        get_task("translation", bogus=1)
    with pytest.raises(BriskError):
        get_task("translation").examples("dev", 1)


# ---------------------------------------------------------------- translation


def test_translation_reordering_and_lexicon() -> None:
    # kel=drak (noun), ama=sly / eli=brev (adjectives), sefa=pask (verb)
    assert translate(["ama", "kel", "sefa"]) == ["drak", "sly", "pask"]
    assert translate(["ama", "eli", "kel"]) == ["drak", "sly", "brev"]
    assert [k for _, k in align(["ama", "eli", "kel", "sefa"])] == [3, 3, 3, 4]


def test_translation_particle_lookahead() -> None:
    # baku -> barn with particle po, bisk with particle ri, up to 3 words later; particles vanish
    assert translate(["baku", "po"]) == ["barn"]
    assert translate(["baku", "ri"]) == ["bisk"]
    assert translate(["baku", "kel", "sefa", "ri"]) == ["bisk", "drak", "pask"]
    assert [k for _, k in align(["baku", "kel", "sefa", "ri"])] == [4, 4, 4]
    # a particle 4 words later is outside the window: default sense
    assert translate(["baku", "kel", "sefa", "kel", "ri"])[0] == "barn"
    with pytest.raises(VocabularyError):
        translate(["kel", "drak"])


def test_translation_examples_match_oracle_and_lengths() -> None:
    task = TranslationTask(min_len=30, max_len=40, variable_lookahead=True)
    for e in task.examples("train", 20):
        src = e.meta["source_words"]
        assert 30 <= len(src) <= 40 and src == e.prompt.split()
        assert e.meta["target_words"] == translate(src) == e.completion.split()
        needed = e.meta["source_needed"]
        assert needed == sorted(needed) and len(needed) == len(e.meta["target_words"])
    default = TranslationTask()
    assert all(6 <= len(e.meta["source_words"]) <= 20 for e in default.examples("test", 20))


def _longest_adjective_run(words: list[str]) -> int:
    """Length of the longest run of source adjectives (the lookahead a noun-first reordering needs)."""
    run = best = 0
    for w in words:
        run = run + 1 if w in SOURCE_ADJECTIVES else 0
        best = max(best, run)
    return best


def test_variable_lookahead_makes_long_noun_phrases() -> None:
    variable = TranslationTask(variable_lookahead=True).examples("train", 50)
    fixed = TranslationTask().examples("train", 50)
    assert max(_longest_adjective_run(e.meta["source_words"]) for e in variable) == 3
    assert max(_longest_adjective_run(e.meta["source_words"]) for e in fixed) == 1


# ---------------------------------------------------------------- streaming arithmetic


def test_streaming_arithmetic_units_and_answer() -> None:
    task = get_task("streaming_arithmetic")
    for e in task.examples("train", 30):
        m = e.meta
        assert e.prompt.startswith(f"Q: {m['target']} ?")
        assert len(m["facts"]) == len(m["units"]) == len(m["distractors"])
        assert any(m["distractors"])
        for fact, unit, dis in zip(m["facts"], m["units"], m["distractors"]):
            name = fact.split()[0]
            assert unit == ("skip" if dis else f"{name} = {m['values'][name]}")
        # recompute every value from the fact text
        env: dict[str, int] = {}
        for fact in m["facts"]:
            w = fact.split()[:-1]
            left = int(w[2]) if w[2].isdigit() else env[w[2]]
            if len(w) == 3:
                env[w[0]] = left
            else:
                op, right = w[3], int(w[4])
                env[w[0]] = {"+": left + right, "-": left - right, "*": left * right}[op] % 100
        assert str(env[m["target"]]) == m["answer"] == e.answer
        assert e.completion.endswith(f"answer {e.answer}")


# ---------------------------------------------------------------- cot arithmetic


def test_cot_verifier_accepts_right_and_rejects_wrong() -> None:
    task = get_task("cot_arithmetic")
    for e in task.examples("test", 20):
        assert is_correct(e.meta["verbose_cot"], e) and is_correct(e.meta["minimal_cot"], e)
        assert len(e.meta["verbose_cot"].split()) >= len(e.meta["minimal_cot"].split())
        wrong = str((int(e.answer) + 1) % 10)
        assert not is_correct(f"blah ; answer {wrong}", e)
        assert not is_correct("no marker here", e)
        assert not is_correct("answer", e)
        # re-evaluate the prompt independently
        words = e.prompt.split()[1:-1]
        total = int(words[0])
        for op, t in zip(words[1::2], words[2::2]):
            total = (total + int(t)) % 10 if op == "+" else (total - int(t)) % 10
        assert str(total) == e.answer
    assert parse_answer("answer 3 ; answer 4") == "4"


def test_cot_minimal_style() -> None:
    e = get_task("cot_arithmetic", style="minimal").examples("train", 1)[0]
    assert e.completion == e.meta["minimal_cot"]


# ---------------------------------------------------------------- shapes VQA


def test_shape_masks_are_distinct() -> None:
    masks = [shape_mask(s, 8).tobytes() for s in SHAPES]
    assert len(set(masks)) == len(SHAPES)


def test_shapes_answers_match_objects() -> None:
    task = ShapesVQATask()
    seen = set()
    for e in task.examples("train", 120):
        m, q = e.meta, e.prompt.split()
        objs = m["objects"]
        seen.add(m["family"])
        assert m["image"].shape == (32, 32, 3) and m["image"].dtype == np.uint8
        assert np.array_equal(m["image"], render(objs))
        assert 1 <= len(objs) <= 5 and len({(o["row"], o["col"]) for o in objs}) == len(objs)
        for o in objs:  # the drawn pixels carry the object's colour
            cell = m["image"][(o["row"] - 1) * 8:o["row"] * 8, (o["col"] - 1) * 8:(o["col"]) * 8]
            assert (cell.reshape(-1, 3) == COLORS[o["color"]]).all(axis=1).sum() == shape_mask(o["shape"], 8).sum()
        if m["family"] == "counting":
            assert e.answer == NUMBER_WORDS[sum(o["color"] == q[2] for o in objs)]
        elif m["family"] == "existence":
            hit = any(o["color"] == q[3] and o["shape"] == q[4] for o in objs)
            assert e.answer == ("yes" if hit else "no")
        elif m["family"] == "attribute":
            (obj,) = [o for o in objs if o["shape"] == q[4]]
            assert e.answer == obj["color"]
        elif q[2] == "in":
            row, col = NUMBER_WORDS.index(q[4]), NUMBER_WORDS.index(q[6])
            found = [o["shape"] for o in objs if (o["row"], o["col"]) == (row, col)]
            assert e.answer == (found[0] if found else "nothing")
        else:
            color, shape = q[-3], q[-2]
            (ref,) = [o for o in objs if o["color"] == color and o["shape"] == shape]
            assert e.answer in SHAPES
            if q[3] == "left":
                cands = [o for o in objs if o["row"] == ref["row"] and o["col"] < ref["col"]]
                assert e.answer == max(cands, key=lambda o: o["col"])["shape"]
    assert seen == {"attribute", "existence", "counting", "spatial"}


# ---------------------------------------------------------------- ICL


def test_icl_recognisable_labels_follow_rule() -> None:
    task = IclTask(tasks=("sentiment", "category"), shots=5)
    positive = {"good", "great", "happy", "nice", "lovely", "fine"}
    animals = {"cat", "dog", "horse", "bird", "fish", "cow"}
    for e in task.examples("train", 30):
        m, words = e.meta, e.prompt.split()
        assert m["recognisable"] and len(m["label_positions"]) == 5
        for pos, key in zip(m["label_positions"], m["demo_keys"]):
            assert words[pos - 2] == key and words[pos - 1] == "->"
            expected = ("positive" if key in positive else "negative") if m["task"] == "sentiment" else (
                "animal" if key in animals else "fruit")
            assert words[pos] == expected
        assert words[m["query_position"]] == "->" and words[m["query_position"] - 1] == m["query_key"]
        assert e.answer == label_rule(TASK_SPECS[m["task"]])[m["query_key"]]
        assert m["query_key"] not in m["demo_keys"]


def test_icl_similar_and_mislabel_options() -> None:
    task = IclTask(tasks=("sentiment_arbitrary",), shots=3, with_similar=True, mislabel_similar=True)
    rule = label_rule(TASK_SPECS["sentiment_arbitrary"])
    assert set(rule.values()) == {"foo", "bar"}
    for e in task.examples("test", 20):
        m, words = e.meta, e.prompt.split()
        assert not m["recognisable"]
        i = m["similar_index"]
        assert m["demo_keys"][i] == m["query_key"]
        assert words[m["label_positions"][i]] != e.answer == rule[m["query_key"]]
    with pytest.raises(BriskError):
        IclTask(mislabel_similar=True)
    assert "sentiment of great is positive" in knowledge_statements()


# ---------------------------------------------------------------- mixed LM


def test_mixed_lm_difficulty_labels_are_aligned_and_sound() -> None:
    for e in get_task("mixed_lm").examples("train", 20):
        words, diff = e.prompt.split(), e.meta["difficulty"]
        assert len(words) == len(diff) and set(diff) <= {"easy", "hard", "random"}
        for i, w in enumerate(words):
            if w == "=" and i + 1 < len(words):  # 'sum a b = c': c is hard and equals (a + b) mod 10
                assert diff[i + 1] == "hard" and int(words[i + 1]) == (int(words[i - 2]) + int(words[i - 1])) % 10
        for kind, start, end in e.meta["segments"]:
            if kind == "copy" and "|" in words[start:end]:
                bar = words.index("|", start)
                src = words[start + 1:bar]
                copied = words[bar + 1:min(end, bar + 1 + len(src))]
                assert copied == src[:len(copied)]
                assert all(d == "easy" for d in diff[bar + 1:bar + 1 + len(copied)])
