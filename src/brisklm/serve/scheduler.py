"""The engine scheduler: one worker thread runs the pending steps of all sessions, batched by step kind.

The asyncio loop (WebSocket handlers) only queues input in session inboxes. Between engine ticks the
scheduler hands that input to the policies, then runs one tick in the worker thread: new sessions take their
slots, then every slot policy's pending reads run as one call per engine, then closes, then writes
(serve/slots.py: persistent batch slots, nothing re-padded per step); policies without the slot interface
get their `on_words` / `on_end` called one by one. Slots of closed sessions are given back between ticks. A failure inside one
session becomes an error frame for that session only.
"""

from __future__ import annotations

import asyncio
import time
import traceback
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from typing import Any

from brisklm.errors import BriskError
from brisklm.serve.policy import CLOSE, FINISH, JOIN, READ, WRITE, Item, combined_gate, is_stepping
from brisklm.serve.protocol import error_frame, item_frame
from brisklm.serve.sessions import ServerSession, SessionManager, summary

PHASES = (JOIN, READ, CLOSE, WRITE, FINISH)


def run_round(pairs, results: dict, max_batch: int = 64, batch_sizes: Counter | None = None) -> int:
    """One round of steps for (key, SlotPolicy) pairs: joins, then each kind (read, close, write) as one call
    per engine (at most max_batch slots per call), then finishes. Items and error frames go to results[key]
    ((items, error) pairs; a key with an error takes no more steps). Returns the number of engine calls."""
    calls = 0
    for phase in PHASES:
        groups: dict[int, list] = {}
        for key, policy in pairs:
            if results[key][1] is not None:
                continue
            step = policy.next_step()
            if step is not None and step.kind == phase:
                groups.setdefault(id(policy.engine), []).append((key, policy, step))
        for group in groups.values():
            if phase in (JOIN, FINISH):
                for key, policy, step in group:
                    results[key][0].extend(policy.run_step(step))
                continue
            for at in range(0, len(group), max_batch):
                calls += _run_group(phase, group[at:at + max_batch], results)
                if batch_sizes is not None:
                    batch_sizes[len(group[at:at + max_batch])] += 1
    return calls


def _run_group(phase: str, group, results) -> int:
    """One batched engine call over the slots of one engine; a failure fails that call's sessions only."""
    engine = group[0][1].engine
    try:
        if phase == READ:
            engine.read({p.slot: st.words for _, p, st in group})
        elif phase == CLOSE:
            engine.close([p.slot for _, p, _ in group])
        else:
            engine.write([p.slot for _, p, _ in group], gate=combined_gate([p for _, p, _ in group]),
                         forbid_early_end={p.slot: p.forbid_end() for _, p, _ in group},
                         record_attention=any(p.needs_attention for _, p, _ in group))
    except Exception:  # noqa: BLE001 - an engine failure: the sessions of this call end with an error
        err = traceback.format_exc(limit=1).strip().splitlines()[-1]
        for key, _, _ in group:
            results[key] = (results[key][0], error_frame("internal", err, fatal=True))
        return 0
    for key, policy, step in group:
        try:
            results[key][0].extend(policy.apply_step(step))
        except Exception as error:  # noqa: BLE001 - isolate the session
            results[key] = (results[key][0], error_frame("internal", f"{type(error).__name__}: {error}", True))
    return 1


