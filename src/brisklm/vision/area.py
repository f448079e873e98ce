"""The vision area: VisiPruner, FastV and PyramidDrop baselines, ViCA."""

from brisklm.areas import Area

AREA = Area(
    name="vision",
    summary="VisiPruner, FastV and PyramidDrop baselines, ViCA",
    kind="method",
    commands=("brisklm.vision.cli",),
    benchmarks={"vision": "brisklm.vision.bench:bench"},
    demos=("brisklm.vision.demo",),
    recipes=("brisklm.vision.zoo",),
)
