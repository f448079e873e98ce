"""`brisk bench AREA` and `brisk demo`: run benchmarks into JSON/BENCHMARKS.md, build the HTML demo report."""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any, Mapping

from brisklm.core.device import add_device_args
from brisklm.eval.flatten import flatten, format_value


def _use_agg() -> None:
    """Select matplotlib's headless Agg backend for command-line runs (no display needed)."""
    import matplotlib

    matplotlib.use("Agg")


def format_figures(figures: Mapping[str, Any]) -> str:
    """Figures as an aligned two-column text table (dotted keys for nested dicts)."""
    flat = flatten(figures)
    if not flat:
        return "  (no figures)"
    width = max(len(key) for key in flat)
    return "\n".join(f"  {key.ljust(width)}  {format_value(value)}" for key, value in flat.items())


def _print_result(area: str, result: Mapping[str, Any]) -> None:
    """Print one area's figures under a heading with its elapsed time."""
    elapsed = result.get("meta", {}).get("elapsed_s")
    print(f"{area}  ({format_value(elapsed)} s)")
    print(format_figures({k: v for k, v in result.items() if k != "meta"}))


def _bench(args: argparse.Namespace) -> int:
    """Run `brisk bench`: run the area(s), print the figures and the files written."""
    from brisklm.eval.bench import default_results_dir, run_benchmark

    _use_agg()
    # A --quick run is a smoke test at small sizes: it never replaces the measured figures in benchmarks/results.
    results_dir = None if args.quick else default_results_dir()
    result = run_benchmark(args.area, quick=args.quick, out=args.out, seed=args.seed, results_dir=results_dir,
                           save_results=not args.quick, sections=tuple(args.section))
    per_area = result["areas"] if args.area == "all" else {args.area: result}
    for area, area_result in per_area.items():
        _print_result(area, area_result)
    if args.out is not None:
        print(f"wrote {args.out}")
    if args.quick:
        print("quick run: benchmarks/results left as they are (pass --out FILE.json to keep these figures)")
    if results_dir is not None:
        for area in per_area:
            print(f"wrote {results_dir / f'{area}.json'}")
        print(f"wrote {results_dir.parent / 'BENCHMARKS.md'}")
    return 0


def _demo(args: argparse.Namespace) -> int:
    """Run `brisk demo`: collect every area's demo sections and write the HTML report."""
    from brisklm.eval.report import DemoContext, collect_demo_sections, summary_lines, write_report

    _use_agg()
    ctx = DemoContext(out_dir=args.out_dir, quick=args.quick, seed=args.seed)
    sections = collect_demo_sections(ctx)
    path = write_report(sections, args.out_dir)
    print("\n".join(summary_lines(sections, path)))
    return 0


def add_commands(subparsers: argparse._SubParsersAction) -> None:
    """Add the `bench` and `demo` subcommands to the `brisk` parser."""
    bench = subparsers.add_parser("bench", help="run a benchmark area and save its figures as JSON")
    bench.add_argument("area", metavar="AREA", help="benchmark area (core, streaming, ..., or 'all')")
    bench.add_argument("--quick", action="store_true", help="small sizes, for CI and smoke tests")
    bench.add_argument("--out", type=Path, default=None, metavar="FILE.json", help="also write the JSON here")
    bench.add_argument("--seed", type=int, default=0, help="random seed (default 0)")
    bench.add_argument("--section", action="append", default=[], metavar="NAME",
                       help="run only this section of the area (repeatable; e.g. streaming: real_shape); its "
                            "figures are merged into the saved results")
    add_device_args(bench)
    bench.set_defaults(func=_bench)

    demo = subparsers.add_parser("demo", help="run every method on the tiny models and write an HTML report")
    demo.add_argument("--quick", action="store_true", help="small sizes, for CI and smoke tests")
    demo.add_argument("--out-dir", type=Path, default=Path("report"), help="report folder (default: report)")
    demo.add_argument("--seed", type=int, default=0, help="random seed (default 0)")
    add_device_args(demo)
    demo.set_defaults(func=_demo)
