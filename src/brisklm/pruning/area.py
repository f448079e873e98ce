"""The pruning area: static depth and width pruning, SkipGPT routers, KV-cache policies, SkipOPU cost model."""

from brisklm.areas import Area

AREA = Area(
    name="pruning",
    summary="static depth and width pruning, SkipGPT routers, KV-cache policies, SkipOPU cost model",
    kind="method",
    commands=("brisklm.pruning.cli",),
    benchmarks={"pruning": "brisklm.pruning.bench:bench_pruning"},
    demos=("brisklm.pruning.demo",),
)
