"""The zoo's section of the demo report: every default model, trained or loaded, with its quality."""

from __future__ import annotations

from brisklm.eval.report import DemoContext, Section, table_html
from brisklm.zoo.registry import recipes
from brisklm.zoo.store import read_quality, train


def demo_sections(ctx: DemoContext) -> list[Section]:
    rows = []
    for name, recipe in ctx.progress(list(recipes().items()), desc="zoo models"):
        quality = read_quality(train(name, seed=ctx.seed)) or {}
        rows.append({
            "model": name,
            "task": recipe.task,
            "metric": recipe.quality_metric,
            "value": quality.get(recipe.quality_metric),
            "parameters (M)": quality.get("parameters", 0) / 1e6,
            "train steps": quality.get("train_steps"),
            "train s": quality.get("wall_seconds"),
            "description": recipe.description,
        })
    intro = ("<p>Default tiny models, trained by brisklm on its own synthetic tasks (cached under "
             "<code>$BRISK_HOME/zoo</code>). Quality is measured on each task's held-out test split.</p>")
    return [Section("Model zoo", intro + table_html(rows))]
