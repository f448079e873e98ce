"""Benchmark harness: areas register a figures function; `run_benchmark` runs it, adds metadata, saves JSON.

Each area declares its benchmarks as ``name -> "module:function"`` (brisklm.areas); modules are imported on first
use. ``register`` adds one at run time (tests, plug-ins).
Results go to ``out`` and to ``benchmarks/results/<area>.json`` at the repository root, and
``benchmarks/BENCHMARKS.md`` is regenerated from all saved results.
"""

from __future__ import annotations

import datetime as _dt
import json
import os
import platform
import random
import sys
import tempfile
import time
from dataclasses import dataclass, field
from importlib import metadata
from pathlib import Path
from typing import Any, Callable, Mapping

from brisklm.errors import BriskError
from brisklm.eval.benchmarks_md import write_benchmarks_md
from brisklm.eval.progress import progress as _default_progress

__all__ = [
    "BenchContext",
    "available_areas",
    "default_results_dir",
    "figures_of",
    "find_repo_root",
    "get_benchmark",
    "register",
    "run_area",
    "run_benchmark",
    "write_benchmarks_md",
]

@dataclass
class BenchContext:
    """What a benchmark function gets: quick mode, seed, a folder for its plots and a progress helper."""

    quick: bool
    seed: int
    out_dir: Path
    progress: Callable[..., Any] = field(default=_default_progress)
    sections: tuple[str, ...] = ()  # `--section`: run only these sections of an area that has them (empty: all)

    def wants(self, section: str) -> bool:
        """Whether this run includes `section` (every section when none was chosen)."""
        return not self.sections or section in self.sections


BenchFn = Callable[[BenchContext], Mapping[str, Any]]
_REGISTRY: dict[str, BenchFn] = {}
_SECTIONS: dict[str, tuple[str, ...]] = {}  # area -> the sections `--section` may pick


def register(area: str, sections: tuple[str, ...] = ()) -> Callable[[BenchFn], BenchFn]:
    """Decorator that registers `fn(ctx) -> dict of JSON figures` as the benchmark of `area`; `sections` names
    the parts `--section` may run alone (their figures are merged into the saved results)."""
    if not area or area == "all":
        raise BriskError(f"invalid benchmark area name '{area}'; use a short name other than 'all'")

    def decorate(fn: BenchFn) -> BenchFn:
        _REGISTRY[area] = fn
        _SECTIONS[area] = tuple(sections)
        return fn

    return decorate


def unregister(area: str) -> None:
    """Remove an area from the registry (for tests that register temporary areas)."""
    _REGISTRY.pop(area, None)


def _declared() -> dict[str, str]:
    from brisklm.areas import benchmark_entries

    return benchmark_entries()


def available_areas() -> list[str]:
    """Every benchmark name: the declared ones in area order, then any registered at run time."""
    declared = list(_declared())
    return declared + sorted(name for name in _REGISTRY if name not in declared)


def get_benchmark(area: str) -> BenchFn:
    """The function of benchmark `area`: registered at run time, or imported from its declaration."""
    if area in _REGISTRY:
        return _REGISTRY[area]
    declared = _declared()
    if area not in declared:
        raise BriskError(f"unknown benchmark area '{area}'; available: {', '.join(available_areas())} (or 'all')")
    from brisklm.areas import resolve

    return resolve(declared[area])


def find_repo_root(start: Path | None = None) -> Path | None:
    """Nearest directory at or above `start` (default: the working directory) holding pyproject.toml."""
    here = Path(start or Path.cwd()).resolve()
    for candidate in (here, *here.parents):
        if (candidate / "pyproject.toml").is_file():
            return candidate
    return None


def default_results_dir() -> Path | None:
    """benchmarks/results under the repository root, or None when not inside a repository."""
    root = find_repo_root()
    return root / "benchmarks" / "results" if root else None


def _jsonable(value: Any, where: str = "figures") -> Any:
    """Convert figures to plain JSON types (numpy/torch scalars via .item()); fail loudly otherwise."""
    if value is None or isinstance(value, (bool, int, float, str)):
        return value
    if isinstance(value, Mapping):
        return {str(k): _jsonable(v, f"{where}.{k}") for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_jsonable(v, f"{where}[{i}]") for i, v in enumerate(value)]
    if isinstance(value, Path):
        return str(value)
    if hasattr(value, "item") and callable(value.item):
        try:
            return value.item()
        except (ValueError, RuntimeError):
            pass
    raise TypeError(f"benchmark figure {where} of type {type(value).__name__} is not JSON-serialisable")


def _seed_everything(seed: int) -> None:
    """Seed Python, NumPy and torch RNGs so benchmark inputs are reproducible."""
    random.seed(seed)
    try:
        import numpy

        numpy.random.seed(seed)
    except ImportError:
        pass
    import torch

    torch.manual_seed(seed)


def _version(package: str) -> str | None:
    """Installed version of a distribution, or None if it is not installed."""
    try:
        return metadata.version(package)
    except metadata.PackageNotFoundError:
        return None


