"""The analysis area: in-context-learning coordinate system, Peak Inverse Rank, logit lens."""

from brisklm.areas import Area

AREA = Area(
    name="analysis",
    summary="in-context-learning coordinate system, Peak Inverse Rank, logit lens",
    kind="method",
    commands=("brisklm.analysis.cli",),
    benchmarks={"analysis": "brisklm.analysis.bench:bench_analysis"},
    demos=("brisklm.analysis.demo",),
    recipes=("brisklm.analysis.zoo",),
)
