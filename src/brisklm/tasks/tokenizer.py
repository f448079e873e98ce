"""Word-level tokenizer: one whitespace word = one id, as a real HF fast tokenizer (save/load round-trips)."""

from __future__ import annotations

from collections.abc import Iterable, Sequence

from tokenizers import Tokenizer, models, pre_tokenizers
from transformers import PreTrainedTokenizerFast

from brisklm.errors import BriskError, VocabularyError

PAD, UNK, BOS, EOS, SEP = "<pad>", "<unk>", "<bos>", "<eos>", "<sep>"
SPECIAL_TOKENS: tuple[str, ...] = (PAD, UNK, BOS, EOS, SEP)


def _check_word(word: str) -> None:
    """Reject words that could not stay one token (empty or containing whitespace)."""
    if not isinstance(word, str) or not word or word != word.strip() or len(word.split()) != 1:
        raise BriskError(f"invalid vocabulary word {word!r}: words must be non-empty strings without whitespace")


def build_word_tokenizer(words: Iterable[str], extra_special: Sequence[str] = ()) -> PreTrainedTokenizerFast:
    """Build a deterministic WordLevel fast tokenizer: specials first (<pad>=0), then sorted unique words."""
    extra = list(dict.fromkeys(extra_special))
    for tok in extra:
        _check_word(tok)
        if tok in SPECIAL_TOKENS:
            raise BriskError(f"extra special token {tok!r} is already a built-in special; drop it from extra_special")
    specials = list(SPECIAL_TOKENS) + extra
    plain = set()
    for word in words:
        _check_word(word)
        plain.add(word)
    ordered = specials + sorted(plain - set(specials))
    vocab = {tok: i for i, tok in enumerate(ordered)}
    backend = Tokenizer(models.WordLevel(vocab=vocab, unk_token=UNK))
    backend.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    return PreTrainedTokenizerFast(
        tokenizer_object=backend,
        pad_token=PAD,
        unk_token=UNK,
        bos_token=BOS,
        eos_token=EOS,
        sep_token=SEP,
        extra_special_tokens=extra,
        clean_up_tokenization_spaces=False,
    )


def encode_words(tokenizer: PreTrainedTokenizerFast, words: Sequence[str] | str) -> list[int]:
    """Map each word (or each whitespace word of a string) to exactly one id; unknown words raise, never <unk>."""
    if isinstance(words, str):
        words = words.split()
    vocab = tokenizer.get_vocab()
    unknown = [w for w in words if w not in vocab]
    if unknown:
        shown = ", ".join(repr(w) for w in dict.fromkeys(unknown))
        raise VocabularyError(
            f"unknown word(s) {shown}: add them to the words passed to build_word_tokenizer"
        )
    return [vocab[w] for w in words]


def decode_ids(tokenizer: PreTrainedTokenizerFast, ids: Iterable[int]) -> list[str]:
    """Map ids back to their words one-to-one (specials included), so segment counts stay exact."""
    id_list = [int(i) for i in ids]
    size = len(tokenizer)
    bad = [i for i in id_list if i < 0 or i >= size]
    if bad:
        raise VocabularyError(f"id(s) {bad[:5]} outside the vocabulary of size {size}: check the model's vocab_size")
    return list(tokenizer.convert_ids_to_tokens(id_list))
