"""Turn nested benchmark figures into flat (dotted key -> scalar) rows and format them for tables."""

from __future__ import annotations

import math
from typing import Any, Mapping


def summarise_list(values: list | tuple) -> str:
    """Describe a list in one cell: numbers as n/mean/min/max, anything else by its length."""
    if values and all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in values):
        mean = sum(values) / len(values)
        return f"n={len(values)} mean={format_value(mean)} min={format_value(min(values))} max={format_value(max(values))}"
    return f"list[{len(values)}]"


def flatten(figures: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
    """Flatten nested dicts with dotted keys and summarise lists, so every value fits one table cell."""
    flat: dict[str, Any] = {}
    for key, value in figures.items():
        name = f"{prefix}{key}"
        if isinstance(value, Mapping):
            flat.update(flatten(value, prefix=f"{name}."))
        elif isinstance(value, (list, tuple)):
            flat[name] = summarise_list(value)
        else:
            flat[name] = value
    return flat


def format_value(value: Any) -> str:
    """Format a scalar for a table: floats to 4 significant digits, None as empty."""
    if value is None:
        return ""
    if isinstance(value, bool):
        return str(value)
    if isinstance(value, float):
        if math.isnan(value) or math.isinf(value):
            return str(value)
        return f"{value:.4g}"
    return str(value)
