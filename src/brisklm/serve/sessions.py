"""Server sessions and their limits: how many at once, how much source, how long, how much model memory."""

from __future__ import annotations

import asyncio
import itertools
import time
from dataclasses import asdict, dataclass, field
from typing import Any

from brisklm.core.text import TextLayer
from brisklm.errors import BriskError
from brisklm.eval.latency import average_lagging
from brisklm.serve.policy import Item, SessionPolicy, is_stepping, make_policy
from brisklm.serve.protocol import ProtocolError
from brisklm.serve.slots import EnginePool


@dataclass
class Limits:
    """Per-server and per-session limits; every breach is answered with an error frame, never a crash."""

    max_sessions: int = 64
    max_source_words: int = 200
    max_message_bytes: int = 16384
    max_session_seconds: float = 300.0
    max_memory_bytes: int = 64 * 2**20
    max_batch: int = 64

    def check(self) -> "Limits":
        for name, value in asdict(self).items():
            if value <= 0:
                raise BriskError(f"serve limit {name} must be positive, got {value}")
        return self


@dataclass
class ServerSession:
    """One client's stream: its policy, input not yet given to the policy, and frames waiting to be sent."""

    id: str
    policy: SessionPolicy
    policy_name: str
    options: dict[str, Any]
    outbox: asyncio.Queue
    started: float = field(default_factory=time.perf_counter)
    inbox: list[tuple[str, list[str], float]] = field(default_factory=list)
    received: int = 0
    ended: bool = False
    acked: int = -1
    finished: bool = False
    closed: bool = False
    engine_seconds: float = 0.0
    text_tail: str = ""  # the unfinished last word of chunked text

    @property
    def stepping(self) -> bool:
        return is_stepping(self.policy)

    def has_work(self) -> bool:
        """Input waiting, or a stepping policy with an engine step to take."""
        if self.closed or self.finished:
            return False
        return bool(self.inbox) or (self.stepping and self.policy.next_step() is not None)


