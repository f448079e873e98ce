"""The one list of areas: every declaration resolves, method areas are complete, nothing is skipped silently."""

from __future__ import annotations

import importlib
import inspect

import pytest

import brisklm.areas as areas_module
from brisklm.areas import Area, areas, benchmark_entries, command_modules, demo_modules, recipe_modules, resolve
from brisklm.cli import build_parser
from brisklm.errors import BriskError


def test_every_method_area_has_a_command_a_benchmark_and_a_demo_section() -> None:
    declared = areas()
    assert {area.name for area in declared} >= {"streaming", "pruning", "vision", "reasoning", "analysis", "serve"}
    for area in declared:
        assert area.commands, f"area {area.name} declares no command"
        if area.kind == "method":
            assert area.benchmarks, f"method area {area.name} declares no benchmark"
            assert area.demos, f"method area {area.name} declares no demo section"


def test_every_declared_module_and_function_exists() -> None:
    for module_name in command_modules():
        assert callable(importlib.import_module(module_name).add_commands), module_name
    for module_name in demo_modules():
        assert callable(importlib.import_module(module_name).demo_sections), module_name
    for module_name in recipe_modules():
        importlib.import_module(module_name)
    for name, target in benchmark_entries().items():
        function = resolve(target)
        assert callable(function) and len(inspect.signature(function).parameters) == 1, (name, target)


def test_the_cli_has_a_command_from_every_area() -> None:
    parser = build_parser()
    commands = set(parser._subparsers._group_actions[0].choices)  # noqa: SLF001 - argparse keeps them here
    assert {"stream", "think", "prune", "vision", "reason", "analyze", "serve", "zoo", "bench", "demo",
            "inspect", "generate"} <= commands


def test_a_missing_area_module_is_an_error_not_a_skip(monkeypatch) -> None:
    monkeypatch.setattr(areas_module, "AREA_MODULES", (*areas_module.AREA_MODULES, "brisklm.no_such_area.area"))
    with pytest.raises(ModuleNotFoundError):
        build_parser()


def test_a_module_without_area_is_named(monkeypatch) -> None:
    monkeypatch.setattr(areas_module, "AREA_MODULES", ("brisklm.errors",))
    with pytest.raises(BriskError, match="brisklm.errors does not define AREA"):
        areas()


def test_a_benchmark_declared_twice_is_refused(monkeypatch) -> None:
    twice = (Area("a", "", "method", benchmarks={"x": "m:f"}), Area("b", "", "method", benchmarks={"x": "m:g"}))
    monkeypatch.setattr(areas_module, "areas", lambda: twice)
    with pytest.raises(BriskError, match="'x' is declared by two areas"):
        benchmark_entries()
