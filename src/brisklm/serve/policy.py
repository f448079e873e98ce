"""The per-session policy protocol of the server, and GPE wait-k as its first (batchable) implementation.

A server session owns one policy. The minimal protocol is two calls: `on_words(words) -> items` when source
words arrive and `on_end() -> items` when the source ends; an item is one thing to send (a target word, a
reasoning unit, the end). Any streaming method (learned read/write heads, StreamingThinker) plugs in by
implementing those two calls and registering a factory with `register_policy`.

A `SlotPolicy` (wait-k here, the decision heads in method_policies.py, the text thinker in thinker_slots.py)
never runs the model itself: it holds a slot of a persistent batched engine (serve/slots.py), and the scheduler
runs the pending steps of all slots of an engine as one call per kind (read / close / write). `on_words`/`on_end` of such a policy run the same steps
alone, so both paths share one decision procedure.
"""

from __future__ import annotations

import inspect
import time
from dataclasses import dataclass, field
from typing import Any, Callable, Protocol, Sequence, runtime_checkable

from brisklm.core.text import TextLayer
from brisklm.errors import BriskError
from brisklm.streaming.gpe import check_k, word_segments
from brisklm.streaming.policies import reads_before, target_limit, token_limit

JOIN, READ, CLOSE, WRITE, FINISH = "join", "read", "close", "write", "finish"


@dataclass
class Item:
    """One output unit: kind 'word' (target word), 'reason' (a reasoning unit) or 'end'; delay = source words read."""

    kind: str
    text: str = ""
    delay: int = 0
    index: int = 0
    unlocked_at: float = 0.0  # perf_counter() of the input that made this item possible
    extra: dict[str, Any] = field(default_factory=dict)


@dataclass
class Step:
    """One engine step a stepping policy wants next: read `words`, close the source, or write one word."""

    kind: str
    words: list[str] = field(default_factory=list)


@runtime_checkable
class SessionPolicy(Protocol):
    """What the server needs from a streaming method: source words in, output items out."""

    name: str

    def check_words(self, words: Sequence[str]) -> None:
        """Raise BriskError (e.g. VocabularyError) for words this policy cannot read, before anything runs."""

    def on_words(self, words: Sequence[str]) -> list[Item]:
        """Take newly arrived source words; return the items written in response."""

    def on_end(self) -> list[Item]:
        """The source has ended; return every remaining item (the last one of kind 'end')."""

    def memory_bytes(self) -> int:
        """Bytes of model state (KV caches) held for this session."""


PolicyFactory = Callable[..., SessionPolicy]
_POLICIES: dict[str, tuple[PolicyFactory, str]] = {}


def register_policy(name: str, factory: PolicyFactory, description: str = "") -> None:
    """Make `factory(model, tokenizer, **options) -> SessionPolicy` available as `--policy NAME`."""
    _POLICIES[name] = (factory, description)


# Modules that register more policies when imported (absent ones are skipped): streaming methods add theirs
# there, e.g. `register_policy("proactive", ProactiveHeadsPolicy)`, without the server importing them directly.
PLUGIN_MODULES = ("brisklm.serve.method_policies",)


def load_plugins() -> None:
    """Import PLUGIN_MODULES so their `register_policy` calls run; a missing module is not an error."""
    import importlib

    for name in PLUGIN_MODULES:
        try:
            importlib.import_module(name)
        except ModuleNotFoundError as error:
            if error.name is None or not name.startswith(error.name):
                raise


def policy_names() -> list[str]:
    """Registered policy names (plugins included)."""
    load_plugins()
    return sorted(_POLICIES)


def make_policy(name: str, model, tokenizer, *, engines=None, **options: Any) -> SessionPolicy:
    """A fresh policy instance for one session; `engines` (a serve.slots.EnginePool) batches it with others."""
    if name not in _POLICIES:
        load_plugins()
    if name not in _POLICIES:
        raise BriskError(f"unknown policy {name!r}: choose one of {', '.join(policy_names())}")
    factory = _POLICIES[name][0]
    if engines is not None and "engines" in inspect.signature(factory).parameters:  # a slot policy's factory
        options = {**options, "engines": engines}
    return factory(model, tokenizer, **options)


def is_stepping(policy: object) -> bool:
    """Whether the scheduler may batch this policy's engine steps with other sessions (a SlotPolicy)."""
    return isinstance(policy, SlotPolicy)


