"""A small asyncio WebSocket client for `brisk serve` (used by the tests and the benchmark)."""

from __future__ import annotations

import asyncio
import json
import time
from dataclasses import dataclass, field
from typing import Any, Sequence

from websockets.asyncio.client import connect

from brisklm.errors import BriskError


@dataclass
class SessionResult:
    """What a client saw: every frame, the final frame, and per-word round-trip times (send -> ack) in ms."""

    frames: list[dict[str, Any]] = field(default_factory=list)
    final: dict[str, Any] | None = None
    word_ms: list[float] = field(default_factory=list)

    @property
    def words(self) -> list[str]:
        return [f["word"] for f in self.frames if f["type"] == "word"]

    @property
    def delays(self) -> list[int]:
        return [f["delay"] for f in self.frames if f["type"] == "word"]

    @property
    def errors(self) -> list[dict[str, Any]]:
        return [f for f in self.frames if f["type"] == "error"]


async def recv_frame(ws, timeout: float = 60.0) -> dict[str, Any]:
    """The next server frame as a dict (BriskError after `timeout` seconds: bounded waits only)."""
    try:
        return json.loads(await asyncio.wait_for(ws.recv(), timeout))
    except asyncio.TimeoutError:
        raise BriskError(f"no frame from the server within {timeout} s") from None


async def run_session(ws, words: Sequence[str], *, per_message: int = 1, start: dict | None = None,
                      timeout: float = 60.0, closed_loop: bool = True, interval_s: float = 0.0) -> SessionResult:
    """Stream `words` over an open connection, `per_message` at a time, then 'end'; wait for 'done' or an error.

    closed_loop=True waits for the server's ack after every message (so word_ms is the server's per-message
    latency); otherwise messages go out every `interval_s` seconds without waiting.
    """
    result = SessionResult()
    if start is not None:
        await ws.send(json.dumps({"type": "start", **start}))

    async def until(kinds: set[str], received: int | None = None) -> dict[str, Any]:
        while True:
            frame = await recv_frame(ws, timeout)
            result.frames.append(frame)
            if frame["type"] == "error" and frame.get("fatal"):
                return frame
            if frame["type"] in kinds and (received is None or frame.get("received", 0) >= received):
                return frame

    sent = 0
    for at in range(0, len(words), per_message):
        chunk = list(words[at:at + per_message])
        t0 = time.perf_counter()
        await ws.send(json.dumps({"type": "words", "words": chunk}))
        sent += len(chunk)
        if closed_loop:
            frame = await until({"ack", "done"}, sent)
            if frame["type"] == "error":
                result.final = frame
                return result
            result.word_ms.append((time.perf_counter() - t0) * 1000)
        elif interval_s:
            await asyncio.sleep(interval_s)
    await ws.send(json.dumps({"type": "end"}))
    result.final = await until({"done"})
    return result


async def translate_over_ws(url: str, words: Sequence[str], *, token: str | None = None,
                            origin: str | None = None, **kwargs: Any) -> SessionResult:
    """Open a connection (with a bearer token / an Origin header when given), run one session, close."""
    async with connect(url, open_timeout=30, close_timeout=5, max_size=2**22, **connect_options(token, origin)) as ws:
        return await run_session(ws, words, **kwargs)


def connect_options(token: str | None = None, origin: str | None = None) -> dict[str, Any]:
    """`websockets.connect` keyword arguments for a bearer token and an Origin header."""
    options: dict[str, Any] = {}
    if token:
        options["additional_headers"] = {"Authorization": f"Bearer {token}"}
    if origin:
        options["origin"] = origin
    return options


def main(argv: Sequence[str] | None = None) -> int:
    """`python -m brisklm.serve.client --url ws://HOST:PORT/ws --text "..."`: stream the text one word per
    message and print each target word with its delay as it arrives (token from --token or BRISK_SERVE_TOKEN)."""
    import argparse
    import sys

    from brisklm.serve.access import resolve_token

    parser = argparse.ArgumentParser(prog="python -m brisklm.serve.client", description=main.__doc__)
    parser.add_argument("--url", required=True, help="the server's WebSocket URL, e.g. ws://127.0.0.1:8000/ws")
    parser.add_argument("--text", default=None, help="source text (default: stdin)")
    parser.add_argument("--token", default=None)
    parser.add_argument("--policy", default=None)
    parser.add_argument("--option", action="append", default=[], metavar="KEY=VALUE")
    parser.add_argument("--wait", type=float, default=0.0, metavar="SECONDS",
                        help="keep trying to connect for this long (a server that is still starting)")
    args = parser.parse_args(argv)
    from brisklm.serve.cli import parse_options

    words = (args.text if args.text is not None else sys.stdin.read()).split()
    start = {"policy": args.policy, "options": parse_options(args.option)} if args.policy or args.option else None
    from websockets.exceptions import InvalidStatus

    deadline = time.monotonic() + args.wait
    while True:
        try:
            result = asyncio.run(translate_over_ws(args.url, words, token=resolve_token(args.token), start=start,
                                                  timeout=120))
            break
        except OSError as error:  # nothing listens there (yet)
            if time.monotonic() < deadline:
                time.sleep(0.5)
                continue
            print(f"brisk: error: cannot connect to {args.url} ({error.strerror or error}): is `brisk serve` "
                  "running there? (--wait SECONDS retries while it starts)", file=sys.stderr)
            return 1
        except InvalidStatus as error:
            print(f"brisk: error: the server refused the connection (HTTP {error.response.status_code}): pass its "
                  "token with --token or BRISK_SERVE_TOKEN", file=sys.stderr)
            return 1
    for frame in result.frames:
        if frame["type"] == "word":
            print(f"{frame['word']}\tdelay={frame['delay']}\tlatency_ms={frame['latency_ms']}")
        elif frame["type"] == "reason":  # thinker policies: a reasoning unit, then the final segment
            print(f"[{'final' if frame.get('final') else 'unit'}] {frame['text']}\tdelay={frame['delay']}")
        elif frame["type"] == "error":
            print(f"brisk: error: {frame['code']}: {frame['message']}", file=sys.stderr)
    final = result.final or {}
    if final.get("type") != "done":
        return 1
    print(f"# {len(final['words'])} words from {final['source_words']} source words; AL {final.get('AL')}",
          file=sys.stderr)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
