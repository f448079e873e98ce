"""The one list of brisklm's areas.

Each area package declares, in its `area.py`, an `AREA` naming its command modules, its benchmarks, its demo
sections and its zoo recipe modules. Everything that needs "all areas" (the `brisk` parser, `brisk bench`,
`brisk demo`, the zoo registry) reads them from here, so adding an area is one file and one line below.
Modules are named as strings and imported on first use: declaring an area imports nothing heavy.
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass, field
from typing import Any, Literal, Mapping

from brisklm.errors import BriskError

# One line per area package; the order is the order of `brisk --help`, `brisk bench all` and the report.
AREA_MODULES: tuple[str, ...] = (
    "brisklm.core.area",
    "brisklm.zoo.area",
    "brisklm.eval.area",
    "brisklm.streaming.area",
    "brisklm.pruning.area",
    "brisklm.vision.area",
    "brisklm.reasoning.area",
    "brisklm.analysis.area",
    "brisklm.serve.area",
)


@dataclass(frozen=True)
class Area:
    """What one area contributes. A `method` area has commands, a benchmark and a demo section;
    an `infrastructure` area (core, zoo, eval) has commands and may have the others."""

    name: str
    summary: str
    kind: Literal["method", "infrastructure"]
    commands: tuple[str, ...] = ()  # modules defining add_commands(subparsers)
    benchmarks: Mapping[str, str] = field(default_factory=dict)  # benchmark name -> "module:function"
    demos: tuple[str, ...] = ()  # modules defining demo_sections(ctx) -> list[Section]
    recipes: tuple[str, ...] = ()  # modules that register zoo recipes when imported


def _load(module_name: str) -> Area:
    module = importlib.import_module(module_name)
    area = getattr(module, "AREA", None)
    if not isinstance(area, Area):
        raise BriskError(f"{module_name} does not define AREA = Area(...); every module in AREA_MODULES must")
    return area


def areas() -> tuple[Area, ...]:
    """Every declared area, in AREA_MODULES order; a missing declaration module is an error, not a skip."""
    return tuple(_load(name) for name in AREA_MODULES)


def command_modules() -> list[str]:
    """Every area's command modules, in area order."""
    return [module for area in areas() for module in area.commands]


def benchmark_entries() -> dict[str, str]:
    """Benchmark name -> "module:function" over all areas; a name declared twice is an error."""
    entries: dict[str, str] = {}
    for area in areas():
        for name, target in area.benchmarks.items():
            if name in entries:
                raise BriskError(f"benchmark '{name}' is declared by two areas; rename one")
            entries[name] = target
    return entries


def demo_modules() -> list[str]:
    """Every area's demo-section modules, in area order."""
    return [module for area in areas() for module in area.demos]


def recipe_modules() -> list[str]:
    """Every area's zoo recipe modules, in area order."""
    return [module for area in areas() for module in area.recipes]


def resolve(target: str) -> Any:
    """Import "package.module:attribute" and return the attribute."""
    module_name, _, attribute = target.partition(":")
    if not attribute:
        raise BriskError(f"'{target}' is not of the form 'module:function'")
    return getattr(importlib.import_module(module_name), attribute)
