"""Where zoo models live on disk (BRISK_HOME), and turning `--model NAME|PATH` into a loaded model.

Nothing here downloads: a zoo name is trained locally on first use; a path must exist on disk.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import time
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator

from brisklm.errors import BriskError
from brisklm.zoo.registry import get_recipe, recipes

QUALITY_FILE = "quality.json"
ZOO_VERSION = 1  # bump when shared training code changes what every recipe produces (part of each fingerprint)
PARENT_KEYS = ("init_from", "base")  # options that name the zoo model a recipe starts from


def brisk_home() -> Path:
    """Root of brisklm's cache: $BRISK_HOME, or ~/.cache/brisklm."""
    return Path(os.environ.get("BRISK_HOME") or Path.home() / ".cache" / "brisklm")


def zoo_path(name: str, seed: int = 0) -> Path:
    """Folder of a zoo model trained with `seed`."""
    return brisk_home() / "zoo" / (name if seed == 0 else f"{name}-seed{seed}")


def read_quality(path: Path) -> dict[str, Any] | None:
    """The quality record saved beside a checkpoint, if any."""
    file = Path(path) / QUALITY_FILE
    return json.loads(file.read_text()) if file.exists() else None


def fingerprint(name: str) -> str:
    """Hash of what a zoo model is trained from: its recipe (task, train function, options), the models it starts
    from (`init_from` / `base`, recursively) and ZOO_VERSION. A cached model with another fingerprint is stale."""
    recipe = get_recipe(name)
    parents = {key: fingerprint(value) for key, value in sorted(recipe.options.items())
               if key in PARENT_KEYS and isinstance(value, str)}
    payload = {"version": ZOO_VERSION, "name": name, "task": recipe.task, "options": recipe.options,
               "train": f"{recipe.train.__module__}.{recipe.train.__qualname__}", "parents": parents}
    return hashlib.sha256(json.dumps(payload, sort_keys=True, default=repr).encode()).hexdigest()[:16]


def is_trained(name: str, seed: int = 0) -> bool:
    """True when the folder holds a finished model of the current recipe (its quality.json has this fingerprint)."""
    quality = read_quality(zoo_path(name, seed))
    return quality is not None and quality.get("fingerprint") == fingerprint(name)


def is_stale(name: str, seed: int = 0) -> bool:
    """A finished model is on disk but was trained by another recipe or zoo version (or before fingerprints)."""
    return read_quality(zoo_path(name, seed)) is not None and not is_trained(name, seed)


