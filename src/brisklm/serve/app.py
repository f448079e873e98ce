"""The Starlette app of `brisk serve`: WebSocket streaming, health, OpenAPI, a one-shot HTTP call, the demo page."""

from __future__ import annotations

import asyncio
import contextlib
import json
import time
from importlib import resources
from typing import Any, Sequence

from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route, WebSocketRoute
from starlette.websockets import WebSocket, WebSocketDisconnect

from brisklm.serve.access import AccessControl
from brisklm.serve.protocol import ERROR_CODES, ProtocolError, error_frame, parse_message
from brisklm.serve.scheduler import Scheduler
from brisklm.serve.sessions import Limits, ServerSession, SessionManager

STATIC = {"index.html": "text/html; charset=utf-8", "app.js": "text/javascript; charset=utf-8",
          "style.css": "text/css; charset=utf-8"}
TRY_AGAIN_LATER = 1013  # WebSocket close code: the server is overloaded


def static_bytes(name: str) -> bytes:
    """A file of the page, read with importlib.resources so it works from a wheel too."""
    return resources.files("brisklm.serve").joinpath("static", name).read_bytes()


def example_sentences(tokenizer, n: int = 5) -> list[str]:
    """A few translation-task sources the model's vocabulary covers (for the page's 'example' button)."""
    try:
        from brisklm.tasks import get_task

        vocab = tokenizer.get_vocab()
        found = [" ".join(e.meta["source_words"]) for e in get_task("translation").examples("test", 20, seed=0)]
        return [s for s in found if all(w in vocab for w in s.split())][:n]
    except Exception:  # noqa: BLE001 - a model for another task simply has no examples
        return []


def openapi_schema(limits: Limits) -> dict[str, Any]:
    """OpenAPI 3.1 description of the HTTP endpoints (the WebSocket protocol is described in `info`)."""
    error = {"type": "object", "properties": {"type": {"const": "error"}, "code": {"enum": sorted(ERROR_CODES)},
                                              "message": {"type": "string"}, "fatal": {"type": "boolean"}}}
    done = {"type": "object", "properties": {
        "type": {"const": "done"}, "words": {"type": "array", "items": {"type": "string"}},
        "delays": {"type": "array", "items": {"type": "integer"}}, "text": {"type": "string"},
        "source_words": {"type": "integer"}, "AL": {"type": "number"}, "truncated": {"type": "boolean"},
        "server_ms": {"type": "number"}, "engine_ms": {"type": "number"}}}
    return {
        "openapi": "3.1.0",
        "info": {"title": "brisklm streaming server", "version": "0.1.0", "description": (
            "Simultaneous translation over a WebSocket at /ws. Client frames (JSON): "
            '{"type":"start","policy":"wait-k","options":{"k":3}} (optional), {"type":"words","words":[...]} or '
            '{"type":"words","text":"..."}, {"type":"end"}. Server frames: ready, word {word,index,delay,latency_ms}, '
            "reason (reasoning units of thinker policies), ack {received}, done {words,delays,AL,...}, "
            f"error {{code,message,fatal}}. Raw text may also arrive in chunks: {{\"type\":\"text\",\"text\":\"...\"}} "
            "(a word ends at whitespace or at end). With a server token, send 'Authorization: Bearer <token>' on "
            "every request and on the WebSocket handshake (browsers: ?access_token=). "
            f"Limits: {limits.max_sessions} sessions, {limits.max_source_words} "
            f"source words per session, {limits.max_message_bytes} bytes per frame.")},
        "paths": {
            "/health": {"get": {"summary": "Liveness, load and configuration", "responses": {"200": {
                "description": "ok", "content": {"application/json": {"schema": {"type": "object", "properties": {
                    "status": {"const": "ok"}, "sessions": {"type": "integer"}, "max_sessions": {"type": "integer"},
                    "policy": {"type": "string"}, "model": {"type": "string"}}}}}}}}},
            "/api/config": {"get": {"summary": "Policy, options, limits and example sources (used by the page)",
                                    "responses": {"200": {"description": "ok"}}}},
            "/api/translate": {"post": {
                "summary": "Stream a whole text through a session at once; returns the final 'done' frame",
                "requestBody": {"required": True, "content": {"application/json": {"schema": {
                    "type": "object", "required": ["text"], "properties": {
                        "text": {"type": "string"}, "policy": {"type": "string"}, "options": {"type": "object"}}}}}},
                "responses": {"200": {"description": "the done frame", "content": {"application/json": {"schema": done}}},
                              "400": {"description": "an error frame", "content": {"application/json": {"schema": error}}},
                              "503": {"description": "too many sessions", "content": {"application/json": {"schema": error}}}}}},
            "/openapi.json": {"get": {"summary": "This document", "responses": {"200": {"description": "ok"}}}},
        },
    }