class Scheduler:
    """Runs engine ticks while any session has work; `batching=False` runs every session's step alone."""

    def __init__(self, manager: SessionManager, batching: bool = True, batch_window_s: float = 0.003) -> None:
        self.manager = manager
        self.batching = batching
        self.batch_window_s = batch_window_s if batching else 0.0
        self._wake = asyncio.Event()
        self._pool = ThreadPoolExecutor(1, thread_name_prefix="brisk-engine")
        self._task: asyncio.Task | None = None
        self.ticks = 0
        self.tick_seconds = 0.0
        self.engine_calls = 0
        self.batch_sizes: Counter[int] = Counter()
        self.items: dict[str, list[Item]] = {}

    # ------------------------------------------------------------------------------------------ lifecycle
    def start(self) -> None:
        self._task = asyncio.get_running_loop().create_task(self._run())

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            try:
                await self._task
            except asyncio.CancelledError:
                pass
        self._pool.shutdown(wait=True)

    def notify(self) -> None:
        """Input arrived: wake the scheduler."""
        self._wake.set()

    def stats(self) -> dict[str, Any]:
        sizes = sum(n * c for n, c in self.batch_sizes.items())
        calls = sum(self.batch_sizes.values())
        return {"ticks": self.ticks, "engine_calls": self.engine_calls, "engine_busy_s": round(self.tick_seconds, 3),
                "mean_batch": round(sizes / calls, 3) if calls else 0.0, "batching": self.batching}

    # ------------------------------------------------------------------------------------------ the loop
    async def _run(self) -> None:
        loop = asyncio.get_running_loop()
        watchdog = min(1.0, self.manager.limits.max_session_seconds / 4)
        while True:
            try:  # wake on input, or on the watchdog so that silent sessions still meet their time limit
                await asyncio.wait_for(self._wake.wait(), watchdog)
            except asyncio.TimeoutError:
                pass
            self._wake.clear()
            while True:
                work = self._absorb()
                if not work:
                    break
                work = await self._gather_more(work)
                self.manager.release_slots()  # no tick is running: safe to give rows back
                jobs = [(s, s.policy, s.inbox[:]) for s in work]
                for s in work:
                    s.inbox.clear()
                try:
                    results = await loop.run_in_executor(self._pool, self._tick, jobs)
                except Exception:  # a bug, not a session's fault: report to everyone in the tick, keep serving
                    message = traceback.format_exc(limit=2).strip().splitlines()[-1]
                    results = {s.id: ([], error_frame("internal", message, fatal=True)) for s, _, _ in jobs}
                self._deliver(work, results)

    async def _gather_more(self, work: list[ServerSession]) -> list[ServerSession]:
        """Batching window: while some live sessions have no input yet, wait up to batch_window_s for it."""
        deadline = time.perf_counter() + self.batch_window_s
        while len(work) < len(self.manager.sessions) and time.perf_counter() < deadline:
            await asyncio.sleep(0.0005)
            work = self._absorb()
        return work

    def _absorb(self) -> list[ServerSession]:
        """Hand queued input to stepping policies (no model work); return the sessions with work."""
        work = []
        for s in list(self.manager.sessions.values()):
            if s.stepping and s.inbox:
                try:
                    for kind, words, at in s.inbox:
                        s.policy.push(words, at) if kind == "words" else s.policy.push_end(at)
                except BriskError as error:
                    self._fail(s, error_frame("bad_state", str(error), fatal=True))
                    continue
                s.inbox.clear()
            breach = self.manager.breach(s)
            if breach is not None:
                self._fail(s, error_frame(breach.code, breach.message, fatal=True))
                continue
            if s.has_work():
                work.append(s)
            else:
                self._ack(s)
        return work

    def _tick(self, jobs) -> dict[str, tuple[list[Item], dict | None]]:
        """Worker thread: run one round of steps for every job; returns items (and an error frame) per session."""
        start = time.perf_counter()
        results: dict[str, tuple[list[Item], dict | None]] = {s.id: ([], None) for s, _, _ in jobs}
        for s, policy, inbox in jobs:  # policies without the stepping interface: the minimal protocol
            if is_stepping(policy):
                continue
            try:
                for kind, words, _ in inbox:
                    results[s.id][0].extend(policy.on_words(words) if kind == "words" else policy.on_end())
            except BriskError as error:
                results[s.id] = (results[s.id][0], error_frame("bad_state", str(error), fatal=True))
            except Exception as error:  # noqa: BLE001 - isolate the session
                results[s.id] = (results[s.id][0], error_frame("internal", f"{type(error).__name__}: {error}", True))
        stepping = [(s.id, p) for s, p, _ in jobs if is_stepping(p)]
        size = self.manager.limits.max_batch if self.batching else 1
        self.engine_calls += run_round(stepping, results, size, self.batch_sizes)
        self.manager.engines.compact()
        elapsed = time.perf_counter() - start
        self.tick_seconds += elapsed
        per = elapsed / max(len(jobs), 1)
        for s, _, _ in jobs:
            s.engine_seconds += per
        self.ticks += 1
        return results

    # ------------------------------------------------------------------------------------------ delivery
    def _deliver(self, work: list[ServerSession], results) -> None:
        now = time.perf_counter()
        for s in work:
            if s.closed or s.id not in results:
                continue  # disconnected during the tick: drop its output
            items, error = results[s.id]
            history = self.items.setdefault(s.id, [])
            for item in items:
                if item.kind == "end":
                    history.append(item)
                    frame = {"type": "done", "session": s.id, **summary(history, s.received),
                             "truncated": bool(item.extra.get("truncated")),
                             "server_ms": round((now - s.started) * 1000, 3),
                             "engine_ms": round(s.engine_seconds * 1000, 3)}
                    s.outbox.put_nowait(frame)
                    s.finished = True
                    continue
                history.append(item)
                s.outbox.put_nowait(item_frame(item, now))
            if error is not None:
                self._fail(s, error)
                continue
            if s.finished:
                self.items.pop(s.id, None)
                self.manager.close(s)
                continue
            if not s.inbox and not s.has_work():
                self._ack(s)

    @staticmethod
    def _ack(s: ServerSession) -> None:
        """Tell the client that all its input so far is processed (once per new input)."""
        if s.received != s.acked and not s.closed:
            s.acked = s.received
            s.outbox.put_nowait({"type": "ack", "received": s.received})

    def _fail(self, s: ServerSession, frame: dict) -> None:
        s.outbox.put_nowait(frame)
        self.items.pop(s.id, None)
        self.manager.close(s)
