"""The one text layer: how user text becomes ids (and ids become words) for every method and every tokenizer.

One `TextLayer` per tokenizer covers the word-level zoo tokenizer (one id per word) and real subword tokenizers
(byte-level BPE `Ġ`, SentencePiece `▁`) alike:
- special roles (`Roles`) resolved from the tokenizer, the model config and its generation_config: bos may be
  absent, eos may be several ids, pad falls back (tokenizer pad -> generation_config pad -> eos_ids[0]) and
  records where it came from, never None;
- per-word segments that concatenate to exactly the ids the tokenizer gives the joined text;
- incremental word decoding (`WordDecoder`) for streaming writers that count in words;
- framing: the chat template when the tokenizer has one (and it is not turned off), else the plain format
  `[bos] prompt [sep]` where sep is the tokenizer's sep token, or the encoding of `PLAIN_SEPARATOR` ("\\n").
"""

from __future__ import annotations

import argparse
import weakref
from dataclasses import dataclass
from typing import Any, Iterable, Sequence

from brisklm.errors import BriskError, VocabularyError

PLAIN_SEPARATOR = "\n"  # prompt/completion separator of the plain format when the tokenizer has no sep token
_ANCHOR = "a"  # a word put before continuation text so its first word gets the mid-sentence (leading-space) form
_REPLY = "brisk_reply_marker"  # assistant text rendered once to find the chat template's end-of-turn token
_NO_TEMPLATE = ("a system prompt needs a chat template, but this tokenizer has none or it was turned off; "
                "drop --system-prompt or --no-chat-template")


@dataclass(frozen=True)
class Roles:
    """Special-token ids of one tokenizer + config: bos may be None, eos_ids has >= 1 id, pad_id is never None."""

    bos_id: int | None
    eos_ids: tuple[int, ...]
    pad_id: int
    pad_source: str  # "tokenizer", "generation_config" or "eos" (the fallback: eos_ids[0])
    sep_id: int | None
    unk_id: int | None
    end_of_turn_id: int | None  # the token that closes an assistant turn in the chat template, if there is one

    @property
    def eos_id(self) -> int:
        """The primary eos id (what a plain-format completion ends with)."""
        return self.eos_ids[0]


def _ids(value: Any) -> list[int]:
    """An eos/pad field (None, int or list of ints) as a list of ints."""
    if value is None:
        return []
    return [int(v) for v in value] if isinstance(value, (list, tuple)) else [int(value)]


def _as_ids(result: Any) -> list[int]:
    """`apply_chat_template(tokenize=True)` output (a list, or a dict/BatchEncoding) as a flat list of ids."""
    if hasattr(result, "keys"):
        result = result["input_ids"]
    if result and isinstance(result[0], (list, tuple)):
        result = result[0]
    return [int(i) for i in result]


def _check_words(words: Sequence[str]) -> list[str]:
    """Words must be non-empty strings without whitespace (one whitespace-separated word each)."""
    words = list(words)
    bad = [w for w in words if not isinstance(w, str) or not w or len(w.split()) != 1 or w != w.strip()]
    if bad:
        raise BriskError(f"invalid word(s) {bad[:3]!r}: words must be non-empty strings without whitespace")
    return words


def is_word_level(tokenizer) -> bool:
    """True for a WordLevel tokenizer (the zoo's): every whitespace word is exactly one id."""
    backend = getattr(tokenizer, "backend_tokenizer", None)
    return backend is not None and type(backend.model).__name__ == "WordLevel"