def combined_gate(policies: Sequence["SlotPolicy"]):
    """One write gate for the slots of one batched call: each policy decides its own row; a signal (entropy,
    attention mass, probe score) is computed once per call over all rows and shared through `signals`."""
    if all(type(p).allow is SlotPolicy.allow for p in policies):
        return None
    by_row = {p.row: p for p in policies}

    def gate(session, logits) -> list[bool]:
        signals: dict = {}
        return [by_row[b].allow(session, logits, signals) if b in by_row else True for b in range(session.batch_size)]

    return gate


class SlotPolicy:
    """The batched part every engine policy shares: a slot on a `SlotEngine`, the received-but-unread source
    words, and the items (target words) not yet sent. Subclasses say which step comes next (`next_step`),
    whether a written row may stand (`allow`) and what a step means for them (`after_write`).

    The slot is taken lazily (step 'join', run by the scheduler between engine calls), so creating a policy
    never touches an engine another thread may be stepping; `release()` gives it back.
    """

    name = "slot"
    needs_attention = False

    def __init__(self, model, tokenizer, *, phi: int = 0, engines=None) -> None:
        from brisklm.serve.slots import EnginePool

        self.text = tokenizer if isinstance(tokenizer, TextLayer) else TextLayer.for_model(model, tokenizer)
        self.tokenizer = self.text.tokenizer
        self.pool = engines if engines is not None else EnginePool(model, self.text)
        self.phi = phi
        self.slot = None
        self._engine = None  # the SlotEngine of the slot, once joined
        self.buffer: list[str] = []  # received, not yet read by the engine
        self.arrivals: list[float] = []  # perf_counter() of each buffered word
        self.received = 0
        self.ended = self.finished = False
        self.end_at = self.unlocked_at = 0.0
        self.emitted = 0  # target words already turned into items

    # ----------------------------------------------------------------------------------- the slot
    @property
    def engine(self):
        """The slot engine this policy runs on (steps are batched with every other slot of it); before the
        join, the engine it would join."""
        return self._engine if self._engine is not None else self.pool.engine(self.phi)

    @property
    def row(self) -> int:
        return self.slot.index

    def join(self) -> None:
        if self.slot is None:
            self._engine = self.pool.engine(self.phi)
            self.slot = self._engine.acquire()

    def release(self) -> None:
        if self.slot is not None:
            self.slot.release()

    def memory_bytes(self) -> int:
        return 0 if self.slot is None else self.engine.memory_bytes(self.slot)

    # ----------------------------------------------------------------------------------- input
    def check_words(self, words: Sequence[str]) -> None:
        """Every word must encode through the text layer without the unknown token (VocabularyError names it)."""
        word_segments(self.text, list(words), at_start=False)

    def push(self, words: Sequence[str], at: float | None = None) -> None:
        """Buffer arrived source words (no model work)."""
        if self.ended:
            raise BriskError("the source already ended: send no words after 'end'")
        now = time.perf_counter() if at is None else at
        self.buffer += list(words)
        self.arrivals += [now] * len(words)
        self.received += len(words)

    def push_end(self, at: float | None = None) -> None:
        """Mark the end of the source (no model work)."""
        if self.ended:
            raise BriskError("the source already ended: send 'end' once")
        if self.received == 0:
            raise BriskError("the source is empty: send at least one word before 'end'")
        self.ended, self.end_at = True, time.perf_counter() if at is None else at

    def _more(self) -> bool | None:
        """Whether source words remain: True/False once known, None while neither a word nor the end has come."""
        if self.buffer:
            return True
        return False if self.ended else None

    # ----------------------------------------------------------------------------------- steps
    def next_step(self) -> Step | None:
        """The step this session takes next, or None while it waits for input (or has finished)."""
        if self.finished:
            return None
        if self.slot is None:
            return Step(JOIN) if (self.buffer or self.ended) else None
        if self.engine.session.done[self.row]:
            return Step(FINISH)
        return self.decide()

    def decide(self) -> Step | None:
        raise NotImplementedError

    def allow(self, session, logits, signals: dict) -> bool:
        """After a write's forward: may the row stand (WRITE), or is it retracted (READ)? Default: write."""
        return True

    def forbid_end(self) -> bool:
        """Mask the end markers while the source is open (the heads' rule; wait-k reads more instead)."""
        return False

    def apply_step(self, step: Step) -> list[Item]:
        """Book-keeping after the engine ran `step` (alone or batched with other slots)."""
        e = self.engine.session
        if step.kind == READ:
            n = len(step.words)
            self.unlocked_at = max(self.unlocked_at, self.arrivals[n - 1])
            del self.buffer[:n], self.arrivals[:n]
            return []
        if step.kind == CLOSE:
            self.unlocked_at = max(self.unlocked_at, self.end_at)
            return []
        if step.kind == FINISH:
            self.finished = True
            out = e.outputs[self.row]
            out.source_words = self.received
            items = self._new_words()
            return items + [Item("end", out.text, out.delays[-1] if out.delays else self.received, len(out.words),
                                 self.unlocked_at, {"truncated": out.truncated})]
        if step.kind == WRITE:
            self.after_write()
        return self._new_words()

    def after_write(self) -> None:
        """Rules that run after each write of this slot (caps, extra reads)."""

    def _new_words(self) -> list[Item]:
        out = self.engine.session.outputs[self.row]
        items = [Item("word", w, d, i + 1, self.unlocked_at)
                 for i, (w, d) in enumerate(zip(out.words, out.delays)) if i >= self.emitted]
        self.emitted = len(out.words)
        return items

    def run_step(self, step: Step) -> list[Item]:
        """Run one step on this slot alone (the unbatched path)."""
        if step.kind == JOIN:
            self.join()
            return []
        if step.kind == READ:
            self.engine.read({self.slot: step.words})
        elif step.kind == CLOSE:
            self.engine.close([self.slot])
        elif step.kind == WRITE:
            gate = None if type(self).allow is SlotPolicy.allow else (
                lambda s, logits: [self.allow(s, logits, {}) if b == self.row else True for b in range(s.batch_size)])
            self.engine.write([self.slot], gate=gate, forbid_early_end={self.slot: self.forbid_end()},
                              record_attention=self.needs_attention)
        return self.apply_step(step)

    def drain(self) -> list[Item]:
        """Run steps alone until the policy waits for input or finishes."""
        items: list[Item] = []
        while (step := self.next_step()) is not None:
            items += self.run_step(step)
        return items

    # ----------------------------------------------------------------------------------- minimal protocol
    def on_words(self, words: Sequence[str]) -> list[Item]:
        self.check_words(words)
        self.push(words)
        return self.drain()

    def on_end(self) -> list[Item]:
        self.push_end()
        items = self.drain()
        if self.finished:
            self.release()
        return items


