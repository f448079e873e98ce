"""The serve area: the streaming server: sessions batched across clients over HTTP and WebSocket."""

from brisklm.areas import Area

AREA = Area(
    name="serve",
    summary="the streaming server: sessions batched across clients over HTTP and WebSocket",
    kind="method",
    commands=("brisklm.serve.cli",),
    benchmarks={"serve": "brisklm.serve.bench:bench"},
    demos=("brisklm.serve.demo",),
)
