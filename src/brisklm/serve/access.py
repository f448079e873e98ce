"""Access control of `brisk serve`: a bearer token and a WebSocket Origin allow-list, as one ASGI middleware.

- Token: with a token set, every HTTP request and WebSocket handshake must carry `Authorization: Bearer
  <token>` (browsers, which cannot set headers on a WebSocket, may pass `?access_token=<token>` instead).
  The page files (/ and /static/*) hold no data and stay public. A server on a non-loopback address refuses
  to start without a token (`check_exposure`).
- Origin: a browser sends `Origin` on every WebSocket handshake and cross-site request; only the server's own
  origin (same host and port as the request's Host header) and `--allow-origin` entries are accepted, so a
  page on another site cannot drive a session with the visitor's network access (cross-site WebSocket
  hijacking). Clients that send no Origin (scripts, `brisk` clients) are not browsers and pass this check.
Refusals: HTTP 401 (token) / 403 (origin) with a JSON error; a WebSocket handshake is closed with 1008
(uvicorn answers the handshake with HTTP 403).
"""

from __future__ import annotations

import hmac
import ipaddress
import json
import os
from typing import Sequence
from urllib.parse import parse_qs, urlsplit

from brisklm.errors import BriskError

TOKEN_ENV = "BRISK_SERVE_TOKEN"
PUBLIC_PATHS = ("/", "/static/")
POLICY_VIOLATION = 1008


def is_loopback(host: str) -> bool:
    """True for addresses only this machine can reach (127.0.0.0/8, ::1, 'localhost')."""
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


def resolve_token(token: str | None) -> str | None:
    """--token, else the BRISK_SERVE_TOKEN environment variable, else None (an empty value counts as none)."""
    value = token if token is not None else os.environ.get(TOKEN_ENV)
    return value or None


def check_exposure(host: str, token: str | None) -> None:
    """Refuse to listen beyond loopback without a token (one line naming the fix)."""
    if not is_loopback(host) and not token:
        raise BriskError(f"--host {host} is reachable from other machines: set a bearer token with --token or "
                         f"the {TOKEN_ENV} environment variable (or listen on 127.0.0.1)")


def normalize_origin(origin: str) -> str:
    """scheme://host[:port] in lower case, default ports dropped (http 80, https 443)."""
    parts = urlsplit(origin.strip().lower())
    if not parts.scheme or not parts.hostname:
        raise BriskError(f"--allow-origin {origin!r} is not an origin: pass e.g. https://example.org:8443")
    default = {"http": 80, "https": 443, "ws": 80, "wss": 443}.get(parts.scheme)
    port = "" if parts.port in (None, default) else f":{parts.port}"
    host = parts.hostname if ":" not in parts.hostname else f"[{parts.hostname}]"
    return f"{parts.scheme}://{host}{port}"


def _header(scope, name: bytes) -> str | None:
    for key, value in scope.get("headers", ()):
        if key.lower() == name:
            return value.decode("latin-1")
    return None


class AccessControl:
    """ASGI middleware: bearer token (when set) on HTTP and WebSocket, Origin allow-list on both."""

    def __init__(self, app, token: str | None = None, allow_origins: Sequence[str] = ()) -> None:
        self.app, self.token = app, token
        self.allow_origins = {normalize_origin(o) for o in allow_origins}
        self.refused = {"token": 0, "origin": 0}

    def origin_ok(self, scope) -> bool:
        origin = _header(scope, b"origin")
        if origin is None:
            return True  # not a browser
        try:
            normal = normalize_origin(origin)
        except BriskError:
            return False  # "null" (sandboxed frames, files) and other opaque origins
        if normal in self.allow_origins:
            return True
        host = _header(scope, b"host")
        if host is None:
            return False
        own = urlsplit(normal).netloc
        default = ":443" if normal.startswith("https://") else ":80"
        return host.lower() in (own, own + default)

    def token_ok(self, scope) -> bool:
        if self.token is None:
            return True
        given = None
        auth = _header(scope, b"authorization")
        if auth is not None and auth[:7].lower() == "bearer ":
            given = auth[7:].strip()
        if given is None and scope["type"] == "websocket":
            values = parse_qs(scope.get("query_string", b"").decode("latin-1")).get("access_token")
            given = values[0] if values else None
        return given is not None and hmac.compare_digest(given.encode(), self.token.encode())

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] not in ("http", "websocket"):
            return await self.app(scope, receive, send)
        path = scope.get("path", "")
        public = scope["type"] == "http" and (path == "/" or path.startswith("/static/"))
        problem = None
        if not self.origin_ok(scope):
            problem = ("origin", 403, f"origin {_header(scope, b'origin')!r} is not allowed: serve the page from "
                                      "this server or start it with --allow-origin ORIGIN")
        elif not public and not self.token_ok(scope):
            problem = ("token", 401, "missing or wrong bearer token: send 'Authorization: Bearer <token>'")
        if problem is None:
            return await self.app(scope, receive, send)
        kind, status, message = problem
        self.refused[kind] += 1
        if scope["type"] == "websocket":
            await receive()  # websocket.connect
            await send({"type": "websocket.close", "code": POLICY_VIOLATION, "reason": message[:120]})
            return
        body = json.dumps({"type": "error", "code": "unauthorized" if status == 401 else "forbidden",
                           "message": message, "fatal": True}).encode()
        headers = [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]
        if status == 401:
            headers.append((b"www-authenticate", b'Bearer realm="brisk serve"'))
        await send({"type": "http.response.start", "status": status, "headers": headers})
        await send({"type": "http.response.body", "body": body})