class TextLayer:
    """Text <-> ids for one tokenizer: roles, word segments, incremental decoding and prompt/completion framing."""

    def __init__(self, tokenizer, roles: Roles, chat_template: bool | str, system_prompt: str | None) -> None:
        self.tokenizer = tokenizer
        self.roles = roles
        self.word_level = is_word_level(tokenizer)
        if chat_template == "force" and not getattr(tokenizer, "chat_template", None):
            raise BriskError("--chat-template was passed but this tokenizer has no chat template; drop "
                             "--chat-template, or save a template with the tokenizer (tokenizer.chat_template)")
        self.chat_template = bool(chat_template and getattr(tokenizer, "chat_template", None))
        self.system_prompt = system_prompt
        if system_prompt and not self.chat_template:
            raise BriskError(_NO_TEMPLATE)
        self._specials = set(int(i) for i in getattr(tokenizer, "all_special_ids", ()))
        if roles.end_of_turn_id is not None:
            self._specials.add(roles.end_of_turn_id)

    @classmethod
    def from_tokenizer(cls, tokenizer, config=None, generation_config=None, chat_template: bool | str = True,
                       system_prompt: str | None = None) -> TextLayer:
        """Resolve the roles of `tokenizer` (with the model's config / generation_config when given);
        chat_template="force" requires the tokenizer to have one."""
        if tokenizer is None:
            raise BriskError("no tokenizer: save the tokenizer beside the model with save_pretrained")
        return cls(tokenizer, resolve_roles(tokenizer, config, generation_config), chat_template, system_prompt)

    @classmethod
    def for_model(cls, model, tokenizer, chat_template: bool | str = True,
                  system_prompt: str | None = None) -> TextLayer:
        """`from_tokenizer` with the model's own config and generation_config."""
        return cls.from_tokenizer(tokenizer, getattr(model, "config", None), getattr(model, "generation_config", None),
                                  chat_template, system_prompt)

    # ---- encoding -------------------------------------------------------------------------------------------
    def encode(self, text: str | Sequence[str], at_start: bool = True) -> list[int]:
        """Ids of text without specials: a word list is its joined words; a string is encoded as written.

        (On a word-level tokenizer a string is split on whitespace, one id per word.)
        """
        if isinstance(text, str) and not self.word_level:
            if at_start:
                return [int(i) for i in self.tokenizer(text, add_special_tokens=False)["input_ids"]]
            encoded = self.tokenizer(_ANCHOR + " " + text, add_special_tokens=False, return_offsets_mapping=True)
            return [int(i) for i, (start, _) in zip(encoded["input_ids"], encoded["offset_mapping"])
                    if start >= len(_ANCHOR)]
        words = text.split() if isinstance(text, str) else list(text)
        return [i for seg in self.word_segments(words, at_start) for i in seg]

    def word_segments(self, words: Sequence[str], at_start: bool = True) -> list[list[int]]:
        """One id list per word; together exactly `tokenizer(" ".join(words))` ids (no specials).

        `at_start=False` encodes words that continue earlier text, so the first word gets its mid-sentence form
        (`Ġcat` / `▁cat`, not `cat`). Word-level tokenizers give one id per word and raise VocabularyError on
        unknown words.
        """
        words = _check_words(words)
        if not words:
            return []
        if self.word_level:
            from brisklm.tasks.tokenizer import encode_words  # (lazy: keeps `brisk --help` free of transformers)

            return [[i] for i in encode_words(self.tokenizer, words)]
        prefix = "" if at_start else _ANCHOR + " "
        text = prefix + " ".join(words)
        owner = [-1] * len(_ANCHOR) if prefix else []  # owner[c]: word of character c (-1: the anchor)
        for index, word in enumerate(words):
            if index or prefix:
                owner.append(index)  # a space belongs to the word after it, as `Ġ` / `▁` do
            owner.extend([index] * len(word))
        encoded = self.tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
        segments: list[list[int]] = [[] for _ in words]
        for token, (start, end) in zip(encoded["input_ids"], encoded["offset_mapping"]):
            where = owner[min(start, len(owner) - 1)]
            if where < 0:
                if end > len(_ANCHOR):
                    raise BriskError("the tokenizer merges text across a word boundary; per-word segments are undefined")
                continue
            segments[where].append(int(token))
        empty = [words[i] for i, s in enumerate(segments) if not s]
        if empty:
            raise BriskError(f"word(s) {empty[:3]!r} got no token of their own: the tokenizer merges across words")
        return segments

    def first_token(self, word: str, at_start: bool = False) -> int:
        """The first id of one word (mid-sentence form by default): what a next-token prediction of it is."""
        return self.word_segments([word], at_start)[0][0]

    def text_ids(self, text: str) -> list[int]:
        """A raw sequence start `[bos] text` (bos only when the tokenizer has one), without framing."""
        return ([self.roles.bos_id] if self.roles.bos_id is not None else []) + self.encode(text)

    # ---- framing --------------------------------------------------------------------------------------------
    @property
    def separator_ids(self) -> list[int]:
        """Plain-format prompt/completion separator: the sep token, else the encoding of PLAIN_SEPARATOR."""
        if self.roles.sep_id is not None:
            return [self.roles.sep_id]
        return [int(i) for i in self.tokenizer(PLAIN_SEPARATOR, add_special_tokens=False)["input_ids"]]

    def prompt_ids(self, prompt: str, system: str | None = None) -> list[int]:
        """What the model reads before it writes: the chat frame with a generation prompt, else `[bos] prompt [sep]`."""
        system = self.system_prompt if system is None else system
        if self.chat_template:
            messages = ([{"role": "system", "content": system}] if system else []) + [{"role": "user", "content": prompt}]
            return _as_ids(self.tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=True))
        if system:
            raise BriskError(_NO_TEMPLATE)
        return self.text_ids(prompt) + self.separator_ids

    @property
    def end_id(self) -> int:
        """The id that ends a completion: the template's end-of-turn token when templating, else eos_ids[0]."""
        if self.chat_template and self.roles.end_of_turn_id is not None:
            return self.roles.end_of_turn_id
        return self.roles.eos_id

    @property
    def stop_ids(self) -> tuple[int, ...]:
        """Every id that ends a completion: each eos id, then `end_id` (the template's end of turn) if not among them."""
        return tuple(dict.fromkeys([*self.roles.eos_ids, self.end_id]))

    def completion_ids(self, completion: str) -> list[int]:
        """A completion's ids closed by `end_id` (it starts a new segment after the prompt frame)."""
        return self.encode(completion) + [self.end_id]

    def plain_ids(self, text: str) -> list[int]:
        """A plain LM sequence `[bos] text eos`."""
        return self.text_ids(text) + [self.roles.eos_id]

    # ---- decoding -------------------------------------------------------------------------------------------
    def cut_at_eos(self, ids: Iterable[int]) -> tuple[list[int], bool]:
        """Ids up to (not including) the first of any eos id, and whether one was found."""
        ids = [int(i) for i in ids]
        ends = set(self.stop_ids)
        for k, i in enumerate(ids):
            if i in ends:
                return ids[:k], True
        return ids, False

    def decode(self, ids: Iterable[int]) -> str:
        """Text of ids: words joined by single spaces for a word-level tokenizer, else the tokenizer's decode."""
        ids = self._checked(ids)
        if self.word_level:
            return " ".join(self.tokenizer.convert_ids_to_tokens(ids))
        return self.tokenizer.decode(ids, clean_up_tokenization_spaces=False)

    def words(self, ids: Iterable[int]) -> list[str]:
        """The words of a token stream, as a `WordDecoder` emits them."""
        decoder = self.decoder()
        out = [w for i in ids for w in decoder.feed(i)]
        return out + decoder.finish()

    def decoder(self) -> WordDecoder:
        """A fresh incremental decoder for one stream."""
        return WordDecoder(self)

    def _checked(self, ids: Iterable[int]) -> list[int]:
        ids = [int(i) for i in ids]
        size = len(self.tokenizer)
        bad = [i for i in ids if i < 0 or i >= size]
        if bad:
            raise VocabularyError(f"id(s) {bad[:5]} outside the vocabulary of size {size}: check the model's vocab_size")
        return ids

    def is_special(self, token_id: int) -> bool:
        return int(token_id) in self._specials

    # ---- capability checks ----------------------------------------------------------------------------------
    def require_word_level(self, what: str) -> None:
        """Refuse a method that still assumes one token per word on a subword tokenizer (one line, no trace)."""
        if not self.word_level:
            raise BriskError(f"{what} still assumes one token per word, but this tokenizer splits words into subword "
                             "tokens; use a model with a word-level tokenizer (a brisk zoo model) for now")