class SessionManager:
    """Creates and frees sessions under `Limits`; the scheduler only sees sessions registered here."""

    def __init__(self, model, tokenizer, policy: str, options: dict[str, Any], limits: Limits,
                 instruction: str | None = None, batching: bool = True) -> None:
        self.model = model
        self.text = tokenizer if isinstance(tokenizer, TextLayer) else TextLayer.for_model(model, tokenizer)
        self.tokenizer = self.text.tokenizer
        self.default_policy, self.default_options = policy, dict(options)
        self.limits = limits.check()
        self.sessions: dict[str, ServerSession] = {}
        self._ids = itertools.count(1)
        self.created = 0
        self.completed = 0
        self.engines = EnginePool(model, self.text, instruction, max_rows=self.limits.max_batch)
        self.batching = batching  # False: every session gets an engine of its own (the unbatched baseline)
        self._releases: list[Any] = []  # policies of closed sessions whose slots go back before the next tick
        make_policy(policy, model, self.text, **options)  # fail at start-up on a bad policy or options

    def open(self, policy: str | None = None, options: dict[str, Any] | None = None,
             outbox: asyncio.Queue | None = None) -> ServerSession:
        """A new session, or ProtocolError('too_many_sessions' / 'bad_options')."""
        if len(self.sessions) >= self.limits.max_sessions:
            raise ProtocolError("too_many_sessions", f"the server already serves {len(self.sessions)} sessions "
                                f"(limit {self.limits.max_sessions}); retry later", fatal=True)
        name = policy or self.default_policy
        opts = {**self.default_options, **(options or {})} if name == self.default_policy else dict(options or {})
        try:
            engines = self.engines if self.batching else EnginePool(self.model, self.text, self.engines.instruction)
            instance = make_policy(name, self.model, self.text, engines=engines, **opts)
        except (BriskError, TypeError) as error:
            raise ProtocolError("bad_options", str(error)) from None
        session = ServerSession(f"s{next(self._ids)}", instance, name, opts,
                                outbox if outbox is not None else asyncio.Queue())
        self.sessions[session.id] = session
        self.created += 1
        return session

    def accept_words(self, session: ServerSession, words: list[str]) -> None:
        """Queue source words after the limit and vocabulary checks (ProtocolError on a breach)."""
        if session.ended:
            raise ProtocolError("bad_state", "the source already ended: start a new session to send more words")
        if session.received + len(words) > self.limits.max_source_words:
            raise ProtocolError("oversized", f"the session would hold {session.received + len(words)} source words; "
                                f"the limit is {self.limits.max_source_words}: split the input into sessions")
        try:
            session.policy.check_words(words)
        except BriskError as error:  # e.g. text the tokenizer can only encode as its unknown token
            raise ProtocolError("unknown_word", str(error)) from None
        session.inbox.append(("words", words, time.perf_counter()))
        session.received += len(words)

    def accept_end(self, session: ServerSession) -> None:
        if session.ended:
            raise ProtocolError("bad_state", "the source already ended: send 'end' once")
        self.flush_text(session)
        if session.received == 0:
            raise ProtocolError("empty_source", "the source is empty: send at least one word before 'end'")
        session.inbox.append(("end", [], time.perf_counter()))
        session.ended = True

    def breach(self, session: ServerSession) -> ProtocolError | None:
        """A time or memory limit the session has passed, if any."""
        age = time.perf_counter() - session.started
        if age > self.limits.max_session_seconds:
            return ProtocolError("time_limit", f"the session ran {age:.1f} s; the limit is "
                                 f"{self.limits.max_session_seconds:g} s", fatal=True)
        used = session.policy.memory_bytes()
        if used > self.limits.max_memory_bytes:
            return ProtocolError("memory_limit", f"the session holds {used} bytes of model state; the limit is "
                                 f"{self.limits.max_memory_bytes}", fatal=True)
        return None

    def accept_text(self, session: ServerSession, text: str) -> None:
        """A chunk of raw text: words end at whitespace, so a word split across chunks is held until it ends
        (at the next whitespace, or at 'end')."""
        joined = session.text_tail + text
        parts = joined.split()
        tail = "" if not parts or joined[-1:].isspace() else parts.pop()
        if parts:
            self.accept_words(session, parts)
        if len(tail) > 64:
            raise ProtocolError("oversized", f"a word of over 64 characters ({tail[:16]!r}...) has no end: "
                                "separate words with whitespace")
        session.text_tail = tail

    def flush_text(self, session: ServerSession) -> None:
        """At 'end': the held last word of a chunked text, if any."""
        if session.text_tail:
            tail, session.text_tail = session.text_tail, ""
            self.accept_words(session, [tail])

    def close(self, session: ServerSession) -> None:
        """Forget a session (finished, failed or disconnected); its slot goes back before the next engine tick."""
        session.closed = True
        if self.sessions.pop(session.id, None) is not None and session.finished:
            self.completed += 1
        if hasattr(session.policy, "release"):
            self._releases.append(session.policy)
        session.policy = _Freed()

    def release_slots(self) -> None:
        """Give the slots of closed sessions back (call only while no engine tick runs)."""
        releases, self._releases = self._releases, []
        for policy in releases:
            policy.release()


class _Freed:
    """Stands in for a closed session's policy so its model state is released at once."""

    name = "freed"

    def memory_bytes(self) -> int:
        return 0

    def next_step(self):
        return None


def summary(items: list[Item], source_words: int) -> dict[str, Any]:
    """The 'done' frame fields from a session's emitted items: text, delays and latency metrics."""
    words = [i.text for i in items if i.kind == "word"]
    delays = [i.delay for i in items if i.kind == "word"]
    out: dict[str, Any] = {"words": words, "delays": delays, "text": " ".join(words), "source_words": source_words}
    if delays and source_words:
        out["AL"] = round(average_lagging(delays, source_words, len(delays)), 4)
    return out