def create_app(model, tokenizer, *, policy: str = "wait-k", options: dict[str, Any] | None = None,
               limits: Limits | None = None, batching: bool = True, model_name: str = "",
               instruction: str | None = None, token: str | None = None,
               allow_origins: Sequence[str] = ()) -> AccessControl:
    """The ASGI app serving `model` with `policy`; run it with uvicorn (see serve/server.py).

    `tokenizer` may be a TextLayer (chat template / system prompt choices); `instruction` opens every source
    group as in `brisk stream translate`; `token` / `allow_origins`: see serve/access.py."""
    limits = limits or Limits()
    manager = SessionManager(model, tokenizer, policy, options or {}, limits, instruction=instruction,
                             batching=batching)
    state: dict[str, Any] = {"started": time.time()}
    examples = example_sentences(manager.tokenizer)

    @contextlib.asynccontextmanager
    async def lifespan(app):
        scheduler = Scheduler(manager, batching=batching)
        scheduler.start()
        state["scheduler"] = scheduler
        try:
            yield
        finally:
            await scheduler.stop()

    def ready(session: ServerSession) -> dict[str, Any]:
        return {"type": "ready", "session": session.id, "policy": session.policy_name, "options": session.options,
                "limits": {"max_source_words": limits.max_source_words, "max_message_bytes": limits.max_message_bytes,
                           "max_session_seconds": limits.max_session_seconds}}

    async def health(request: Request) -> JSONResponse:
        return JSONResponse({"status": "ok", "model": model_name, "policy": policy, "options": options or {},
                             "sessions": len(manager.sessions), "max_sessions": limits.max_sessions,
                             "sessions_created": manager.created, "sessions_completed": manager.completed,
                             "uptime_s": round(time.time() - state["started"], 3),
                             **state["scheduler"].stats()})

    async def config(request: Request) -> JSONResponse:
        return JSONResponse({"model": model_name, "policy": policy, "options": options or {},
                             "limits": limits.__dict__, "examples": examples})

    async def openapi(request: Request) -> JSONResponse:
        return JSONResponse(openapi_schema(limits))

    async def page(request: Request) -> Response:
        name = request.path_params.get("name", "index.html")
        if name not in STATIC:
            return JSONResponse({"error": f"no static file {name!r}"}, status_code=404)
        return Response(static_bytes(name), media_type=STATIC[name])

    async def translate(request: Request) -> JSONResponse:
        try:
            body = await request.body()
            data = json.loads(body or b"null")
            if not isinstance(data, dict) or not isinstance(data.get("text"), str):
                raise ProtocolError("malformed", 'send a JSON object {"text": "source words"}')
            start = parse_message(json.dumps({"type": "start", "policy": data.get("policy"),
                                              "options": data.get("options", {})}), limits.max_message_bytes)
            words = parse_message(json.dumps({"type": "words", "text": data["text"]}), limits.max_message_bytes)
            queue: asyncio.Queue = asyncio.Queue()
            session = manager.open(start.policy, start.options, queue)
        except ProtocolError as e:
            return JSONResponse(error_frame(e.code, e.message, e.fatal),
                                status_code=503 if e.code == "too_many_sessions" else 400)
        try:
            manager.accept_words(session, words.words)
            manager.accept_end(session)
        except ProtocolError as e:
            manager.close(session)
            return JSONResponse(error_frame(e.code, e.message, e.fatal), status_code=400)
        state["scheduler"].notify()
        while True:
            frame = await queue.get()
            if frame["type"] == "done":
                return JSONResponse(frame)
            if frame["type"] == "error":
                return JSONResponse(frame, status_code=400)

    async def stream(websocket: WebSocket) -> None:
        await websocket.accept()
        queue: asyncio.Queue = asyncio.Queue()
        session: ServerSession | None = None

        async def sender() -> None:
            while True:
                frame = await queue.get()
                await websocket.send_text(json.dumps(frame))

        send_task = asyncio.create_task(sender())
        try:
            while True:
                message = await websocket.receive()
                if message["type"] == "websocket.disconnect":
                    break
                raw = message.get("text") if message.get("text") is not None else message.get("bytes", b"")
                try:
                    parsed = parse_message(raw, limits.max_message_bytes)
                    if session is not None and session.closed:
                        session = None  # finished or failed: the connection may start another
                    if parsed.type == "start":
                        if session is not None:
                            raise ProtocolError("bad_state", "a session is already open on this connection: "
                                                "send 'end' and wait for 'done' before starting another")
                        session = manager.open(parsed.policy, parsed.options, queue)
                        queue.put_nowait(ready(session))
                        continue
                    if session is None:
                        if parsed.type == "end":
                            raise ProtocolError("bad_state", "no open session: send words before 'end'")
                        session = manager.open(None, None, queue)
                        queue.put_nowait(ready(session))
                    if parsed.type == "words":
                        manager.accept_words(session, parsed.words)
                    elif parsed.type == "text":
                        manager.accept_text(session, parsed.text)
                    else:
                        manager.accept_end(session)
                    state["scheduler"].notify()
                except ProtocolError as e:
                    if e.code == "too_many_sessions":
                        await websocket.send_text(json.dumps(error_frame(e.code, e.message, True)))
                        await websocket.close(TRY_AGAIN_LATER, "too many sessions")
                        break
                    queue.put_nowait(error_frame(e.code, e.message, e.fatal))
        except WebSocketDisconnect:
            pass
        finally:
            if session is not None and not session.closed:
                manager.close(session)  # a client that leaves mid-stream frees its session
            await _drain(queue, send_task)

    return AccessControl(Starlette(
        routes=[
            Route("/", page), Route("/static/{name}", page), Route("/health", health), Route("/api/config", config),
            Route("/api/translate", translate, methods=["POST"]), Route("/openapi.json", openapi),
            WebSocketRoute("/ws", stream),
        ],
        lifespan=lifespan,
    ), token=token, allow_origins=allow_origins)


async def _drain(queue: asyncio.Queue, task: asyncio.Task) -> None:
    """Give queued frames a moment to go out, then stop the sender."""
    for _ in range(50):
        if queue.empty() or task.done():
            break
        await asyncio.sleep(0.01)
    task.cancel()
    with contextlib.suppress(asyncio.CancelledError, Exception):
        await task