class WordDecoder:
    """Feed token ids one at a time; a word comes out once it is complete.

    Word-level tokenizers: every id is a whole word, emitted at once. Subword tokenizers: a word is complete when
    the next token starts a new word (its decoded text begins with whitespace) or at `finish()`. A special token
    (eos, end-of-turn) closes the pending word and is emitted as its own token string.
    """

    def __init__(self, text: TextLayer) -> None:
        self.text = text
        self.pending: list[int] = []

    def feed(self, token_id: int) -> list[str]:
        """Words completed by this token (0, 1 or 2 of them)."""
        token_id = self.text._checked([token_id])[0]
        tok = self.text.tokenizer
        if self.text.word_level:
            return [tok.convert_ids_to_tokens(token_id)]
        if self.text.is_special(token_id):
            return self._flush() + [tok.convert_ids_to_tokens(token_id)]
        if self.pending:
            before = tok.decode(self.pending, clean_up_tokenization_spaces=False)
            after = tok.decode(self.pending + [token_id], clean_up_tokenization_spaces=False)
            added = after[len(before):] if after.startswith(before) else after
            if added[:1].isspace():
                out = self._flush()
                self.pending = [token_id]
                return out
        self.pending.append(token_id)
        return []

    def finish(self) -> list[str]:
        """End of stream: the pending word, if any."""
        return self._flush()

    def _flush(self) -> list[str]:
        if not self.pending:
            return []
        word = self.text.tokenizer.decode(self.pending, clean_up_tokenization_spaces=False).strip()
        self.pending = []
        return [word] if word else []


