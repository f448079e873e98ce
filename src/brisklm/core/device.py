"""Where a model runs and in which precision: `--device` / `--dtype` resolved once, checked with a clear error.

Rules (the README's "Devices and dtypes" section says the same):
- device "auto": $BRISK_DEVICE when set, else cuda if available, else mps if available, else cpu.
- dtype "auto": $BRISK_DTYPE when set, else on a GPU (cuda, mps) the dtype the checkpoint was saved in
  (config.json `dtype` / `torch_dtype`; float32 when it records none), and float32 on the CPU (CPU
  half-precision kernels are slow and lose accuracy; a bf16 checkpoint is upcast, never silently cast down).
- An explicit device that this machine lacks, or a dtype whose basic operations fail on the device (checked
  with a tiny probe: matmul, softmax, RMS norm), is a BriskError naming what is available and what to pass.
"""

from __future__ import annotations

import argparse
import contextlib
import os
from typing import Any, Iterator

import torch

from brisklm.errors import BriskError

DEVICE_ENV, DTYPE_ENV, TRAIN_DTYPE_ENV = "BRISK_DEVICE", "BRISK_DTYPE", "BRISK_TRAIN_DTYPE"
DTYPES: dict[str, torch.dtype] = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
_ALIASES = {"fp32": "float32", "float": "float32", "bf16": "bfloat16", "fp16": "float16", "half": "float16"}


def available_devices() -> list[str]:
    """The devices this machine offers, e.g. ['cpu'], ['cpu', 'cuda:0', 'cuda:1'] or ['cpu', 'mps']."""
    names = ["cpu"]
    if torch.cuda.is_available():
        names += [f"cuda:{i}" for i in range(torch.cuda.device_count())]
    if _mps_available():
        names.append("mps")
    return names


def _mps_available() -> bool:
    mps = getattr(torch.backends, "mps", None)
    return bool(mps is not None and mps.is_available())


def resolve_device(name: str | torch.device | None = "auto") -> torch.device:
    """`auto`, `cpu`, `cuda`, `cuda:N` or `mps` as a torch.device; a device this machine lacks is a BriskError."""
    if isinstance(name, torch.device):
        name = str(name)
    text = (name or "auto").strip().lower()
    if text == "auto":
        text = (os.environ.get(DEVICE_ENV) or "").strip().lower() or "auto"
        if text == "auto":
            return torch.device("cuda" if torch.cuda.is_available() else "mps" if _mps_available() else "cpu")
    available = ", ".join(available_devices())
    if text == "cpu":
        return torch.device("cpu")
    if text == "mps":
        if not _mps_available():
            raise BriskError(f"--device mps: this machine has no Apple MPS device (available: {available}); "
                             "pass --device auto or --device cpu")
        return torch.device("mps")
    if text == "cuda" or text.startswith("cuda:"):
        index = text.partition(":")[2]
        if index and not index.isdigit():
            raise BriskError(f"--device {name}: a CUDA device is cuda or cuda:N with N a number, e.g. cuda:0")
        if not torch.cuda.is_available():
            build = (f"is built for CUDA {torch.version.cuda} but finds no GPU" if torch.version.cuda
                     else "is a CPU-only build")
            raise BriskError(f"--device {name}: CUDA is not available on this machine (torch {torch.__version__} "
                             f"{build}; available: {available}); pass --device auto or --device cpu")
        count = torch.cuda.device_count()
        if index and int(index) >= count:
            raise BriskError(f"--device {name}: this machine has {count} CUDA device(s), cuda:0..cuda:{count - 1}; "
                             f"pick one of {available}")
        return torch.device(text)
    raise BriskError(f"--device {name!r} is not a device: pass auto, cpu, cuda, cuda:N or mps")


