"""`brisk bench core` reports the no-op plan's exactness figures."""

from brisklm.eval.bench import run_benchmark


def test_bench_core_quick(tmp_path):
    result = run_benchmark("core", quick=True, out=tmp_path / "f.json", save_results=False)
    assert result["noop_max_abs_diff"] < 1e-4
    assert result["noop_cache_max_abs_diff"] < 1e-4
    assert (tmp_path / "f.json").exists()
