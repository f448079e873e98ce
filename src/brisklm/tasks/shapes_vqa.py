"""ShapesVQA: small RGB images of coloured shapes on a 4x4 grid with single-word-answer questions."""

from __future__ import annotations

import random
from typing import Any

import numpy as np

from brisklm.errors import BriskError
from brisklm.tasks.base import Example, Task, sorted_vocab

GRID = 4
SHAPES = ("square", "circle", "triangle", "cross", "bar")
COLORS: dict[str, tuple[int, int, int]] = {
    "red": (230, 30, 30), "green": (30, 200, 40), "blue": (40, 60, 230),
    "yellow": (240, 230, 40), "purple": (150, 40, 200), "orange": (250, 140, 20),
}
NUMBER_WORDS = ("zero", "one", "two", "three", "four", "five")
RELATIONS: dict[str, tuple[str, ...]] = {"left": ("left", "of"), "right": ("right", "of"), "above": ("above",),
                                         "below": ("below",)}
FAMILIES = ("attribute", "existence", "counting", "spatial")
QUESTION_WORDS = ("what", "color", "is", "the", "there", "a", "how", "many", "shapes", "shape", "in", "row",
                  "column", "?", "yes", "no", "nothing", "left", "right", "of", "above", "below")


def shape_mask(shape: str, cell: int) -> np.ndarray:
    """Boolean cell-sized mask of one shape, inset by one pixel so neighbours never touch."""
    y, x = np.mgrid[0:cell, 0:cell].astype(float)
    c = (cell - 1) / 2
    inside = (y >= 1) & (y <= cell - 2) & (x >= 1) & (x <= cell - 2)
    half = max(1, cell // 8)
    if shape == "square":
        return inside
    if shape == "circle":
        return (y - c) ** 2 + (x - c) ** 2 <= ((cell - 2) / 2) ** 2
    if shape == "triangle":
        return inside & (np.abs(x - c) <= (y - 1) / 2 + 0.5)
    if shape == "cross":
        return inside & ((np.abs(x - c) < half) | (np.abs(y - c) < half))
    if shape == "bar":
        return inside & (np.abs(y - c) < half)
    raise BriskError(f"unknown shape {shape!r}: use one of {', '.join(SHAPES)}")


def render(objects: list[dict[str, Any]], image_size: int = 32) -> np.ndarray:
    """Draw objects (dicts with shape, color, 1-based row and col) onto a black uint8 image of shape (H, W, 3)."""
    cell = image_size // GRID
    image = np.zeros((image_size, image_size, 3), dtype=np.uint8)
    for obj in objects:
        top, left = (obj["row"] - 1) * cell, (obj["col"] - 1) * cell
        patch = image[top:top + cell, left:left + cell]
        patch[shape_mask(obj["shape"], cell)] = COLORS[obj["color"]]
    return image


def _cells(objects: list[dict[str, Any]]) -> list[tuple[int, int]]:
    """1-based (row, col) of each object, the image regions a question depends on."""
    return [(o["row"], o["col"]) for o in objects]


def _nearest(objects: list[dict[str, Any]], ref: dict[str, Any], relation: str) -> dict[str, Any] | None:
    """The closest object in the given direction on the same row (left/right) or column (above/below)."""
    if relation in ("left", "right"):
        line = [o for o in objects if o["row"] == ref["row"]]
        sign, key = (-1 if relation == "left" else 1), "col"
    else:
        line = [o for o in objects if o["col"] == ref["col"]]
        sign, key = (-1 if relation == "above" else 1), "row"
    ahead = [o for o in line if (o[key] - ref[key]) * sign > 0]
    return min(ahead, key=lambda o: abs(o[key] - ref[key]), default=None)


class ShapesVQATask(Task):
    """Images in meta['image']; questions of four families (attribute, existence, counting, spatial)."""

    name = "shapes_vqa"

    def __init__(self, image_size: int = 32, min_objects: int = 1, max_objects: int = 5,
                 families: tuple[str, ...] = FAMILIES) -> None:
        """Configure image size (multiple of 4), objects per image (1..5) and the question families to draw."""
        if image_size % GRID or image_size < 4 * GRID:
            raise BriskError(f"image_size must be a multiple of {GRID} and >= {4 * GRID}, got {image_size}")
        if not 1 <= min_objects <= max_objects <= 5:
            raise BriskError(f"need 1 <= min_objects <= max_objects <= 5, got {min_objects}, {max_objects}")
        bad = [f for f in families if f not in FAMILIES]
        if bad or not families:
            raise BriskError(f"unknown question families {bad}: choose from {', '.join(FAMILIES)}")
        self.image_size, self.min_objects, self.max_objects = image_size, min_objects, max_objects
        self.families = tuple(families)

    def vocabulary(self) -> list[str]:
        """Question and answer words: shapes, colours, number words and templates."""
        return sorted_vocab(SHAPES, COLORS, NUMBER_WORDS, QUESTION_WORDS)

    def split_key(self, example: Example) -> str:
        """Question plus scene layout, so an image-question pair never appears in both splits."""
        layout = sorted((o["row"], o["col"], o["shape"], o["color"]) for o in example.meta["objects"])
        return example.prompt + " | " + repr(layout)

    def _scene(self, rng: random.Random) -> list[dict[str, Any]]:
        """Random objects in distinct cells."""
        cells = rng.sample(range(GRID * GRID), rng.randint(self.min_objects, self.max_objects))
        return [{"shape": rng.choice(SHAPES), "color": rng.choice(tuple(COLORS)), "row": c // GRID + 1,
                 "col": c % GRID + 1} for c in cells]

    def _ask(self, rng: random.Random, family: str, objects: list[dict[str, Any]]) -> tuple[str, str, list] | None:
        """Question, answer and relevant cells for one family, or None when the scene cannot support it."""
        if family == "attribute":
            unique = [o for o in objects if sum(p["shape"] == o["shape"] for p in objects) == 1]
            if not unique:
                return None
            obj = rng.choice(unique)
            return f"what color is the {obj['shape']} ?", obj["color"], _cells([obj])
        if family == "existence":
            if rng.random() < 0.5:
                obj = rng.choice(objects)
                color, shape = obj["color"], obj["shape"]
            else:
                color, shape = rng.choice(tuple(COLORS)), rng.choice(SHAPES)
            hits = [o for o in objects if o["color"] == color and o["shape"] == shape]
            return f"is there a {color} {shape} ?", "yes" if hits else "no", _cells(hits)
        if family == "counting":
            color = rng.choice(objects)["color"] if rng.random() < 0.75 else rng.choice(tuple(COLORS))
            hits = [o for o in objects if o["color"] == color]
            return f"how many {color} shapes ?", NUMBER_WORDS[len(hits)], _cells(hits)
        if rng.random() < 0.5:
            row, col = rng.randint(1, GRID), rng.randint(1, GRID)
            found = [o for o in objects if o["row"] == row and o["col"] == col]
            answer = found[0]["shape"] if found else "nothing"
            return f"what is in row {NUMBER_WORDS[row]} column {NUMBER_WORDS[col]} ?", answer, [(row, col)]
        options = []
        for ref in objects:
            if sum(p["shape"] == ref["shape"] and p["color"] == ref["color"] for p in objects) != 1:
                continue
            for relation in RELATIONS:
                other = _nearest(objects, ref, relation)
                if other is not None:
                    options.append((ref, relation, other))
        if not options:
            return None
        ref, relation, other = rng.choice(options)
        words = " ".join(RELATIONS[relation])
        question = f"what shape is {words} the {ref['color']} {ref['shape']} ?"
        return question, other["shape"], _cells([ref, other])

    def generate(self, rng: random.Random) -> Example:
        """Draw a scene and a question family, redrawing the scene until the question is answerable."""
        family = rng.choice(self.families)
        while True:
            objects = self._scene(rng)
            asked = self._ask(rng, family, objects)
            if asked is not None:
                break
        question, answer, relevant = asked
        meta = {"image": render(objects, self.image_size), "family": family, "objects": objects,
                "relevant_cells": relevant, "question": question}
        return Example(prompt=question, completion=answer, answer=answer, meta=meta)
