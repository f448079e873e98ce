"""The one text layer on every real-convention fixture and on the word-level zoo tokenizer."""

import random

import pytest
from transformers import AutoTokenizer, GenerationConfig, PreTrainedTokenizerFast

from brisklm.core.text import PLAIN_SEPARATOR, TextLayer, add_text_args, resolve_roles, text_options
from brisklm.errors import BriskError, VocabularyError
from brisklm.tasks import TranslationTask, build_word_tokenizer, encode_words
from brisklm.testing.checkpoints import ENGLISH, FIXTURE_STYLES, train_bpe_tokenizer

WORDS = sorted({w for line in ENGLISH for w in line.split()} | {"garu", "Q:", "=", "->", "85", "xyzzy", "(a)"})


def _layer(fixture_checkpoints, style, **kw):
    from transformers import AutoConfig

    path = fixture_checkpoints(style)
    tok = AutoTokenizer.from_pretrained(path, local_files_only=True)
    return TextLayer.from_tokenizer(tok, AutoConfig.from_pretrained(path), GenerationConfig.from_pretrained(path), **kw)


def _ids(tok, text):
    return tok(text, add_special_tokens=False)["input_ids"]


@pytest.mark.parametrize("style", FIXTURE_STYLES)
def test_segments_concatenate_to_tokenizer_ids(fixture_checkpoints, style):
    text = _layer(fixture_checkpoints, style)
    rng = random.Random(hash(style) % 1000)
    multi = 0
    for _ in range(40):
        head, tail = rng.sample(WORDS, rng.randint(1, 9)), rng.sample(WORDS, rng.randint(1, 5))
        segs = text.word_segments(head)
        cont = text.word_segments(tail, at_start=False)
        assert len(segs) == len(head) and all(segs) and all(cont)
        assert [i for s in segs for i in s] == _ids(text.tokenizer, " ".join(head))
        assert [i for s in segs + cont for i in s] == _ids(text.tokenizer, " ".join(head + tail))
        assert text.encode(" ".join(head)) == _ids(text.tokenizer, " ".join(head))
        multi += sum(len(s) > 1 for s in segs)
    assert multi > 40, "fixture words should often split into several tokens"


@pytest.mark.parametrize("style", FIXTURE_STYLES)
def test_word_decoder_emits_when_next_word_starts(fixture_checkpoints, style):
    text = _layer(fixture_checkpoints, style)
    rng = random.Random(1)
    for _ in range(10):
        words = rng.sample(WORDS, rng.randint(1, 8))
        segs = text.word_segments(words)
        decoder = text.decoder()
        emitted = []
        for k, seg in enumerate(segs):
            for j, token in enumerate(seg):
                out = decoder.feed(token)
                assert out == ([words[k - 1]] if j == 0 and k > 0 else []), (k, j, out)
                emitted += out
        emitted += decoder.finish()
        assert emitted == words
        assert text.words([i for s in segs for i in s]) == words


@pytest.mark.parametrize("style", FIXTURE_STYLES)
def test_roles_and_chat_framing(fixture_checkpoints, style):
    text = _layer(fixture_checkpoints, style)
    tok, roles = text.tokenizer, text.roles
    assert roles.eos_ids and roles.pad_id is not None and text.chat_template
    assert roles.end_of_turn_id in roles.eos_ids
    assert (roles.bos_id is None) == (style in ("qwen2", "qwen3"))
    messages = [{"role": "system", "content": "Translate into German."}, {"role": "user", "content": "the lazy dog"}]
    expected = tok.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    got = text.prompt_ids("the lazy dog", system="Translate into German.")
    assert got == _ids(tok, expected)
    assert "Translate into German." in tok.decode(got) and "the lazy dog" in tok.decode(got)
    assert text.prompt_ids("the lazy dog") != got
    done = text.completion_ids("Der faule Hund")
    assert done[-1] == roles.end_of_turn_id and text.cut_at_eos(done) == (done[:-1], True)