def saved_dtype(config: Any) -> torch.dtype | None:
    """The dtype a checkpoint's config records (`dtype` or `torch_dtype`, also from a dict), if a float one."""
    if config is None:
        return None
    if isinstance(config, torch.dtype):
        return config if config in DTYPES.values() else None
    get = config.get if isinstance(config, dict) else lambda key: getattr(config, key, None)
    value = get("dtype") or get("torch_dtype")
    if value is None:
        text = get("text_config")  # LLaVA and other wrappers may record it on the text model only
        return saved_dtype(text) if text is not None and text is not config else None
    if isinstance(value, torch.dtype):
        return value if value in DTYPES.values() else None
    return DTYPES.get(_dtype_name(value))


def auto_dtype(device: torch.device | str, saved: Any = None) -> torch.dtype:
    """What `--dtype auto` picks: float32 on the cpu; on a GPU the checkpoint's saved dtype, else float32."""
    if torch.device(device).type == "cpu":
        return torch.float32
    return saved_dtype(saved) or torch.float32


def resolve_dtype(name: str | torch.dtype | None = "auto", device: torch.device | str | None = None,
                  saved: Any = None) -> torch.dtype:
    """`auto`, `float32`, `bfloat16` or `float16` for `device`; `saved` is the checkpoint's dtype or config.

    auto: $BRISK_DTYPE if set; else the saved dtype on cuda/mps (float32 if none is recorded); float32 on cpu.
    The chosen dtype is probed on the device; if a basic op fails there, a BriskError suggests another dtype.
    """
    device = resolve_device(device)
    text = _dtype_name(name)
    if text == "auto":
        text = _dtype_name(os.environ.get(DTYPE_ENV))
    if text == "auto":
        dtype = auto_dtype(device, saved)
    elif text in DTYPES:
        dtype = DTYPES[text]
    else:
        raise BriskError(f"--dtype {name!r} is not a dtype: pass auto, float32, bfloat16 or float16")
    check_dtype(device, dtype)
    return dtype


def _dtype_name(name: str | torch.dtype | None) -> str:
    """Lower-case dtype name with aliases (bf16, fp16, torch.float32) folded; empty or None is auto."""
    text = str(name).replace("torch.", "").strip().lower() if name is not None else ""
    return _ALIASES.get(text, text) or "auto"


_PROBED: dict[tuple[str, torch.dtype], str | None] = {}


def _probe(device: torch.device, dtype: torch.dtype) -> None:
    """The operations every model needs, tiny: matmul, softmax, an RMS norm, SDPA."""
    x = torch.randn(4, 8, device=device).to(dtype)
    w = torch.randn(8, 8, device=device).to(dtype)
    y = torch.softmax(x @ w, dim=-1)
    y = y * torch.rsqrt(y.pow(2).mean(-1, keepdim=True) + 1e-6)
    q = y.view(1, 1, 4, 8)
    torch.nn.functional.scaled_dot_product_attention(q, q, q, is_causal=True)
    if not bool(torch.isfinite(y.float()).all()):
        raise RuntimeError("non-finite result")


def check_dtype(device: torch.device | str, dtype: torch.dtype) -> None:
    """Run the probe once per (device, dtype); a failure is a BriskError that suggests bfloat16/float32."""
    device = torch.device(device)
    key = (str(device), dtype)
    if key not in _PROBED:
        try:
            _probe(device, dtype)
            _PROBED[key] = None
        except (RuntimeError, TypeError, NotImplementedError) as error:
            _PROBED[key] = str(error).splitlines()[0] if str(error) else type(error).__name__
    if _PROBED[key] is not None:
        name = str(dtype).replace("torch.", "")
        others = " or ".join(f"--dtype {d}" for d in ("bfloat16", "float32") if d != name)
        raise BriskError(f"--dtype {name} does not work on {device} with torch {torch.__version__} "
                         f"({_PROBED[key]}); pass {others}")