def _metadata(area: str, quick: bool, seed: int, elapsed_s: float) -> dict[str, Any]:
    """Run metadata saved next to the figures: versions, threads, machine, time."""
    import torch

    return {
        "area": area,
        "quick": quick,
        "seed": seed,
        "torch": torch.__version__,
        "transformers": _version("transformers"),
        "brisklm": _version("brisklm"),
        "python": platform.python_version(),
        "machine": platform.machine(),
        "cpu_threads": torch.get_num_threads(),
        "cpu_count": os.cpu_count(),
        "timestamp": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        "elapsed_s": round(elapsed_s, 3),
    }


def run_area(area: str, ctx: BenchContext) -> dict[str, Any]:
    """Run one area's benchmark and return its figures with a "meta" entry beside them (nothing written)."""
    fn = get_benchmark(area)
    ctx.out_dir.mkdir(parents=True, exist_ok=True)
    _seed_everything(ctx.seed)
    start = time.perf_counter()
    figures = fn(ctx)
    elapsed = time.perf_counter() - start
    if not isinstance(figures, Mapping):
        raise TypeError(f"benchmark '{area}' returned {type(figures).__name__}; it must return a dict")
    if "meta" in figures:
        raise TypeError(f"benchmark '{area}' returned a figure named 'meta'; that key is reserved")
    return {**_jsonable(figures), "meta": _metadata(area, ctx.quick, ctx.seed, elapsed)}


def figures_of(result: Mapping[str, Any]) -> dict[str, Any]:
    """The figures of one area's result (everything but its metadata)."""
    return {k: v for k, v in result.items() if k != "meta"}


def _write_json(path: Path, data: Mapping[str, Any]) -> Path:
    """Write data as indented JSON, creating parent folders."""
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(data, indent=2, sort_keys=False) + "\n", encoding="utf-8")
    return path


def sections_of(area: str) -> tuple[str, ...]:
    """The sections `--section` may pick: given to `register`, or a declared benchmark module's SECTIONS."""
    if area in _SECTIONS:
        return _SECTIONS[area]
    return tuple(getattr(sys.modules[get_benchmark(area).__module__], "SECTIONS", ()))


def check_sections(area: str, sections: tuple[str, ...]) -> None:
    """A BriskError unless every chosen section is one that `area` registered."""
    if not sections:
        return
    if area == "all":
        raise BriskError("--section needs one benchmark area, not 'all'")
    get_benchmark(area)
    known = sections_of(area)
    unknown = [s for s in sections if s not in known]
    if unknown:
        offer = f"choose from {', '.join(known)}" if known else "this area has no sections; drop --section"
        raise BriskError(f"benchmark area '{area}' has no section {', '.join(map(repr, unknown))}: {offer}")


def merge_sections(saved: Path, result: Mapping[str, Any], sections: tuple[str, ...]) -> dict[str, Any]:
    """The saved results of an area with a section run's figures put in (other figures and the meta kept; the
    run's meta goes under meta.sections.<name>), so one section can be re-measured alone."""
    old = json.loads(saved.read_text(encoding="utf-8")) if saved.exists() else {}
    meta = dict(old.get("meta", {}))
    meta["sections"] = {**meta.get("sections", {}), **{name: result["meta"] for name in sections}}
    return {**figures_of(old), **figures_of(result), "meta": meta}


def _plots_dir(results_dir: Path | None, out: Path | None) -> Path:
    """Where plots go: next to the results, else next to `out`, else a temporary folder."""
    if results_dir is not None:
        return results_dir.parent / "plots"
    if out is not None:
        return out.parent / "plots"
    return Path(tempfile.gettempdir()) / "brisklm-bench-plots"


def run_benchmark(
    area: str,
    quick: bool = False,
    out: Path | None = None,
    seed: int = 0,
    results_dir: Path | None = None,
    save_results: bool = True,
    progress: Callable[..., Any] | None = None,
    sections: tuple[str, ...] = (),
) -> dict[str, Any]:
    """Run `area` (or 'all'), save JSON to `out` and to results_dir, regenerate BENCHMARKS.md, return it.

    results_dir defaults to <repo root>/benchmarks/results (skipped outside a repository);
    save_results=False writes only `out`. BENCHMARKS.md is written next to results_dir. `sections` runs only
    those sections of the area and merges their figures into its saved results.
    """
    if save_results and results_dir is None:
        results_dir = default_results_dir()
    if not save_results:
        results_dir = None
    out = Path(out) if out is not None else None
    plots = _plots_dir(results_dir, out)
    areas = available_areas() if area == "all" else [area]
    if area != "all":
        get_benchmark(area)  # fail fast with the list of available areas
    sections = tuple(sections)
    check_sections(area, sections)
    results: dict[str, dict[str, Any]] = {}
    for name in areas:
        ctx = BenchContext(quick=quick, seed=seed, out_dir=plots / name, progress=progress or _default_progress,
                           sections=sections)
        results[name] = run_area(name, ctx)
        if results_dir is not None:
            saved = Path(results_dir) / f"{name}.json"
            _write_json(saved, merge_sections(saved, results[name], sections) if sections else results[name])
    if results_dir is not None:
        write_benchmarks_md(Path(results_dir), Path(results_dir).parent / "BENCHMARKS.md")
    if area == "all":
        total = sum(r["meta"]["elapsed_s"] for r in results.values())
        result: dict[str, Any] = {"meta": _metadata("all", quick, seed, total), "areas": results}
    else:
        result = results[area]
    if out is not None:
        _write_json(out, result)
    return result