def test_special_roles_per_family(fixture_checkpoints):
    qwen = _layer(fixture_checkpoints, "qwen2")
    tok = qwen.tokenizer
    assert qwen.roles.bos_id is None and qwen.roles.eos_id == tok.convert_tokens_to_ids("<|im_end|>")
    assert qwen.roles.pad_source == "tokenizer" and qwen.roles.pad_id == tok.convert_tokens_to_ids("<|endoftext|>")
    llama = _layer(fixture_checkpoints, "llama3")
    tok = llama.tokenizer
    assert llama.roles.bos_id == tok.convert_tokens_to_ids("<|begin_of_text|>")
    assert set(llama.roles.eos_ids) == {tok.convert_tokens_to_ids(t) for t in ("<|eot_id|>", "<|end_of_text|>")}
    assert tok.pad_token_id is None and llama.roles.pad_source == "eos" and llama.roles.pad_id == llama.roles.eos_ids[0]
    gemma = _layer(fixture_checkpoints, "gemma2")
    assert gemma.roles.end_of_turn_id == gemma.tokenizer.convert_tokens_to_ids("<end_of_turn>")
    # without config or generation_config only the tokenizer (and template) count
    bare = TextLayer.from_tokenizer(llama.tokenizer)
    assert bare.roles.eos_ids == (tok.convert_tokens_to_ids("<|eot_id|>"),)


@pytest.mark.parametrize("style", ["qwen2", "llama3", "mistral"])
def test_plain_framing_without_template(fixture_checkpoints, style):
    text = _layer(fixture_checkpoints, style, chat_template=False)
    tok = text.tokenizer
    assert not text.chat_template
    bos = [] if text.roles.bos_id is None else [text.roles.bos_id]
    assert text.prompt_ids("the lazy dog") == bos + _ids(tok, "the lazy dog") + _ids(tok, PLAIN_SEPARATOR)
    assert text.completion_ids("a fox") == _ids(tok, "a fox") + [text.roles.eos_ids[0]]
    assert text.plain_ids("a fox") == bos + _ids(tok, "a fox") + [text.roles.eos_ids[0]]
    with pytest.raises(BriskError, match="system prompt needs a chat template"):
        text.prompt_ids("the lazy dog", system="Be brief.")


def test_zoo_word_tokenizer_keeps_todays_ids():
    task = TranslationTask()
    tok = build_word_tokenizer(task.vocabulary())
    text = TextLayer.from_tokenizer(tok)
    example = task.examples("train", 1, seed=0)[0]
    words = example.prompt.split()
    ids = tok.convert_tokens_to_ids
    assert text.prompt_ids(example.prompt) == [ids("<bos>"), *encode_words(tok, words), ids("<sep>")]
    assert text.completion_ids(example.completion) == [*encode_words(tok, example.completion.split()), ids("<eos>")]
    assert text.word_segments(words) == [[i] for i in encode_words(tok, words)]
    assert text.word_segments(words, at_start=False) == text.word_segments(words)
    assert text.roles.pad_id == ids("<pad>") and text.roles.sep_id == ids("<sep>") and not text.chat_template
    decoder = text.decoder()
    assert [decoder.feed(i) for i in encode_words(tok, words[:3])] == [[w] for w in words[:3]]  # whole words at once
    assert text.decode(encode_words(tok, words)) == " ".join(words)
    with pytest.raises(VocabularyError, match="unknown word"):
        text.word_segments(["not-a-word"])
    with pytest.raises(BriskError, match="one token per word"):
        TextLayer.from_tokenizer(PreTrainedTokenizerFast(tokenizer_object=train_bpe_tokenizer(), eos_token="<e>",
                                                         extra_special_tokens=["<e>"])).require_word_level("gpe")
    text.require_word_level("gpe")


def test_tokenizer_without_eos_is_a_user_error():
    tok = PreTrainedTokenizerFast(tokenizer_object=train_bpe_tokenizer())
    with pytest.raises(BriskError, match="eos_token"):
        resolve_roles(tok)


def test_text_args():
    import argparse

    parser = argparse.ArgumentParser()
    add_text_args(parser)
    assert text_options(parser.parse_args([])) == {"chat_template": True, "system_prompt": None}
    assert text_options(parser.parse_args(["--no-chat-template", "--system-prompt", "Be brief."])) == {
        "chat_template": False, "system_prompt": "Be brief."}
    assert text_options(argparse.Namespace()) == {"chat_template": True, "system_prompt": None}


@pytest.mark.parametrize("style", ["qwen2", "llama3", "mistral"])
def test_stop_ids_are_every_eos_and_the_end_of_turn(fixture_checkpoints, style):
    from dataclasses import replace

    tok = AutoTokenizer.from_pretrained(fixture_checkpoints(style))
    text = TextLayer.from_tokenizer(tok)
    assert text.stop_ids[: len(text.roles.eos_ids)] == text.roles.eos_ids and text.end_id in text.stop_ids
    detached = TextLayer(tok, replace(text.roles, eos_ids=text.roles.eos_ids[:1]), True, None)
    assert set(detached.stop_ids) == {text.roles.eos_ids[0], detached.end_id}
    assert detached.cut_at_eos([7, detached.end_id, 8]) == ([7], True)
