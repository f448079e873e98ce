"""Run the app with uvicorn: in the foreground (`brisk serve`) or in a background thread (tests, benchmark)."""

from __future__ import annotations

import socket
import threading
import time
from typing import Any

import uvicorn

from brisklm.errors import BriskError

WS_HARD_LIMIT = 16 * 2**20  # bytes


def bind(host: str = "127.0.0.1", port: int = 0) -> socket.socket:
    """A listening socket; port 0 picks a free port (read it back with sock.getsockname()[1])."""
    sock = socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)  # inherited by accepted sockets: no Nagle delay
    try:
        sock.bind((host, port))
    except OSError as error:
        sock.close()
        raise BriskError(f"cannot listen on {host}:{port} ({error.strerror}); pick another --port (0 = any free)") from None
    sock.listen(2048)
    sock.set_inheritable(True)
    return sock


def _config(app, max_message_bytes: int) -> uvicorn.Config:
    # oversized frames up to WS_HARD_LIMIT reach the app and get an 'oversized' error frame; beyond that
    # uvicorn closes the connection itself (close code 1009) so a client cannot exhaust memory
    return uvicorn.Config(app, log_level="warning", ws_max_size=max(WS_HARD_LIMIT, 4 * max_message_bytes),
                          ws="websockets-sansio",
                          lifespan="on", timeout_graceful_shutdown=2)


def serve_forever(app, host: str, port: int, max_message_bytes: int, on_ready=None) -> None:
    """Serve until interrupted; `on_ready(port)` is called once the socket listens."""
    sock = bind(host, port)
    if on_ready is not None:
        on_ready(sock.getsockname()[1])
    uvicorn.Server(_config(app, max_message_bytes)).run(sockets=[sock])


class BackgroundServer:
    """A uvicorn server on 127.0.0.1:<free port> in a daemon thread; use as a context manager."""

    def __init__(self, app, max_message_bytes: int = 16384, host: str = "127.0.0.1") -> None:
        self.sock = bind(host, 0)
        self.port = self.sock.getsockname()[1]
        self.host = host
        self.server = uvicorn.Server(_config(app, max_message_bytes))
        self.thread = threading.Thread(target=self.server.run, kwargs={"sockets": [self.sock]}, daemon=True)

    @property
    def url(self) -> str:
        return f"http://{self.host}:{self.port}"

    @property
    def ws_url(self) -> str:
        return f"ws://{self.host}:{self.port}/ws"

    def __enter__(self) -> "BackgroundServer":
        self.thread.start()
        deadline = time.monotonic() + 30
        while not self.server.started:
            if not self.thread.is_alive() or time.monotonic() > deadline:
                raise BriskError("the background server did not start within 30 s")
            time.sleep(0.02)
        return self

    def __exit__(self, *exc: Any) -> None:
        self.server.should_exit = True
        self.thread.join(timeout=10)
        self.sock.close()
