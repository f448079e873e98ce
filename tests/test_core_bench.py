"""`brisk bench core` reports the no-op plan's exactness figures."""

from brisklm.eval.bench import run_benchmark


def test_bench_core_quick(tmp_path):
    result = run_benchmark("core", quick=True, out=tmp_path / "f.json", save_results=False)
    assert result["noop_max_abs_diff"] < 1e-4
    assert result["noop_cache_max_abs_diff"] < 1e-4
    from brisklm.core import SUPPORTED_FAMILIES

    for family in SUPPORTED_FAMILIES:
        assert result[f"noop_max_abs_diff_{family}"] < 1e-4
        assert result[f"noop_cache_max_abs_diff_{family}"] < 1e-4
    assert 0 < result["bf16_vs_fp32_max_abs_diff"] <= 2 * result["hf_bf16_vs_fp32_max_abs_diff"] + 0.02
    assert result["window_custom_rule_max_abs_diff"] < 1e-4
    assert min(result["window_ignored_max_abs_diff"].values()) > 1e-2  # the window matters in this bench
    assert (tmp_path / "f.json").exists()