class GpeWaitKPolicy(SlotPolicy):
    """GPE wait-k on a slot, with the read/close/write order of `gpe_wait_k` on any tokenizer (k counts source
    words; a target word's delay is taken at its first token), so the output equals the offline run.

    Source words are buffered and fed to the engine only when wait-k needs them (a target row sees exactly the
    source read so far)."""

    name = "wait-k"

    def __init__(self, model, tokenizer, k: int = 3, phi: int = 0, engines=None) -> None:
        super().__init__(model, tokenizer, phi=phi, engines=engines)
        self.k = check_k(k)
        self.extra = 0  # words read beyond wait-k because the model wanted to end early

    def decide(self) -> Step | None:
        s, b = self.engine.session, self.row
        have = s.words_read(b)
        need = reads_before(self.k, s.words_started(b) + 1, 10**9) + self.extra
        if have >= need:
            return self._write_or_hold(s, b)
        if have + len(self.buffer) >= need:
            return Step(READ, self.buffer[:need - have])
        if not self.ended:
            return None
        if self.buffer:
            return Step(READ, list(self.buffer))
        if not s.closed[b]:
            return Step(CLOSE)
        return Step(WRITE)

    def _write_or_hold(self, s, b) -> Step | None:
        # a word that never completes (subword runaway) waits for more source instead of writing without end;
        # offline wait-k would not read more while that word is open either, so the output stays the same
        if not s.closed[b] and len(s.written[b]) >= token_limit(self.received):
            return None
        return Step(WRITE)

    def after_write(self) -> None:
        s, b = self.engine.session, self.row
        if s.wants_read[b]:
            self.extra += 1  # the model predicted its end before the source ended: read one more word
        if not s.done[b] and s.closed[b] and (s.words_started(b) >= target_limit(self.received)
                                              or len(s.written[b]) >= token_limit(self.received)):
            s.stop(b)


def _wait_k_factory(model, tokenizer, k: int = 3, phi: int = 0, engines=None, **unused: Any) -> GpeWaitKPolicy:
    if unused:
        raise BriskError(f"policy wait-k takes options k and phi, not {', '.join(sorted(unused))}")
    if isinstance(phi, bool) or not isinstance(phi, int) or phi < 0:
        raise BriskError(f"policy wait-k option phi must be an integer >= 0, got {phi!r}")
    return GpeWaitKPolicy(model, tokenizer, k=k, phi=phi, engines=engines)


register_policy("wait-k", _wait_k_factory, "GPE wait-k on the two-cache engine (every token encoded once)")
