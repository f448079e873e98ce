#!/usr/bin/env bash
# `make gpu-check`: the one prepared command for a CUDA machine (under 10 minutes on one GPU).
#   1. set-up: a venv `.venv-gpu` that reuses a CUDA build of torch when the machine already has one
#      (python3 -m venv --system-site-packages; brisklm installed with --no-deps so pip never swaps that torch
#      for the CPU pin); otherwise a fresh venv with torch from PyPI (a CUDA build on Linux) and the package;
#   2. the `gpu` tests (pytest -m gpu): no-op plan, generate, streaming, sparse and vision paths on cuda,
#      fp32 and bf16 against the CPU fp32 reference;
#   3. the real-shape benchmark (random Qwen2.5-0.5B shape) in float32 and bfloat16 against HF's own forward and
#      generate; figures go to benchmarks/results/realshape.json and are printed with their ratios;
#   4. the streaming real-shape section (GPE vs re-encoding, bfloat16) into benchmarks/results/streaming.json, and
#      the vision real-shape section (LLaVA-1.5 layout, bfloat16) into benchmarks/results/vision.json.
# Needs no download beyond the set-up's pip installs (none when the machine already has the packages).
set -euo pipefail
cd "$(dirname "$0")/.."

PYTHON=${PYTHON:-python3}
VENV=${GPU_VENV:-.venv-gpu}
PY="$VENV/bin/python"

has_cuda_torch() {  # $1: a python; true when it imports a CUDA torch that sees a GPU
    "$1" -c 'import sys, torch; sys.exit(0 if torch.version.cuda and torch.cuda.is_available() else 1)' 2>/dev/null
}

if ! { command -v nvidia-smi >/dev/null && nvidia-smi -L >/dev/null 2>&1; }; then
    echo "gpu-check: error: no NVIDIA GPU here (nvidia-smi finds none); run make gpu-check on a CUDA machine" >&2
    exit 2
fi
start=$(date +%s)
if [ -x "$PY" ] && has_cuda_torch "$PY"; then
    echo "gpu-check: reusing $VENV"
elif has_cuda_torch "$PYTHON"; then
    echo "gpu-check: $PYTHON has a CUDA torch; $VENV reuses it (--system-site-packages)"
    "$PYTHON" -m venv --system-site-packages "$VENV"
else
    echo "gpu-check: no CUDA torch found; installing torch from PyPI into $VENV"
    "$PYTHON" -m venv "$VENV"
    "$PY" -m pip install --quiet torch==2.13.0
fi
has_cuda_torch "$PY" || { echo "gpu-check: error: $PY has no CUDA torch that sees a GPU; is this a GPU machine?" >&2; exit 2; }

# brisklm itself, without touching torch; then whichever of its other requirements are missing.
"$PY" -m pip install --quiet --no-deps --no-build-isolation -e . 2>/dev/null \
    || echo "gpu-check: editable install failed; running from src/ (PYTHONPATH)"
export PYTHONPATH="$PWD/src${PYTHONPATH:+:$PYTHONPATH}"
missing=$("$PY" - <<'EOF'
import importlib.util, re
try:
    import tomllib
except ImportError:  # Python 3.10: skip the check (pip install -e '.[test]' by hand if something is missing)
    raise SystemExit(0)
deps = tomllib.load(open("pyproject.toml", "rb"))["project"]
wanted = deps["dependencies"] + deps["optional-dependencies"]["test"]
modules = {"pillow": "PIL", "pytest": "pytest"}
out = []
for spec in wanted:
    name = re.split(r"[<>=!~ \[]", spec, 1)[0]
    if name == "torch":
        continue
    if importlib.util.find_spec(modules.get(name, name.replace("-", "_"))) is None:
        out.append(spec)
print(" ".join(f"'{s}'" for s in out))
EOF
)
if [ -n "$missing" ]; then
    echo "gpu-check: installing missing requirements: $missing"
    eval "$PY -m pip install --quiet $missing"
fi
"$PY" -c 'import torch; print(f"gpu-check: torch {torch.__version__} (CUDA {torch.version.cuda}) on {torch.cuda.get_device_name(0)}")'
setup=$(( $(date +%s) - start ))

status=0
t0=$(date +%s)
timeout 150 "$PY" -m pytest -q -p no:cacheprovider -m gpu tests || status=$?
tests=$(( $(date +%s) - t0 ))

t0=$(date +%s)
BRISK_DEVICE=cuda timeout 180 "$PY" -m brisklm.cli bench realshape --device cuda || status=$?
BRISK_DEVICE=cuda timeout 120 "$PY" -m brisklm.cli bench streaming --section real_shape --device cuda \
    --dtype bfloat16 || status=$?  # GPE vs re-encoding at the real shape -> streaming.json real_shape_cuda_bfloat16
BRISK_DEVICE=cuda timeout 120 "$PY" -m brisklm.cli bench vision --section real_shape --device cuda \
    --dtype bfloat16 || status=$?  # LLaVA-1.5 layout -> vision.json real_shape_cuda
bench=$(( $(date +%s) - t0 ))

echo "gpu-check: set-up ${setup} s, gpu tests ${tests} s, real-shape bench ${bench} s; exit status ${status}"
exit "$status"
