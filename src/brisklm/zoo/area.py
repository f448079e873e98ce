"""The zoo area: the embedded default models, their training recipes and the real-convention fixtures."""

from brisklm.areas import Area

AREA = Area(
    name="zoo",
    summary="embedded default models (trained on first use) and checkpoint fixtures",
    kind="infrastructure",
    commands=("brisklm.zoo.cli",),
    demos=("brisklm.zoo.demo",),
    recipes=("brisklm.zoo.recipes",),
)
