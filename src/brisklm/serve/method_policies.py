"""Server policies of the streaming methods: ProactiveLLM decision heads and StreamingThinker, for `brisk serve`.

Imported by serve/policy.py (PLUGIN_MODULES); registers:

* `entropy`, `attention`, `probe`: a decision head chooses READ or WRITE, with the rules of
  `heads.live_decode` on word-level models and of `subword.head_decode` on subword ones (same words and
  delays: a head decides only where a target word starts). Options: threshold (default per head, as `brisk
  stream translate`), min_lag, phi, max_words. The probe is loaded once per model folder from the checkpoint
  the server serves (e.g. translate-proactive); clients cannot name files.
* `thinker`: on a subword checkpoint, the text thinker (serve/thinker_slots.py; options max_unit_tokens,
  max_final_tokens). On a word-level thinker zoo model (streaming-thinker): the source is the
  question ending with '?' and then facts each ending with '.'; a `reason` frame carries each reasoning unit
  the moment its segment is complete, and at the end a `reason` frame with the final segment (extra fields
  final=true, answer) and the answer as the session's one target word (so `done.words == [answer]`). Options:
  depth (D1/D2/D3, default D2), mode (streaming/batch), max_unit_tokens, max_final_tokens.

All are slot policies: their engine steps run batched with every other session of the same engine (wait-k
sessions included, for the heads), and each head's signal is computed once per batched write. The thinkers
run on thinker slot engines (serve/thinker_slots.py; the zoo models' steps in serve/zoo_thinker_slots.py).
"""

from __future__ import annotations

import math
import threading
from pathlib import Path
from typing import Any, Sequence

from brisklm.core.text import TextLayer, as_text_layer
from brisklm.errors import BriskError
from brisklm.serve.policy import CLOSE, FINISH, READ, WRITE, Item, SlotPolicy, Step, register_policy

HEAD_POLICIES = ("entropy", "attention", "probe")
DEFAULT_THRESHOLDS = {"entropy": 0.5, "attention": 0.3, "probe": 0.5}  # as `brisk stream translate`

_PROBES: dict[str, Any] = {}
_PROBES_LOCK = threading.Lock()


def _number(name: str, value: Any, policy: str) -> float:
    """A finite number option, or a BriskError naming the option and the policy."""
    if isinstance(value, bool) or not isinstance(value, (int, float)) or math.isnan(float(value)):
        raise BriskError(f"policy {policy} option {name} must be a number, got {value!r}")
    return float(value)


def _positive_int(name: str, value: Any, policy: str, minimum: int = 1) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise BriskError(f"policy {policy} option {name} must be an integer >= {minimum}, got {value!r}")
    return value


def _reject_unknown(policy: str, unused: dict[str, Any], known: Sequence[str]) -> None:
    if unused:
        raise BriskError(f"policy {policy} takes options {', '.join(known)}, not {', '.join(sorted(unused))}")


def model_folder(model) -> Path:
    """The checkpoint folder a served model was loaded from (where its decision probe lives)."""
    path = getattr(model, "name_or_path", "") or getattr(getattr(model, "config", None), "_name_or_path", "")
    if not path or not Path(path).is_dir():
        raise BriskError("the probe policy needs a model loaded from a checkpoint folder (zoo.store.load); "
                         "use --policy entropy or attention for this model")
    return Path(path)


def served_head(name: str, model):
    """The decision head `name`; the probe head's probe is read once per checkpoint folder and shared."""
    from brisklm.streaming.proactive.heads import Head, load_probe

    if name != "probe":
        return Head(name)
    folder = str(model_folder(model).resolve())
    with _PROBES_LOCK:
        if folder not in _PROBES:
            _PROBES[folder] = load_probe(folder)
        return Head("probe", _PROBES[folder])


