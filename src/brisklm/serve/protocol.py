"""WebSocket message schema of `brisk serve`: parse and validate client frames, build server frames.

Client -> server (JSON text frames):
  {"type": "start", "policy": "wait-k", "options": {"k": 3}}   optional; opens a session with these settings
  {"type": "words", "words": ["a", "b"]}  or  {"type": "words", "text": "a b"}   source words as they arrive
  {"type": "text", "text": "Hel"}, {"type": "text", "text": "lo wor"}          raw text chunks: a word ends at
                                                                whitespace (or at 'end'), so it may span chunks
  {"type": "end"}                                               the source is complete
Server -> client:
  ready {session, policy, options, limits} | word {word, index, delay, latency_ms} | reason {text, delay, ...}
  ack {received} (everything sent so far is processed; the policy waits for more input)
  done {words, delays, text, source_words, truncated, AL, ...} | error {code, message, fatal}
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import Any

CLIENT_TYPES = ("start", "words", "text", "end")
ERROR_CODES = {
    "malformed": "the frame is not a valid message (see the schema)",
    "oversized": "the frame or the session's source is larger than the server's limit",
    "unknown_word": "a source word is not in the model's vocabulary",
    "bad_state": "the message does not fit the session's state (e.g. words after end)",
    "bad_options": "the start message asks for an unknown policy or invalid options",
    "empty_source": "the source ended before any word arrived",
    "too_many_sessions": "the server is at its session limit; retry later",
    "time_limit": "the session ran longer than the server allows",
    "memory_limit": "the session's model state grew past the server's limit",
    "internal": "the engine failed on this session",
}


class ProtocolError(Exception):
    """A client frame that breaks the schema or a limit; `code` is one of ERROR_CODES."""

    def __init__(self, code: str, message: str, fatal: bool = False) -> None:
        super().__init__(message)
        self.code, self.message, self.fatal = code, message, fatal


@dataclass
class ClientMessage:
    """A validated client frame."""

    type: str
    words: list[str] = field(default_factory=list)
    text: str = ""
    policy: str | None = None
    options: dict[str, Any] = field(default_factory=dict)


def parse_message(raw: str | bytes, max_bytes: int, max_word_chars: int = 64) -> ClientMessage:
    """Validate one frame; raise ProtocolError naming what is wrong and how to fix it."""
    size = len(raw.encode("utf-8") if isinstance(raw, str) else raw)
    if size > max_bytes:
        raise ProtocolError("oversized", f"frame of {size} bytes exceeds the limit of {max_bytes} bytes: "
                                         "send the source in smaller pieces")
    try:
        data = json.loads(raw)
    except (ValueError, UnicodeDecodeError):
        raise ProtocolError("malformed", 'frame is not JSON: send e.g. {"type": "words", "words": ["w1", "w2"]}') from None
    if not isinstance(data, dict):
        raise ProtocolError("malformed", "frame must be a JSON object with a 'type' field")
    kind = data.get("type")
    if kind not in CLIENT_TYPES:
        raise ProtocolError("malformed", f"unknown message type {kind!r}: use one of {', '.join(CLIENT_TYPES)}")
    unknown = set(data) - {"type", "words", "text", "policy", "options"}
    if unknown:
        raise ProtocolError("malformed", f"unknown field(s) {', '.join(sorted(unknown))} in a {kind!r} message")
    if kind == "start":
        policy, options = data.get("policy"), data.get("options", {})
        if policy is not None and not isinstance(policy, str):
            raise ProtocolError("malformed", "'policy' must be a string naming a server policy")
        if not isinstance(options, dict):
            raise ProtocolError("malformed", "'options' must be a JSON object, e.g. {\"k\": 3}")
        return ClientMessage("start", policy=policy, options=options)
    if kind == "end":
        return ClientMessage("end")
    if kind == "text":
        if set(data) - {"type", "text"} or not isinstance(data.get("text"), str):
            raise ProtocolError("malformed", 'a \'text\' message is {"type": "text", "text": "a chunk of text"}')
        return ClientMessage("text", text=data["text"])
    if ("words" in data) == ("text" in data):
        raise ProtocolError("malformed", "a 'words' message needs exactly one of 'words' (list) or 'text' (string)")
    if "text" in data:
        if not isinstance(data["text"], str):
            raise ProtocolError("malformed", "'text' must be a string of whitespace-separated words")
        words = data["text"].split()
    else:
        words = data["words"]
        if not isinstance(words, list) or not all(isinstance(w, str) for w in words):
            raise ProtocolError("malformed", "'words' must be a list of strings")
        if any(not w or w != w.strip() or len(w.split()) != 1 for w in words):
            raise ProtocolError("malformed", "each entry of 'words' must be one word without spaces")
    if not words:
        raise ProtocolError("malformed", "a 'words' message must carry at least one word")
    long = [w for w in words if len(w) > max_word_chars]
    if long:
        raise ProtocolError("oversized", f"word of {len(long[0])} characters exceeds the limit of {max_word_chars}")
    return ClientMessage("words", words=list(words))


def error_frame(code: str, message: str, fatal: bool = False) -> dict[str, Any]:
    """A server error frame; fatal=True means the session is gone (a new one may be started)."""
    return {"type": "error", "code": code, "message": message, "fatal": fatal}


def item_frame(item, now: float) -> dict[str, Any]:
    """A server frame for one policy item (word / reason), with the server-side latency in milliseconds."""
    frame = {"type": item.kind, "index": item.index, "delay": item.delay,
             "latency_ms": round(max(0.0, now - item.unlocked_at) * 1000, 3)}
    frame["word" if item.kind == "word" else "text"] = item.text
    frame.update(item.extra)
    return frame
