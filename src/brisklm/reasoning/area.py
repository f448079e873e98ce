"""The reasoning area: On-Policy SFT, distillation objectives with KL mixing and curriculum, latent chain of thought."""

from brisklm.areas import Area

AREA = Area(
    name="reasoning",
    summary="On-Policy SFT, distillation objectives with KL mixing and curriculum, latent chain of thought",
    kind="method",
    commands=("brisklm.reasoning.cli",),
    benchmarks={"reasoning": "brisklm.reasoning.bench:bench_reasoning"},
    demos=("brisklm.reasoning.demo",),
    recipes=("brisklm.reasoning.zoo",),
)