def add_device_args(parser: argparse.ArgumentParser, training: bool = False) -> argparse.ArgumentParser:
    """Add `--device` and `--dtype` (both default auto) to a command's parser; `training` commands read
    `--dtype` as the Trainer's mixed precision (weights stay float32)."""
    parser.add_argument("--device", default="auto", metavar="DEVICE",
                        help="where the model runs: auto (cuda, else mps, else cpu; $BRISK_DEVICE overrides), "
                             "cpu, cuda, cuda:N or mps")
    if training:
        parser.add_argument("--dtype", default="auto", metavar="DTYPE",
                            help="training precision: auto or float32 (plain fp32), bfloat16 or float16 "
                                 "(mixed precision, float32 weights)")
    else:
        parser.add_argument("--dtype", default="auto", metavar="DTYPE",
                            help="model precision: auto (the checkpoint's saved dtype on a GPU, float32 on cpu), "
                                 "float32, bfloat16 or float16")
    parser.set_defaults(device_training=training)
    return parser


def device_kwargs(args: argparse.Namespace) -> dict[str, str]:
    """{'device': ..., 'dtype': ...} from parsed arguments, to pass to a loader (training: float32 weights)."""
    dtype = "float32" if getattr(args, "device_training", False) else getattr(args, "dtype", "auto")
    return {"device": getattr(args, "device", "auto"), "dtype": dtype}


@contextlib.contextmanager
def device_defaults(args: argparse.Namespace) -> Iterator[None]:
    """While a command runs, make its `--device/--dtype` what `auto` means everywhere below it (models loaded
    deep inside bench, demo and zoo training; the Trainer's device and precision), then restore the env.

    Both values are checked first, so a missing device or a dtype that fails its probe is the first error.
    """
    if not hasattr(args, "device"):
        yield
        return
    device = resolve_device(args.device)
    dtype = resolve_dtype(args.dtype, device)
    names = {DEVICE_ENV: str(device) if args.device != "auto" else None}
    dtype_env = TRAIN_DTYPE_ENV if getattr(args, "device_training", False) else DTYPE_ENV
    names[dtype_env] = _dtype_name(dtype) if _dtype_name(args.dtype) != "auto" else None
    saved = {name: os.environ.get(name) for name in names}
    try:
        for name, value in names.items():
            if value is not None:
                os.environ[name] = value
        yield
    finally:
        for name, value in saved.items():
            if value is None:
                os.environ.pop(name, None)
            else:
                os.environ[name] = value


def unwrap(model: Any) -> Any:
    """The module inside DDP/FSDP/DeepSpeed-style wrappers (they keep it as `.module`)."""
    while not hasattr(model, "config") and hasattr(model, "module"):
        model = model.module
    return model


def model_device(model: Any) -> torch.device:
    """The device of a model's first parameter (or buffer); cpu for a model without any."""
    model = unwrap(model)
    for tensor in model.parameters():
        return tensor.device
    for tensor in model.buffers():
        return tensor.device
    return torch.device("cpu")


def model_dtype(model: Any) -> torch.dtype:
    """The dtype of a model's first floating-point parameter; float32 if it has none."""
    for tensor in unwrap(model).parameters():
        if tensor.is_floating_point():
            return tensor.dtype
    return torch.float32


def to_device(batch: Any, device: torch.device | str) -> Any:
    """A batch (tensor, dict, list or tuple of them) with every tensor on `device`; other values unchanged."""
    if isinstance(batch, torch.Tensor):
        return batch.to(device)
    if isinstance(batch, dict):
        return {key: to_device(value, device) for key, value in batch.items()}
    if isinstance(batch, (list, tuple)):
        return type(batch)(to_device(value, device) for value in batch)
    return batch


def trainer_precision(device: str = "auto", dtype: str | None = None) -> dict[str, bool]:
    """TrainingArguments flags: use_cpu when the device is the cpu, bf16/fp16 mixed precision when asked
    (dtype None: $BRISK_TRAIN_DTYPE, set by a training command's `--dtype`; auto means float32)."""
    where = resolve_device(device)
    name = _dtype_name(os.environ.get(TRAIN_DTYPE_ENV) if dtype is None else dtype)
    chosen = torch.float32 if name == "auto" else resolve_dtype(name, where)  # never from a checkpoint
    return {"use_cpu": where.type == "cpu", "bf16": chosen == torch.bfloat16, "fp16": chosen == torch.float16}