def resolve_roles(tokenizer, config=None, generation_config=None) -> Roles:
    """Special roles from the tokenizer, config and generation_config (see the module docstring for the rules)."""
    configs = [c for c in (generation_config, config, getattr(config, "text_config", None)) if c is not None]
    bos = tokenizer.bos_token_id
    if getattr(tokenizer, "init_kwargs", {}).get("add_bos_token") is False:
        bos = None  # the tokenizer says it is not prepended
    end_of_turn = _end_of_turn(tokenizer)
    eos: list[int] = _ids(tokenizer.eos_token_id)
    for c in configs:
        eos += _ids(getattr(c, "eos_token_id", None))
    eos += _ids(end_of_turn)
    eos_ids = tuple(dict.fromkeys(eos))
    if not eos_ids:
        raise BriskError("the tokenizer has no end-of-sequence token and the config no eos_token_id; set "
                         "tokenizer.eos_token (e.g. '</s>') and save it with save_pretrained")
    if tokenizer.pad_token_id is not None:
        pad, source = int(tokenizer.pad_token_id), "tokenizer"
    elif generation_config is not None and _ids(getattr(generation_config, "pad_token_id", None)):
        pad, source = _ids(generation_config.pad_token_id)[0], "generation_config"
    else:
        pad, source = eos_ids[0], "eos"
    return Roles(bos_id=None if bos is None else int(bos), eos_ids=eos_ids, pad_id=pad, pad_source=source,
                 sep_id=tokenizer.sep_token_id, unk_id=tokenizer.unk_token_id, end_of_turn_id=end_of_turn)


def _end_of_turn(tokenizer) -> int | None:
    """The special token a chat template puts right after an assistant reply (`<|im_end|>`, `<|eot_id|>`, ...)."""
    if not getattr(tokenizer, "chat_template", None):
        return None
    messages = [{"role": "user", "content": "hello"}, {"role": "assistant", "content": _REPLY}]
    try:
        rendered = tokenizer.apply_chat_template(messages, tokenize=False)
    except Exception:  # noqa: BLE001  (a template that cannot render a plain exchange has no usable end-of-turn)
        return None
    at = rendered.rfind(_REPLY)
    if at < 0:
        return None
    tail = tokenizer(rendered[at + len(_REPLY):], add_special_tokens=False)["input_ids"]
    specials = set(getattr(tokenizer, "all_special_ids", ()))
    added = {int(i) for i, t in getattr(tokenizer, "added_tokens_decoder", {}).items() if getattr(t, "special", False)}
    return next((int(i) for i in tail if i in specials or i in added), None)


_CACHE: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def text_layer(tokenizer) -> TextLayer:
    """The default text layer of a tokenizer (chat template on, no system prompt, tokenizer roles), cached."""
    layer = _CACHE.get(tokenizer)
    if layer is None:
        layer = _CACHE[tokenizer] = TextLayer.from_tokenizer(tokenizer)
    return layer


def as_text_layer(tokenizer_or_text) -> TextLayer:
    """A TextLayer given either one (returned as is) or a tokenizer (its cached default layer)."""
    return tokenizer_or_text if isinstance(tokenizer_or_text, TextLayer) else text_layer(tokenizer_or_text)


def word_ids(tokenizer, words: Sequence[str] | str) -> list[int]:
    """One id per word, for methods that still assume one token per word (streaming): a subword tokenizer is refused."""
    text = as_text_layer(tokenizer)
    text.require_word_level("this streaming method")
    return text.encode(words if isinstance(words, str) else list(words))


def add_text_args(parser: argparse.ArgumentParser) -> None:
    """`--no-chat-template` and `--system-prompt` for commands that frame user prompts."""
    parser.add_argument("--no-chat-template", dest="chat_template", action="store_false",
                        help="frame prompts as plain text ([bos] prompt [sep]) even if the tokenizer has a chat template")
    parser.add_argument("--chat-template", dest="chat_template", action="store_const", const="force",
                        help="require the tokenizer's chat template (an error if it has none; default: use it if present)")
    parser.add_argument("--system-prompt", default=None,
                        help="system message put before the prompt through the chat template")


def text_options(args: argparse.Namespace) -> dict[str, Any]:
    """The TextLayer keyword arguments set by `add_text_args` (defaults when a command lacks them)."""
    return {"chat_template": getattr(args, "chat_template", True), "system_prompt": getattr(args, "system_prompt", None)}
