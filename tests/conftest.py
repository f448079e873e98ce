"""Shared fixtures: tiny random models of every supported family (no downloads)."""

import os

import pytest
import torch

from brisklm.core.families import FAMILY_CLASSES, family_classes

FAMILIES = {family: family_classes(family) for family in FAMILY_CLASSES}


def family_config_kwargs(family: str, layers: int) -> dict:
    """Per-family settings that make the tiny model exercise what the family has: sliding windows shorter
    than the test sequences, alternating sliding/global layers, soft-caps that bite, partial rotary."""
    alternating = ["sliding_attention" if i % 2 == 0 else "full_attention" for i in range(layers)]
    gemma = dict(head_dim=16, query_pre_attn_scalar=32, sliding_window=4, layer_types=alternating)
    return {
        "llama": {},
        "qwen2": dict(use_sliding_window=True, sliding_window=4, max_window_layers=1),
        "qwen3": dict(use_sliding_window=True, sliding_window=4, max_window_layers=1),
        "mistral": dict(sliding_window=4),
        "gemma2": dict(gemma, attn_logit_softcapping=1.0, final_logit_softcapping=3.0, initializer_range=0.1),
        "gemma3": dict(gemma, final_logit_softcapping=1.0,
                       rope_parameters={"sliding_attention": {"rope_type": "default", "rope_theta": 10.0},
                                        "full_attention": {"rope_type": "default", "rope_theta": 10000.0}}),
        "phi3": dict(sliding_window=5, partial_rotary_factor=0.5, pad_token_id=None, eos_token_id=2),
    }[family]


@pytest.fixture
def one_thread():
    """Run a test with one torch thread (tiny per-token steps: threads only add contention)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def tiny_model(family: str = "llama", layers: int = 3, kv_heads: int = 2, seed: int = 0):
    """A random fp32 model of the family: d=64, 4 heads (GQA with 2 KV heads by default), vocab 97.

    Windowed families get a window of 4-5 rows (see `family_config_kwargs`)."""
    torch.manual_seed(seed)
    config_cls, model_cls = FAMILIES[family]
    config = config_cls(
        vocab_size=97,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=layers,
        num_attention_heads=4,
        num_key_value_heads=kv_heads,
        max_position_embeddings=256,
        **family_config_kwargs(family, layers),
    )
    return model_cls(config).eval()


def random_calibration(n: int, length: int, seed: int = 0):
    """`n` random token sequences of `length` ids in [4, 97) as CalibData (labels shifted, first ignored)."""
    from brisklm.pruning.calibration import CalibData

    g = torch.Generator().manual_seed(seed)
    feats = []
    for _ in range(n):
        ids = torch.randint(4, 97, (length,), generator=g).tolist()
        feats.append({"input_ids": ids, "labels": [-100] + ids[1:]})
    return CalibData(feats, None, "random")


def run_cli(argv, capsys) -> str:
    """Run `brisk ARGV` in-process; assert it exits 0 (showing the end of its stderr if not); return its stdout."""
    from brisklm.cli import main

    rc = main(argv)
    captured = capsys.readouterr()
    assert rc == 0, captured.err[-2000:]
    return captured.out


@pytest.fixture(params=sorted(FAMILIES))
def family_model(request):
    return request.param, tiny_model(request.param)


@pytest.fixture
def llama_model():
    return tiny_model("llama")


@pytest.fixture
def chromium() -> str:
    """Debian's headless Chromium for Playwright (never a downloaded browser). In CI (CI=true) a missing browser
    fails the test, elsewhere it skips with the install line."""
    import shutil

    wanted = os.environ.get("BRISK_CHROMIUM", "/usr/bin/chromium")
    found = wanted if os.path.exists(wanted) else shutil.which("chromium")
    missing = None if found else (f"chromium not found at {wanted}: install it with `apt-get install chromium` "
                                  "(or set BRISK_CHROMIUM)")
    try:
        import playwright.sync_api  # noqa: F401
    except ImportError:
        missing = "the playwright Python package is missing: pip install playwright (no browser download needed)"
    if missing:
        if os.environ.get("CI", "").lower() == "true":
            pytest.fail(missing)
        pytest.skip(missing)
    return found


@pytest.fixture(scope="session")
def fixture_checkpoints(tmp_path_factory):
    """`checkpoint_path(style)`: a real-convention random-weight checkpoint folder, built once per test session."""
    from brisklm.testing.checkpoints import build_checkpoint

    root = tmp_path_factory.mktemp("fixture-checkpoints")
    built: dict = {}

    def checkpoint_path(style: str):
        if style not in built:
            built[style] = build_checkpoint(style, root / style)
        return built[style]

    return checkpoint_path


# The CPU suite runs on the CPU on any machine ("auto" would pick a GPU); `gpu` tests pass their device explicitly.
os.environ.setdefault("BRISK_DEVICE", "cpu")


def pytest_collection_modifyitems(config, items):
    """Skip tests marked `gpu` on a machine without CUDA (so `make test` keeps running on the CPU)."""
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU (run `make gpu-check` on a GPU machine)")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)
