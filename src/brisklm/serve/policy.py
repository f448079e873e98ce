"""The per-session policy protocol of the server, and GPE wait-k as its first (batchable) implementation.

A server session owns one policy. The minimal protocol is two calls: `on_words(words) -> items` when source
words arrive and `on_end() -> items` when the source ends; an item is one thing to send (a target word, a
reasoning unit, the end). Any streaming method (learned read/write heads, StreamingThinker) plugs in by
implementing those two calls and registering a factory with `register_policy`.

A policy may also expose the *stepping* interface (`push`, `push_end`, `next_step`, `apply_step`, `engine`):
it then never runs the model itself; the scheduler collects the pending steps of many sessions and runs each
kind (read / close / write) as one batched engine call (serve/batching.py). `on_words`/`on_end` of such a
policy run the same steps alone, so both paths share one decision procedure.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any, Callable, Protocol, Sequence, runtime_checkable

from brisklm.core.text import word_ids
from brisklm.errors import BriskError
from brisklm.streaming.engine import StreamingSession
from brisklm.streaming.gpe import check_k
from brisklm.streaming.policies import reads_before, target_limit

READ, CLOSE, WRITE = "read", "close", "write"


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


def make_policy(name: str, model, tokenizer, **options: Any) -> SessionPolicy:
    """A fresh policy instance for one session."""
    if name not in _POLICIES:
        load_plugins()
    if name not in _POLICIES:
        raise BriskError(f"unknown policy {name!r}: choose one of {', '.join(policy_names())}")
    return _POLICIES[name][0](model, tokenizer, **options)


def is_stepping(policy: object) -> bool:
    """Whether the scheduler may batch this policy's engine steps with other sessions."""
    return all(hasattr(policy, a) for a in ("push", "push_end", "next_step", "apply_step", "engine"))


class GpeWaitKPolicy:
    """GPE wait-k on a one-stream StreamingSession, with the exact read/close/write order of `gpe_wait_k`.

    Source words are buffered and fed to the engine only when wait-k needs them (a target row sees exactly the
    source read so far), so the output equals the offline `gpe_wait_k` run on the whole sentence.
    """

    name = "wait-k"

    def __init__(self, model, tokenizer, k: int = 3, phi: int = 0) -> None:
        self.k = check_k(k)
        self.tokenizer = tokenizer
        self.engine = StreamingSession(model, tokenizer, 1, phi=phi)
        self.vocab = tokenizer.get_vocab()
        self.buffer: list[str] = []  # received, not yet read by the engine
        self.arrivals: list[float] = []  # perf_counter() of each buffered word
        self.received = 0
        self.ended = False
        self.end_at = 0.0
        self.extra = 0  # words read beyond wait-k because the model wanted to end early
        self.unlocked_at = 0.0
        self.finished = False

    # ----------------------------------------------------------------------------------- stepping interface
    def check_words(self, words: Sequence[str]) -> None:
        word_ids(self.tokenizer, list(words))  # raises naming unknown words / a subword tokenizer

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

    def next_step(self) -> Step | None:
        """The engine step wait-k takes next, or None while it waits for input (or has finished)."""
        s = self.engine
        if self.finished:
            return None
        if s.done[0]:
            return Step("finish")
        have = s.words_read(0)
        need = reads_before(self.k, len(s.outputs[0].words) + 1, 10**9) + self.extra
        if have >= need:
            return Step(WRITE)
        if have + len(self.buffer) >= need:
            return Step(READ, self.buffer[:need - have])
        if not self.ended:
            return None
        if self.buffer:
            return Step(READ, list(self.buffer))
        if not s.closed[0]:
            return Step(CLOSE)
        return Step(WRITE)

    def apply_step(self, step: Step, written: str | None = None) -> list[Item]:
        """Book-keeping after the engine ran `step` (alone or batched; `written` = the word a write gave)."""
        s, out = self.engine, self.engine.outputs[0]
        if step.kind == READ:
            n = len(step.words)
            self.unlocked_at = max(self.unlocked_at, self.arrivals[n - 1])
            del self.buffer[:n], self.arrivals[:n]
            return []
        if step.kind == CLOSE:
            self.unlocked_at = max(self.unlocked_at, self.end_at)
            return []
        if step.kind == "finish":
            self.finished = True
            out.source_words = self.received
            return [Item("end", out.text, out.delays[-1] if out.delays else self.received, len(out.words),
                         self.unlocked_at, {"truncated": out.truncated})]
        items: list[Item] = []
        if s.wants_read[0]:
            self.extra += 1  # the model predicted its end before the source ended: read one more word
        elif written is not None:
            items.append(Item("word", out.words[-1], out.delays[-1], len(out.words), self.unlocked_at))
        if not s.done[0] and s.closed[0] and len(out.words) >= target_limit(self.received):
            s.done[0], out.truncated = True, True
        return items

    def run_step(self, step: Step) -> list[Item]:
        """Run one step on this session's own engine (the unbatched path)."""
        written = None
        if step.kind == READ:
            self.engine.read(step.words)
        elif step.kind == CLOSE:
            self.engine.close()
        elif step.kind == WRITE:
            written = self.engine.write()[0]
        return self.apply_step(step, written)

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
        return self.drain()

    def memory_bytes(self) -> int:
        return self.engine.source_cache.nbytes() + self.engine.target_cache.nbytes()


def _wait_k_factory(model, tokenizer, k: int = 3, phi: int = 0, **unused: Any) -> GpeWaitKPolicy:
    if unused:
        raise BriskError(f"policy wait-k takes options k and phi, not {', '.join(sorted(unused))}")
    return GpeWaitKPolicy(model, tokenizer, k=k, phi=phi)


register_policy("wait-k", _wait_k_factory, "GPE wait-k on the two-cache engine (every token encoded once)")