# ------------------------------------------------------------------------------------------------ decision heads
class HeadPolicy(SlotPolicy):
    """One stream decoded by a ProactiveLLM decision head, batched with every other slot of its engine.

    The rules are `live_decode`'s (same words and delays on word-level models): word j is not written before
    min(j + min_lag - 1, n) source words are read; at each write the head's gate decides WRITE or READ (a READ
    retracts the row, and the next source word - or the end marker - is read); the end markers are masked while
    more source may come; after the source is closed the model always writes. `live_decode` peeks one word
    ahead to know whether the source goes on: here that look-ahead is the buffer of received words, and where
    it would block, the policy waits for the next message.

    Subword models follow `subword.head_decode`: the head decides only at a row whose greedy token would start
    a target word (or end the target); a token continuing the open word is always written, with no read; and
    word j is not started before j + min_lag - 1 source words are read while source remains. The length caps
    are head_decode's, counted on the whole source: while it may go on, a stream at a cap waits for more.
    """

    def __init__(self, model, tokenizer, head, threshold: float, *, min_lag: int = 1, phi: int = 0,
                 max_words: int = 256, engines=None) -> None:
        super().__init__(model, tokenizer, phi=phi, engines=engines)
        self.name = head.name
        self.head, self.threshold, self.min_lag, self.max_words = head, threshold, min_lag, max_words
        self.needs_attention = head.needs_attention
        self.read_next = False  # the gate chose READ: the next step reads one word (or closes)

    def _read_one(self) -> Step | None:
        more = self._more()
        if more is None:
            return None
        return Step(READ, self.buffer[:1]) if more else Step(CLOSE)

    def _cap(self) -> str | None:
        """head_decode's length caps: 'stop' when reached for good, 'hold' when reached for the source received
        so far while more may come (the cap grows with the source), None otherwise."""
        from brisklm.streaming.policies import target_limit, token_limit

        s, b = self.engine.session, self.row
        if s.words_started(b) >= self.max_words:
            return "stop"
        if s.words_started(b) >= target_limit(self.received) or len(s.written[b]) >= token_limit(self.received):
            return "stop" if self.ended else "hold"
        return None

    def decide(self) -> Step | None:
        s, b = self.engine.session, self.row
        cap = self._cap()
        if cap == "stop":
            s.stop(b)
            return Step(FINISH)
        if self.read_next and not s.closed[b]:
            return self._read_one()
        more = self._more()
        if more is None or cap == "hold":  # a write must know whether source remains (end mask, floor)
            return None
        # the floor before a word can start: with no word open, every token starts one (or ends the target),
        # so the READ head_decode's gate would choose after the forward is taken before it (same outputs)
        if more and not s.closed[b] and not s.target_words[b].open and \
                s.words_read(b) < s.words_started(b) + self.min_lag:
            return Step(READ, self.buffer[:1])
        return Step(WRITE)

    def forbid_end(self) -> bool:
        return bool(self._more())

    def allow(self, session, logits, signals: dict) -> bool:
        from brisklm.streaming.proactive.subword import starts_word

        b = self.row
        if session.closed[b] or not starts_word(session, b, int(logits[b].argmax())):
            return True  # after the source ended, or inside a word: always write
        if self._more() and session.words_read(b) < session.words_started(b) + self.min_lag:
            return False  # the floor: the next word needs more source first
        key = (self.head.name, id(self.head.probe))
        if key not in signals:  # one signal computation per batched write and head kind
            signals[key] = self.head.signal(session, logits)
        return self.head.writes(signals[key][b:b + 1], self.threshold)[0]

    def apply_step(self, step: Step) -> list[Item]:
        if step.kind in (READ, CLOSE):
            self.read_next = False
        return super().apply_step(step)

    def after_write(self) -> None:
        s, b = self.engine.session, self.row
        self.read_next = bool(s.wants_read[b]) and not s.closed[b]
        if not s.done[b] and self._cap() == "stop":
            s.stop(b)


