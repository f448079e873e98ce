"""The core area: the executor, the text layer and the generation loop, with their commands and benchmarks."""

from brisklm.areas import Area

AREA = Area(
    name="core",
    summary="layer-loop executor, text layer, generation loop, device/dtype",
    kind="infrastructure",
    commands=("brisklm.inspect_cli", "brisklm.generate_cli"),
    benchmarks={"core": "brisklm.core.bench:bench_core", "realshape": "brisklm.core.realshape_bench:bench_realshape"},
)