@contextmanager
def training_threads(threads: int | None = None) -> Iterator[None]:
    """Train with every core (or $OMP_NUM_THREADS when set), whatever thread count the caller runs with: one
    training process owns the machine, while decoding benchmarks keep their single thread. A recipe may pin
    `threads` (its `options["threads"]`) when its result depends on the float summation order."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(threads or int(os.environ.get("OMP_NUM_THREADS") or 0) or os.cpu_count() or 1)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def train(name: str, seed: int = 0, force: bool = False) -> Path:
    """Train (or reuse) a zoo model; the quality file is written last, so a half-trained or stale folder is retrained."""
    recipe = get_recipe(name)
    path = zoo_path(name, seed)
    if is_trained(name, seed) and not force:
        return path
    tmp = path.with_name(path.name + ".partial")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    start = time.perf_counter()
    with training_threads(recipe.options.get("threads")):
        quality = recipe.train(recipe, tmp, seed)
    quality = {"model": name, "task": recipe.task, "metric": recipe.quality_metric, "seed": seed,
               "fingerprint": fingerprint(name), "wall_seconds": round(time.perf_counter() - start, 1), **quality}
    (tmp / QUALITY_FILE).write_text(json.dumps(quality, indent=2) + "\n")
    shutil.rmtree(path, ignore_errors=True)
    tmp.rename(path)
    return path


@dataclass
class LoadedModel:
    """A model with its tokenizer (or processor), where it came from, and its recorded quality."""

    model: Any
    tokenizer: Any
    path: Path
    quality: dict[str, Any] | None


def resolve(name_or_path: str, seed: int = 0, train_if_missing: bool = True) -> Path:
    """A local checkpoint folder for `--model`: an existing folder, or a zoo name (trained on first use)."""
    candidate = Path(name_or_path).expanduser()
    if candidate.is_dir():
        if not (candidate / "config.json").exists():
            raise BriskError(f"{candidate} is a folder but has no config.json; pass a folder written by save_pretrained")
        return candidate
    if name_or_path in recipes():
        if not is_trained(name_or_path, seed):
            if not train_if_missing:
                raise BriskError(f"zoo model {name_or_path!r} is not trained yet; run: brisk zoo train {name_or_path}")
            why = "was trained by another recipe version" if is_stale(name_or_path, seed) else "is not on disk yet"
            print(f"brisk: zoo model {name_or_path!r} {why}; training it now (once).", flush=True)
            train(name_or_path, seed)
        return zoo_path(name_or_path, seed)
    if os.sep in name_or_path or name_or_path.startswith("."):
        raise BriskError(f"checkpoint path {name_or_path} does not exist; pass a folder written by save_pretrained")
    raise BriskError(
        f"{name_or_path!r} is neither a zoo model ({', '.join(recipes())}) nor an existing checkpoint folder; "
        "brisklm never downloads models"
    )


def check_tokenizer_fits(model, tokenizer, where: object = "the model") -> None:
    """Refuse a tokenizer whose ids the model cannot embed (a tokenizer from another model)."""
    embed_rows = model.get_input_embeddings().num_embeddings
    if len(tokenizer) > embed_rows:
        raise BriskError(
            f"the tokenizer has {len(tokenizer)} tokens but {where} embeds only {embed_rows}; "
            "use the tokenizer saved with this model"
        )


TOKENIZER_FILES = ("tokenizer.json", "tokenizer.model", "vocab.json", "tokenizer_config.json")


def load_tokenizer(path: Path):
    """The tokenizer saved in a checkpoint folder; a folder without one is a BriskError naming the fix."""
    from transformers import AutoTokenizer

    path = Path(path)
    if not any((path / name).exists() for name in TOKENIZER_FILES):
        raise BriskError(f"{path} has no tokenizer (no {', '.join(TOKENIZER_FILES)}); save the tokenizer beside "
                         "the model with tokenizer.save_pretrained(path)")
    try:
        tokenizer = AutoTokenizer.from_pretrained(path, local_files_only=True)
    except (OSError, ValueError, TypeError, KeyError) as error:
        first = str(error).splitlines()[0] if str(error) else type(error).__name__
        raise BriskError(f"cannot load the tokenizer in {path}: {first}; save it again with "
                         "tokenizer.save_pretrained(path)") from None
    if isinstance(tokenizer, bool) or not callable(tokenizer):
        raise BriskError(f"cannot load the tokenizer in {path}; save it again with tokenizer.save_pretrained(path)")
    return tokenizer


def eos_ids(model, tokenizer) -> list[int]:
    """Every end-of-sequence id that the tokenizer, config.json or generation_config.json declares."""
    found: list[int] = []
    config = model.config.get_text_config() if hasattr(model.config, "get_text_config") else model.config
    generation = getattr(model, "generation_config", None)
    for value in (getattr(tokenizer, "eos_token_id", None), getattr(config, "eos_token_id", None),
                  getattr(model.config, "eos_token_id", None), getattr(generation, "eos_token_id", None)):
        for item in value if isinstance(value, (list, tuple)) else [value]:
            if item is not None and int(item) not in found:
                found.append(int(item))
    return found


def check_eos(model, tokenizer, where: object = "the checkpoint") -> None:
    """Refuse a checkpoint with no end-of-sequence id anywhere: generation could never stop."""
    if not eos_ids(model, tokenizer):
        raise BriskError(f"{where}: the tokenizer has no end-of-sequence token and neither config.json nor "
                         "generation_config.json sets eos_token_id; set \"eos_token\" in tokenizer_config.json "
                         "(or eos_token_id in generation_config.json), or pass a tokenizer that has one")


def place(model, path: Path, device: str = "auto", dtype: str = "auto"):
    """Move and cast a loaded model to the resolved `--device` / `--dtype` (rules in core/device.py)."""
    from brisklm.core.device import resolve_device, resolve_dtype

    where = resolve_device(device)
    config = json.loads((Path(path) / "config.json").read_text()) if (Path(path) / "config.json").exists() else None
    return model.to(device=where, dtype=resolve_dtype(dtype, where, config))


def load(name_or_path: str, seed: int = 0, train_if_missing: bool = True, device: str = "auto",
         dtype: str = "auto") -> LoadedModel:
    """Load a causal LM and its tokenizer from a zoo name or a checkpoint folder, in eval mode, on `device`
    in `dtype` ("auto": see brisklm.core.device); bad input (no tokenizer, a tokenizer that does not fit, no
    eos id, an unsupported family, a missing device) is a one-line BriskError."""
    from transformers import AutoModelForCausalLM

    from brisklm.core.adapter import ModelAdapter
    from brisklm.core.device import resolve_device

    resolve_device(device)  # a missing device fails before any training or loading
    path = resolve(name_or_path, seed, train_if_missing)
    try:
        model = AutoModelForCausalLM.from_pretrained(path, local_files_only=True)
    except (ValueError, KeyError, OSError) as error:
        raise BriskError(f"cannot load {path} as a causal LM: {str(error).splitlines()[0]}") from None
    tokenizer = load_tokenizer(path)
    check_tokenizer_fits(model, tokenizer, path)
    check_eos(model, tokenizer, path)
    ModelAdapter.from_model(model)  # an unsupported family fails here, naming the supported ones
    model = place(model, path, device, dtype)
    model.eval()
    return LoadedModel(model=model, tokenizer=tokenizer, path=path, quality=read_quality(path))
