"""The zoo's recipes: how each default tiny model is trained and how its quality is measured.

Areas add recipes by calling `register`; each area declares its recipe modules (brisklm.areas), imported lazily.
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

from brisklm.errors import BriskError


@dataclass
class ZooRecipe:
    """A named default model: `train(recipe, out_dir, seed)` saves an HF checkpoint and returns its quality."""

    name: str
    description: str
    task: str
    train: Callable[["ZooRecipe", Path, int], dict[str, Any]]
    quality_metric: str
    options: dict[str, Any] = field(default_factory=dict)


_RECIPES: dict[str, ZooRecipe] = {}
_loaded = False


def register(recipe: ZooRecipe) -> ZooRecipe:
    """Add a recipe (a later registration of the same name replaces the earlier one)."""
    _RECIPES[recipe.name] = recipe
    return recipe


def _load_all() -> None:
    global _loaded
    if _loaded:
        return
    from brisklm.areas import recipe_modules

    for module_name in recipe_modules():
        importlib.import_module(module_name)
    _loaded = True


def recipes() -> dict[str, ZooRecipe]:
    """All registered recipes by name."""
    _load_all()
    return dict(sorted(_RECIPES.items()))


def get_recipe(name: str) -> ZooRecipe:
    """The recipe of a zoo name, or a BriskError listing the known names."""
    known = recipes()
    if name not in known:
        raise BriskError(f"no zoo model named {name!r}; known zoo models: {', '.join(known)}")
    return known[name]
