"""The demo report: areas contribute HTML sections (tables, PNG figures); one index.html ties them together."""

from __future__ import annotations

import datetime as _dt
import html
import importlib
import re
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Mapping, Sequence

from brisklm.eval.flatten import format_value
from brisklm.eval.progress import progress as _default_progress



@dataclass
class MethodRow:
    """One line of the report's front table: what a method kept and what it saved, measured in this run.

    `speedup` is None where the demo does not time the method; `speed_source` then names the benchmark that does."""

    method: str
    model: str
    quality_kept: str  # e.g. "accuracy 0.97 of dense" or "BLEU 41.2 vs 43.0 offline"
    speedup: float | None
    baseline: str  # what the speed-up (or the quality) is measured against
    speed_source: str = "this run"


@dataclass
class Section:
    """One titled block of the report; `html` is trusted markup built with table_html/figure_html.

    `methods` are the section's rows of the front table."""

    title: str
    html: str
    methods: list[MethodRow] = field(default_factory=list)


@dataclass
class DemoContext:
    """What a demo module gets: the report folder (for figures), quick mode, seed and a progress helper."""

    out_dir: Path
    quick: bool = False
    seed: int = 0
    progress: Callable[..., Any] = field(default=_default_progress)


def new_figure(width: float = 6.0, height: float = 3.5) -> Any:
    """A matplotlib Figure on the Agg canvas (no pyplot, no display needed), for figure_html."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(width, height), dpi=100)
    FigureCanvasAgg(fig)
    return fig


def table_html(rows: Sequence[Mapping[str, Any]], columns: Sequence[str] | None = None) -> str:
    """An escaped HTML table; columns default to the keys in order of first appearance, floats to 4 sig. digits."""
    if columns is None:
        columns = list(dict.fromkeys(key for row in rows for key in row))
    head = "".join(f"<th>{html.escape(str(c))}</th>" for c in columns)
    body = "".join(
        "<tr>" + "".join(f"<td>{html.escape(format_value(row.get(c)))}</td>" for c in columns) + "</tr>"
        for row in rows
    )
    return f'<table><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>'


def _slug(text: str) -> str:
    """Lower-case file/anchor-safe name: letters, digits, '-' and '_' only."""
    return re.sub(r"[^A-Za-z0-9_-]+", "-", text).strip("-").lower() or "item"


def save_figure(fig: Any, out_dir: Path | None, name: str) -> Path | None:
    """Save a benchmark plot as out_dir/name (folder created, 110 dpi, tight box); None when out_dir is None."""
    if out_dir is None:
        return None
    path = Path(out_dir) / name
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110, bbox_inches="tight")
    return path


def figure_html(fig: Any, out_dir: Path, name: str, alt: str | None = None) -> str:
    """Save a matplotlib Figure as out_dir/figures/<name>.png and return an <img> tag with a relative path."""
    out_dir = Path(out_dir)
    relative = Path("figures") / f"{_slug(name)}.png"
    (out_dir / relative).parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out_dir / relative, format="png", bbox_inches="tight")
    if "matplotlib.pyplot" in sys.modules:  # free pyplot-managed figures
        import matplotlib.pyplot as plt

        plt.close(fig)
    alt_text = html.escape(alt if alt is not None else name, quote=True)
    return f'<img src="{relative.as_posix()}" alt="{alt_text}">'


_CSS = """
body { font-family: system-ui, -apple-system, "Segoe UI", sans-serif; max-width: 60rem; margin: 2rem auto;
       padding: 0 1rem; line-height: 1.5; color: #222; }
h1 { border-bottom: 2px solid #ccc; padding-bottom: .3rem; }
h2 { margin-top: 2.5rem; border-bottom: 1px solid #ddd; }
nav ul { columns: 2; }
table { border-collapse: collapse; margin: 1rem 0; font-size: .92rem; }
th, td { border: 1px solid #ccc; padding: .3rem .6rem; text-align: left; }
th { background: #f3f3f3; }
tr:nth-child(even) td { background: #fafafa; }
img { max-width: 100%; margin: 1rem 0; }
.meta { color: #666; font-size: .9rem; }
""".strip()


def method_rows(sections: Sequence[Section]) -> list[dict[str, Any]]:
    """The front table's rows: every section's methods, in report order."""
    return [{"method": m.method, "quality kept": m.quality_kept,
             "speed-up": "—" if m.speedup is None else f"{m.speedup:.2f}x",
             "against": m.baseline, "speed measured by": m.speed_source, "model": m.model}
            for section in sections for m in section.methods]


def _front_table(sections: Sequence[Section]) -> str:
    rows = method_rows(sections)
    if not rows:
        return ""
    return f'<section id="methods"><h2>Methods at a glance</h2>\n{table_html(rows)}\n</section>\n'


def summary_lines(sections: Sequence[Section], path: Path) -> list[str]:
    """Three lines for the terminal at the end of `brisk demo`: where the report is, and what it holds."""
    rows = [m for section in sections for m in section.methods]
    timed = [m for m in rows if m.speedup is not None]
    best = max(timed, key=lambda m: m.speedup) if timed else None
    return [
        f"report: {path}",
        f"  {len(sections)} sections, {len(rows)} methods in the front table, {len(timed)} timed in this run",
        (f"  largest measured speed-up: {best.method} {best.speedup:.2f}x against {best.baseline}" if best
         else "  no method was timed in this run (see brisk bench AREA)"),
    ]


def render_report(sections: Sequence[Section], title: str = "brisklm demo report") -> str:
    """The full index.html text: CSS, generation time, table of contents and the sections."""
    generated = _dt.datetime.now().astimezone().strftime("%Y-%m-%d %H:%M:%S %Z")
    anchors: list[str] = []
    for i, section in enumerate(sections):
        anchors.append(f"s{i + 1}-{_slug(section.title)}")
    toc = "".join(
        f'<li><a href="#{a}">{html.escape(s.title)}</a></li>' for a, s in zip(anchors, sections)
    )
    front = _front_table(sections)
    body = "\n".join(
        f'<section id="{a}"><h2>{html.escape(s.title)}</h2>\n{s.html}\n</section>'
        for a, s in zip(anchors, sections)
    )
    return (
        "<!DOCTYPE html>\n<html lang=\"en\">\n<head>\n<meta charset=\"utf-8\">\n"
        f"<title>{html.escape(title)}</title>\n<style>\n{_CSS}\n</style>\n</head>\n<body>\n"
        f"<h1>{html.escape(title)}</h1>\n<p class=\"meta\">Generated {html.escape(generated)}</p>\n"
        f"{front}<nav><h2>Contents</h2><ul>{toc}</ul></nav>\n{body}\n</body>\n</html>\n"
    )


def write_report(sections: Sequence[Section], out_dir: Path) -> Path:
    """Write out_dir/index.html from the sections and return its path."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    path = out_dir / "index.html"
    path.write_text(render_report(sections), encoding="utf-8")
    return path


def collect_demo_sections(ctx: DemoContext) -> list[Section]:
    """Run every declared demo module's demo_sections(ctx), in area order, and concatenate."""
    from brisklm.areas import demo_modules

    modules = [importlib.import_module(name) for name in demo_modules()]
    sections: list[Section] = []
    for module in ctx.progress(modules, desc="demo sections", total=len(modules)):
        sections.extend(module.demo_sections(ctx))
    return sections
