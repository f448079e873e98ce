"""The eval area: the `brisk bench` harness and the `brisk demo` report."""

from brisklm.areas import Area

AREA = Area(
    name="eval",
    summary="benchmark harness and demo report",
    kind="infrastructure",
    commands=("brisklm.eval.cli",),
)
