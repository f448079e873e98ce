"""LoRA for streaming fine-tuning (peft): adapters on the family's own projections, merged or saved alone, and
a loader that accepts an adapter folder wherever a streaming command takes `--model`.

Target modules are given by their unfused names (q_proj, v_proj, ...) and mapped through the family adapter,
so Phi-3's fused `qkv_proj` / `gate_up_proj` are found too. Training runs on the HF model with the LoRA layers
injected (the executor sees the family's own module tree); only the LoRA weights have gradients.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Sequence

from brisklm.errors import BriskError

DEFAULT_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj")
ADAPTER_CONFIG = "adapter_config.json"


def target_modules(model, names: Sequence[str]) -> list[str]:
    """The family's module names for unfused projection names (deduplicated, order kept)."""
    from brisklm.core.adapter import ModelAdapter

    adapter = ModelAdapter.from_model(model)
    found = list(dict.fromkeys(adapter.module_name(n) for n in names))
    present = {name.rsplit(".", 1)[-1] for name, _ in model.named_modules()}
    missing = [n for n in found if n not in present]
    if missing:
        raise BriskError(f"--lora-targets {','.join(missing)}: no such module in this model; choose among "
                         "q_proj,k_proj,v_proj,o_proj,gate_proj,up_proj,down_proj")
    return found


def add_lora(model, r: int, alpha: float, targets: Sequence[str], dropout: float = 0.0):
    """Wrap `model` with LoRA adapters; returns the peft model (its base model is what gets trained)."""
    from peft import LoraConfig, get_peft_model

    if r < 1:
        raise BriskError(f"--lora-r must be >= 1, got {r}")
    if alpha <= 0:
        raise BriskError(f"--lora-alpha must be positive, got {alpha}")
    config = LoraConfig(r=r, lora_alpha=alpha, lora_dropout=dropout, target_modules=target_modules(model, targets),
                        bias="none", task_type="CAUSAL_LM")
    return get_peft_model(model, config)


def is_adapter(path: str | Path) -> bool:
    """True for a folder saved by `stream train --lora` without --merge (a peft adapter)."""
    path = Path(path).expanduser()
    return path.is_dir() and (path / ADAPTER_CONFIG).is_file() and not (path / "config.json").is_file()


def load_model(name_or_path: str, **kwargs):
    """zoo.store.load, or for an adapter folder: its base model with the adapter merged in (tokenizer from the
    adapter folder). Returns the LoadedModel."""
    from brisklm.zoo.store import load, load_tokenizer

    if not is_adapter(name_or_path):
        return load(name_or_path, **kwargs)
    from peft import PeftModel

    path = Path(name_or_path).expanduser()
    base = json.loads((path / ADAPTER_CONFIG).read_text()).get("base_model_name_or_path")
    if not base:
        raise BriskError(f"{path / ADAPTER_CONFIG} names no base model (base_model_name_or_path); retrain with "
                         "--merge or set it")
    loaded = load(base, **kwargs)
    try:
        merged = PeftModel.from_pretrained(loaded.model, path).merge_and_unload()
    except (ValueError, KeyError, OSError, RuntimeError) as error:
        raise BriskError(f"cannot apply the adapter in {path} to {base}: {str(error).splitlines()[0]}") from None
    loaded.model = merged.eval()
    loaded.tokenizer = load_tokenizer(path)
    loaded.path = path
    return loaded
