"""The demo report in headless Chromium: every section and plot renders, the front table comes first, and a
screenshot is kept under report/ (a CI artifact).

By default the report is written here by the same writer `brisk demo` uses, with one section (a table and a plot)
per declared demo module; `make demo` runs this file again with BRISK_REPORT=report/index.html on the real report.
"""

from __future__ import annotations

import os
from pathlib import Path

from brisklm.areas import demo_modules
from brisklm.eval.report import MethodRow, Section, figure_html, new_figure, table_html, write_report

REPO = Path(__file__).resolve().parents[1]


def _report_like_the_demo(out_dir: Path) -> tuple[Path, int]:
    sections = []
    for i, module in enumerate(demo_modules()):
        fig = new_figure(3, 2)
        fig.add_subplot(1, 1, 1).plot([0, 1, 2], [i, i + 1, i])
        html = table_html([{"module": module, "value": i}]) + figure_html(fig, out_dir, f"plot-{i}")
        methods = [MethodRow(f"method {i}", "zoo model", f"accuracy 0.9{i} of dense", 1.5 + i, "dense")]
        sections.append(Section(f"Section of {module}", html, methods))
    return write_report(sections, out_dir), len(sections)


def test_report_sections_and_plots_render(tmp_path: Path, chromium: str) -> None:
    from playwright.sync_api import sync_playwright

    given = os.environ.get("BRISK_REPORT")
    path, expected = (Path(given).resolve(), len(demo_modules())) if given else _report_like_the_demo(tmp_path)
    shots = Path(os.environ.get("BRISK_SCREENSHOT_DIR", REPO / "report"))
    shots.mkdir(parents=True, exist_ok=True)
    with sync_playwright() as pw:
        browser = pw.chromium.launch(executable_path=chromium, headless=True,
                                     args=["--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
                                           "--disable-background-networking", "--disable-component-update"])
        try:
            page = browser.new_page(viewport={"width": 1100, "height": 800})
            errors: list[str] = []
            page.on("pageerror", lambda error: errors.append(str(error)))
            page.goto(path.as_uri(), timeout=30_000)
            first = page.eval_on_selector("body > section", "el => el.id")
            sections = page.locator("body > section:not(#methods)").count()
            images = page.eval_on_selector_all("img", "els => els.map(e => [e.naturalWidth, e.getAttribute('src')])")
            links = page.eval_on_selector_all("nav a", "els => els.map(e => e.getAttribute('href'))")
            front_rows = page.locator("#methods tbody tr").count()
            page.screenshot(path=str(shots / "report-screenshot.png"), full_page=True)
        finally:
            browser.close()
    assert not errors
    assert first == "methods", "the front table must open the report"
    assert front_rows >= 1
    assert sections >= expected
    assert images and all(width > 0 for width, _ in images), f"plots that did not load: {images}"
    assert len(links) == sections and all(page_link.startswith("#s") for page_link in links)
    assert (shots / "report-screenshot.png").stat().st_size > 10_000