def _head_factory(name: str):
    known = ("threshold", "min_lag", "phi", "max_words")

    def factory(model, tokenizer, threshold: Any = None, min_lag: Any = 1, phi: Any = 0, max_words: Any = 256,
                engines=None, **unused: Any) -> HeadPolicy:
        _reject_unknown(name, unused, known)
        value = DEFAULT_THRESHOLDS[name] if threshold is None else _number("threshold", threshold, name)
        return HeadPolicy(model, tokenizer, served_head(name, model), value,
                          min_lag=_positive_int("min_lag", min_lag, name),
                          phi=_positive_int("phi", phi, name, minimum=0),
                          max_words=_positive_int("max_words", max_words, name), engines=engines)

    return factory


# ------------------------------------------------------------------------------------------------ StreamingThinker
def _served_folder(model) -> Path | None:
    path = getattr(model, "name_or_path", "") or getattr(getattr(model, "config", None), "_name_or_path", "")
    return Path(path) if path and Path(path).is_dir() else None


def _thinker_factory(model, tokenizer, depth: Any = None, mode: Any = None, max_unit_tokens: Any = None,
                     max_final_tokens: Any = None, engines=None, **unused: Any):
    """The zoo thinker protocol on a thinker zoo model (word-level), else the text thinker of any subword
    checkpoint; both batched across sessions on thinker slot engines (serve/thinker_slots.py)."""
    text = as_text_layer(tokenizer)
    if not text.word_level:
        from brisklm.serve.thinker_slots import TextThinkerPolicy
        from brisklm.streaming.thinker.text import load_settings, unit_end

        _reject_unknown("thinker", unused, ("max_unit_tokens", "max_final_tokens"))
        if depth is not None or mode is not None:
            raise BriskError("policy thinker options depth and mode apply to the word-level thinker zoo models; "
                             "on this checkpoint pass only max_unit_tokens and max_final_tokens")
        folder = _served_folder(model)
        settings = load_settings(folder) if folder is not None else {}
        if settings.get("chat_template") is False and text.chat_template:  # trained on the plain layout: keep it
            text = TextLayer.for_model(model, text.tokenizer, chat_template=False)
        marker = unit_end(text, settings.get("unit_end"))[1]
        return TextThinkerPolicy(
            model, text, marker,
            max_unit_tokens=_positive_int("max_unit_tokens", 48 if max_unit_tokens is None else max_unit_tokens,
                                          "thinker"),
            max_final_tokens=_positive_int("max_final_tokens", 128 if max_final_tokens is None else max_final_tokens,
                                           "thinker"),
            engines=engines)
    _reject_unknown("thinker", unused, ("depth", "mode", "max_unit_tokens", "max_final_tokens"))
    depth, mode = "D2" if depth is None else depth, "streaming" if mode is None else mode
    if not isinstance(depth, str) or not isinstance(mode, str):
        raise BriskError("policy thinker options depth and mode must be strings (e.g. depth D2, mode streaming)")
    from brisklm.serve.zoo_thinker_slots import ZooThinkerPolicy

    return ZooThinkerPolicy(model, text, depth, mode,
                            max_unit_tokens=_positive_int("max_unit_tokens", 12 if max_unit_tokens is None
                                                          else max_unit_tokens, "thinker"),
                            max_final_tokens=_positive_int("max_final_tokens", 64 if max_final_tokens is None
                                                           else max_final_tokens, "thinker"),
                            engines=engines)


for _name, _what in (("entropy", "WRITE when the predictive entropy <= threshold (nats)"),
                     ("attention", "WRITE when the attention mass on the newest source word <= threshold"),
                     ("probe", "WRITE when the self-labelled probe's P(sufficient) >= threshold")):
    register_policy(_name, _head_factory(_name), f"ProactiveLLM decision head: {_what}")
register_policy("thinker", _thinker_factory,
                "StreamingThinker: a reasoning unit per fact ('reason' frames), then the final segment and answer")
