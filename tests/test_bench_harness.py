"""Benchmark registry, JSON + BENCHMARKS.md writing, timing helpers and the HTML report."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from brisklm.core.timing import median_seconds, time_many
from brisklm.errors import BriskError
from brisklm.eval import bench
from brisklm.eval.bench import BenchContext, register, run_benchmark, write_benchmarks_md
from brisklm.eval.cli import format_figures
from brisklm.eval.progress import quiet_progress
from brisklm.eval.report import (
    DemoContext,
    Section,
    collect_demo_sections,
    figure_html,
    new_figure,
    table_html,
    write_report,
)

DUMMY = "dummy_test_area"


@pytest.fixture
def dummy_area():
    seen: list[BenchContext] = []

    @register(DUMMY)
    def _dummy(ctx: BenchContext) -> dict:
        seen.append(ctx)
        total = sum(ctx.progress(range(3), desc="dummy"))
        return {"speedup": 2.5, "quick": ctx.quick, "nested": {"a": {"b": 1}, "c": 0.123456}, "curve": [1, 2, 3], "n": total}

    yield seen
    bench.unregister(DUMMY)


def test_run_benchmark_writes_json_with_metadata(tmp_path: Path, dummy_area) -> None:
    out = tmp_path / "out" / "dummy.json"
    results_dir = tmp_path / "benchmarks" / "results"
    result = run_benchmark(DUMMY, quick=True, out=out, seed=7, results_dir=results_dir)
    assert dummy_area[0].quick is True and dummy_area[0].seed == 7
    assert dummy_area[0].out_dir.is_dir()
    for path in (out, results_dir / f"{DUMMY}.json"):
        saved = json.loads(path.read_text())
        assert saved["speedup"] == 2.5
        meta = saved["meta"]
        assert meta["area"] == DUMMY and meta["quick"] is True and meta["seed"] == 7
        for key in ("torch", "transformers", "cpu_threads", "timestamp", "elapsed_s"):
            assert key in meta
    assert result["nested"]["a"]["b"] == 1
    md = (tmp_path / "benchmarks" / "BENCHMARKS.md").read_text()
    assert f"## {DUMMY}" in md
    assert "| nested.a.b | 1 |" in md
    assert "| nested.c | 0.1235 |" in md
    assert "n=3 mean=2" in md


def test_save_results_false_writes_only_out(tmp_path: Path, dummy_area, monkeypatch) -> None:
    monkeypatch.chdir(tmp_path)
    (tmp_path / "pyproject.toml").write_text("")
    out = tmp_path / "only.json"
    run_benchmark(DUMMY, quick=True, out=out, save_results=False)
    assert out.is_file()
    assert not (tmp_path / "benchmarks").exists()


def test_results_default_to_repo_root(tmp_path: Path, dummy_area, monkeypatch) -> None:
    (tmp_path / "pyproject.toml").write_text("")
    sub = tmp_path / "deep" / "dir"
    sub.mkdir(parents=True)
    monkeypatch.chdir(sub)
    assert bench.find_repo_root() == tmp_path.resolve()
    run_benchmark(DUMMY, quick=True, out=None)
    assert (tmp_path / "benchmarks" / "results" / f"{DUMMY}.json").is_file()
    assert (tmp_path / "benchmarks" / "BENCHMARKS.md").is_file()


def test_write_benchmarks_md_flattens(tmp_path: Path) -> None:
    (tmp_path / "x.json").write_text(json.dumps({"meta": {"area": "x", "quick": False}, "t": {"fast": 1.0, "slow": {"s": 2}}, "l": ["a", "b"]}))
    md = write_benchmarks_md(tmp_path, tmp_path / "B.md").read_text()
    assert "## x" in md and "| t.fast | 1 |" in md and "| t.slow.s | 2 |" in md and "| l | list[2] |" in md


def test_unknown_area_names_available(dummy_area) -> None:
    with pytest.raises(BriskError, match=f"available: .*{DUMMY}"):
        run_benchmark("no_such_area", quick=True, out=None, save_results=False)


def test_declared_benchmark_resolves_lazily(monkeypatch) -> None:
    import brisklm.areas as areas_module

    monkeypatch.setattr(areas_module, "benchmark_entries", lambda: {"ghost": "brisklm.eval.timing_ghost:run"})
    with pytest.raises(ModuleNotFoundError):  # a declared module that does not exist is an error, never skipped
        run_benchmark("ghost", quick=True, out=None, save_results=False)
    monkeypatch.setattr(areas_module, "benchmark_entries", lambda: {"fmt": "brisklm.eval.cli:format_figures"})
    from brisklm.eval.cli import format_figures

    assert bench.get_benchmark("fmt") is format_figures


def test_all_runs_every_available_area(tmp_path: Path, dummy_area, monkeypatch) -> None:
    # Only the dummy area: real areas (imported by other test files into the registry) are slow.
    monkeypatch.setattr(bench, "_declared", dict)
    monkeypatch.setattr(bench, "_REGISTRY", {DUMMY: bench._REGISTRY[DUMMY]})
    result = run_benchmark("all", quick=True, out=tmp_path / "all.json", results_dir=tmp_path / "results", progress=quiet_progress)
    assert list(result["areas"]) == [DUMMY]
    assert result["meta"]["area"] == "all"
    assert (tmp_path / "results" / f"{DUMMY}.json").is_file()


def test_format_figures_aligned() -> None:
    text = format_figures({"a": 1.23456, "longer": {"b": 2}})
    assert text.splitlines() == ["  a         1.235", "  longer.b  2"]


def test_timing_helpers() -> None:
    calls = []
    stats = time_many(lambda: calls.append(1), repeats=3, warmup=2)
    assert len(calls) == 5 and stats["repeats"] == 3
    assert stats["min_s"] <= stats["median_s"] <= stats["max_s"]
    assert median_seconds(lambda: None, repeats=1, warmup=0) >= 0
    with pytest.raises(BriskError):
        time_many(lambda: None, repeats=0, warmup=0)


def test_report_writes_table_and_figure(tmp_path: Path) -> None:
    html = table_html([{"name": "a<b", "value": 3.14159265}, {"name": "c", "extra": True}])
    assert "a&lt;b" in html and "3.142" in html and "<th>extra</th>" in html
    fig = new_figure()
    fig.add_subplot().plot([0, 1], [1, 0])
    img = figure_html(fig, tmp_path, "my plot")
    assert 'src="figures/my-plot.png"' in img
    assert (tmp_path / "figures" / "my-plot.png").read_bytes()[:4] == b"\x89PNG"
    path = write_report([Section("Results & more", html), Section("Plot", img)], tmp_path)
    text = path.read_text()
    assert path.name == "index.html"
    assert "<table>" in text and "<img " in text and "Results &amp; more" in text and "Generated" in text
    assert 'href="#s1-results-more"' in text


def test_collect_demo_sections_runs_declared_modules_in_order(tmp_path: Path, monkeypatch) -> None:
    import sys
    import types

    import brisklm.areas as areas_module

    for name in ("brisklm_fake_demo_a", "brisklm_fake_demo_b"):
        fake = types.ModuleType(name)
        fake.demo_sections = lambda ctx, name=name: [Section(name, f"<p>{ctx.seed}</p>")]
        monkeypatch.setitem(sys.modules, name, fake)
    monkeypatch.setattr(areas_module, "demo_modules", lambda: ["brisklm_fake_demo_b", "brisklm_fake_demo_a"])
    sections = collect_demo_sections(DemoContext(out_dir=tmp_path, quick=True, seed=4, progress=quiet_progress))
    assert [s.title for s in sections] == ["brisklm_fake_demo_b", "brisklm_fake_demo_a"]
    assert sections[0].html == "<p>4</p>"


def test_collect_demo_sections_does_not_skip_a_missing_module(tmp_path: Path, monkeypatch) -> None:
    import brisklm.areas as areas_module

    monkeypatch.setattr(areas_module, "demo_modules", lambda: ["brisklm.nothing_here.demo"])
    with pytest.raises(ModuleNotFoundError):
        collect_demo_sections(DemoContext(out_dir=tmp_path, progress=quiet_progress))


def test_report_front_table_and_summary(tmp_path: Path) -> None:
    from brisklm.eval.report import MethodRow, method_rows, summary_lines

    sections = [Section("A", "<p>a</p>", [MethodRow("fast", "m1", "accuracy 0.98 of dense", 2.5, "HF forward")]),
                Section("B", "<p>b</p>", [MethodRow("slow", "m2", "BLEU 30 vs 31", None, "dense", "brisk bench b")]),
                Section("C", "<p>c</p>")]
    rows = method_rows(sections)
    assert [r["method"] for r in rows] == ["fast", "slow"]
    assert rows[0]["speed-up"] == "2.50x" and rows[1]["speed-up"] == "—" and rows[1]["speed measured by"] == "brisk bench b"
    text = write_report(sections, tmp_path).read_text()
    assert text.index('id="methods"') < text.index("<nav>") < text.index('id="s1-a"')
    lines = summary_lines(sections, tmp_path / "index.html")
    assert len(lines) == 3 and "2 methods" in lines[1] and "1 timed" in lines[1] and "fast 2.50x against HF forward" in lines[2]
    assert "Methods at a glance" not in write_report(sections[2:], tmp_path / "none").read_text()
