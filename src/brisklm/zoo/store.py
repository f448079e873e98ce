"""Where zoo models live on disk (BRISK_HOME), and turning `--model NAME|PATH` into a loaded model.

Nothing here downloads: a zoo name is trained locally on first use; a path must exist on disk.
"""

from __future__ import annotations

import json
import os
import shutil
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from brisklm.errors import BriskError
from brisklm.zoo.registry import get_recipe, recipes

QUALITY_FILE = "quality.json"


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


def is_trained(name: str, seed: int = 0) -> bool:
    return read_quality(zoo_path(name, seed)) is not None


def train(name: str, seed: int = 0, force: bool = False) -> Path:
    """Train (or reuse) a zoo model; the quality file is written last, so a half-trained folder is retrained."""
    recipe = get_recipe(name)
    path = zoo_path(name, seed)
    if is_trained(name, seed) and not force:
        return path
    tmp = path.with_name(path.name + ".partial")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    start = time.perf_counter()
    quality = recipe.train(recipe, tmp, seed)
    quality = {"model": name, "task": recipe.task, "metric": recipe.quality_metric, "seed": seed,
               "wall_seconds": round(time.perf_counter() - start, 1), **quality}
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
            print(f"brisk: zoo model {name_or_path!r} is not on disk yet; training it now (once).", flush=True)
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


def load(name_or_path: str, seed: int = 0, train_if_missing: bool = True) -> LoadedModel:
    """Load a causal LM and its tokenizer from a zoo name or a local checkpoint folder, in eval mode."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    path = resolve(name_or_path, seed, train_if_missing)
    try:
        model = AutoModelForCausalLM.from_pretrained(path, local_files_only=True)
    except ValueError as error:
        raise BriskError(f"cannot load {path} as a causal LM: {str(error).splitlines()[0]}") from None
    tokenizer = AutoTokenizer.from_pretrained(path, local_files_only=True) if (path / "tokenizer.json").exists() else None
    if tokenizer is None:
        raise BriskError(f"{path} has no tokenizer.json; save the tokenizer beside the model with save_pretrained")
    check_tokenizer_fits(model, tokenizer, path)
    model.eval()
    return LoadedModel(model=model, tokenizer=tokenizer, path=path, quality=read_quality(path))
