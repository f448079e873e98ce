"""One stream driven as SimulEval drives an agent: `push(words, finished)` after each arriving source word, and
the policy writes until it wants more source (or the target ends). Each written word carries its delay and the
wall time since the stream started.

The schedules are those of the batch decoders, fed word by word: wait-k and offline as `policies.gpe_wait_k`
(an end predicted before the source ended reads one more word, for good), the decision heads as
`proactive.heads.adaptive_decode` (min lag 1; the end is forbidden while source may still come; the head
decides at every written token, and its lag counts completed words). Tests check that the outputs equal the
batch decoders'. Used by `brisk stream eval` and the SimulEval agent.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass
from typing import Sequence

from brisklm.core.text import TextLayer
from brisklm.errors import BriskError
from brisklm.streaming.engine import StreamingSession, StreamOutput
from brisklm.streaming.gpe import check_k
from brisklm.streaming.policies import MAX_TOKENS_PER_WORD, OFFLINE_K, target_limit, token_limit

HEAD_POLICIES = ("entropy", "attention", "probe")
POLICIES = ("wait-k", "offline", *HEAD_POLICIES)
DEFAULT_THRESHOLDS = {"entropy": 0.5, "attention": 0.3, "probe": 0.5}


@dataclass(frozen=True)
class PolicySpec:
    """A streaming policy by name with its knob: k for wait-k, a threshold for a decision head."""

    name: str = "wait-k"
    k: int = 3
    threshold: float | None = None

    def check(self) -> PolicySpec:
        """Validate the knob for the policy (one-line errors)."""
        if self.name not in POLICIES:
            raise BriskError(f"unknown policy {self.name!r}: choose one of {', '.join(POLICIES)}")
        if self.name in HEAD_POLICIES:
            threshold = DEFAULT_THRESHOLDS[self.name] if self.threshold is None else self.threshold
            if math.isnan(threshold):
                raise BriskError("--threshold is NaN: pass a number")
            return PolicySpec(self.name, self.k, threshold)
        if self.threshold is not None:
            raise BriskError(f"--threshold applies to --policy {'|'.join(HEAD_POLICIES)}, not {self.name}")
        return PolicySpec(self.name, OFFLINE_K if self.name == "offline" else check_k(self.k), None)

    def describe(self) -> dict:
        """The policy as written to scores.json."""
        if self.name in HEAD_POLICIES:
            return {"policy": self.name, "threshold": self.threshold}
        return {"policy": self.name} if self.name == "offline" else {"policy": self.name, "k": self.k}


@dataclass(frozen=True)
class Emitted:
    """A written target word: its delay (source words read at its first token) and seconds since the start."""

    word: str
    delay: int
    seconds: float


class StreamStepper:
    """One stream of one policy, fed source words as they arrive (see the module docstring)."""

    def __init__(self, model, text: TextLayer, spec: PolicySpec, *, phi: int = 0, instruction: str | None = None,
                 checkpoint=None, head=None, max_words: int | None = None) -> None:
        self.spec = spec.check()
        if max_words is not None and max_words < 1:
            raise BriskError(f"--max-words must be >= 1, got {max_words}")
        self.max_words = max_words  # a user cap on target words (the open word is completed when it is hit)
        self.start = time.perf_counter()
        self.head = None
        if self.spec.name in HEAD_POLICIES:
            from brisklm.streaming.proactive.heads import make_head

            self.head = head if head is not None else make_head(self.spec.name, checkpoint)
        self.session = StreamingSession(model, text, 1, phi=phi, instruction=instruction,
                                        record_attention=self.head is not None and self.head.needs_attention)
        self.received: list[str] = []
        self.finished = False
        self.extra = 0  # wait-k: words read beyond the schedule because the model wanted to end early
        self.want = 0  # heads: source words the policy asked for
        self.times: list[float] = []  # seconds since the start at which each output word was complete
        self._shown = 0

    @property
    def output(self) -> StreamOutput:
        return self.session.outputs[0]

    @property
    def done(self) -> bool:
        return self.session.done[0]

    def push(self, words: Sequence[str], finished: bool = False) -> list[Emitted]:
        """Take newly arrived source words (`finished`: no more will come); write what the policy allows now."""
        if self.finished and (words or not finished):
            raise BriskError("this stream's source has already finished: start a new stream")
        self.received += list(words)
        self.finished = self.finished or finished
        if self.finished and not self.received:
            raise BriskError("the source is empty: every sentence needs at least one source word")
        if self.head is None:
            self._wait_k()
        else:
            self._head()
        if self.finished and not self.done:
            raise AssertionError("a finished source must end the target")  # (a bug, not bad input)
        out, at = self.output, self._shown
        new = [Emitted(w, d, t) for w, d, t in zip(out.words[at:], out.delays[at:], self.times[at:])]
        self._shown = len(out.words)
        return new

    # ---------------------------------------------------------------------------------------- wait-k / offline
    def _read_to(self, count: int) -> None:
        have = self.session.words_read(0)
        if count > have:
            self.session.read(self.received[have:count])

    def _capped(self) -> bool:
        """Stop the stream at the user's --max-words cap (tokens capped too, so a word that never ends stops)."""
        s, cap = self.session, self.max_words
        if cap is None or s.done[0] or (s.words_started(0) < cap and len(s.written[0]) < MAX_TOKENS_PER_WORD * cap):
            return False
        s.stop(0)
        self._stamp()
        return True

    def _wait_k(self) -> None:
        s, k = self.session, self.spec.k
        while not s.done[0] and not self._capped():
            n = len(self.received)
            need = k + s.words_started(0) + self.extra  # reads before the word the next token may start
            if not self.finished and need > n:
                self._read_to(n)
                return  # wait for more source
            need = min(need, n + 1)
            self._read_to(min(need, n))
            if need > n and not s.closed[0]:
                s.close()
            s.write()
            self._stamp()
            self.extra += int(s.wants_read[0])
            if not s.done[0] and (s.words_started(0) >= target_limit(n) or len(s.written[0]) >= token_limit(n)):
                s.stop(0)
                self._stamp()

    # ---------------------------------------------------------------------------------------- decision heads
    def _head(self) -> None:
        from brisklm.streaming.proactive.subword import starts_word

        s, head, threshold = self.session, self.head, self.spec.threshold

        source_left = True

        def gate(session: StreamingSession, logits) -> list[bool]:
            # As head_decode: the head decides at word starts only (a token inside the open word is always
            # written), and word j is not started before j source words are read while source remains.
            if session.closed[0] or not starts_word(session, 0, int(logits[0].argmax())):
                return [True]
            if source_left and session.words_read(0) < session.words_started(0) + 1:
                return [False]
            return [head.writes(head.signal(session, logits), threshold)[0]]

        while not s.done[0] and not self._capped():
            n = len(self.received)
            want = max(self.want, len(s.outputs[0].words) + 1)
            if self.finished:
                want = min(want, n)
            if want > n:
                self._read_to(n)
                return  # wait for more source
            self._read_to(want)
            before = len(s.outputs[0].words)
            source_left = not self.finished or s.words_read(0) < n
            s.write(gate=gate, forbid_early_end=[source_left])
            self._stamp()
            if len(s.outputs[0].words) == before and s.wants_read[0]:
                if source_left:
                    self.want = s.words_read(0) + 1
                elif not s.closed[0]:
                    s.close()
            if not s.done[0] and len(s.outputs[0].words) >= target_limit(n):
                s.stop(0)
                self._stamp()

    def _stamp(self) -> None:
        """Record when each newly completed word came out (per word, before later writes add compute)."""
        now = time.perf_counter() - self.start
        self.times += [now] * (len(self.output.words) - len(self.times))


def run_stream(model, text: TextLayer, spec: PolicySpec, source: Sequence[str], **kwargs) -> StreamStepper:
    """Feed a whole sentence word by word (the last with finished=True); returns the finished stepper."""
    if not source:
        raise BriskError("the source is empty: every sentence needs at least one source word")
    stepper = StreamStepper(model, text, spec, **kwargs)
    for i, word in enumerate(source):
        stepper.push([word], finished=i == len(source) - 1)
    return stepper
