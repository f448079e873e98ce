"""A SkipGPT checkpoint as one usable model: a causal LM plus its routers, whose forward and generation skip.

`load_skipgpt(path)` reads a folder written by `save_skipgpt` (a normal HF checkpoint + routers.safetensors /
routers.json) and returns a `SkipGPTModel`. Its `forward` runs the sparse executor (skipped attention / MLP rows
do no work) and its `generate` decodes through the one generation loop (`brisklm.core.generate`) with the
routers deciding every layer of the prefill and of each step, under a KV policy (FULL, EVICT or REUSE).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from torch import nn

from brisklm.core.adapter import ModelAdapter
from brisklm.errors import BriskError
from brisklm.pruning.kv import check_policy
from brisklm.pruning.routers import ROUTER_CONFIG, ROUTER_WEIGHTS, RouterSet
from brisklm.pruning.sparse import RoutingRecord, sparse_forward, sparse_generate


def has_routers(path: str | Path) -> bool:
    """True when a folder holds SkipGPT routers (routers.json and routers.safetensors)."""
    path = Path(path)
    return (path / ROUTER_CONFIG).is_file() and (path / ROUTER_WEIGHTS).is_file()


class SkipGPTModel(nn.Module):
    """A causal LM with SkipGPT routers: `forward` and `generate` really skip what the routers skip.

    kv_policy: what a token that skips attention leaves in the cache (full: its K/V as usual; evict: nothing;
    reuse: the K/V of the last layer where it executed attention). `records` keeps the routing decisions of
    the last forward / generate call (one RoutingRecord per executor pass).
    """

    def __init__(self, model, routers: RouterSet, tokenizer=None, kv_policy: str = "full") -> None:
        super().__init__()
        adapter = ModelAdapter.from_model(model)
        if routers.num_layers != adapter.num_layers or routers.hidden_size != adapter.hidden_size:
            raise BriskError(f"the routers are for {routers.num_layers} layers of width {routers.hidden_size}, but the "
                             f"model has {adapter.num_layers} layers of width {adapter.hidden_size}; "
                             "pass the checkpoint the routers were trained on")
        self.model, self.routers, self.tokenizer = model, routers.follow(model), tokenizer
        self.kv_policy = check_policy(kv_policy)
        self.records: list[RoutingRecord] = []

    @property
    def config(self):
        return self.model.config

    @property
    def generation_config(self):
        return self.model.generation_config

    @property
    def device(self) -> torch.device:
        return self.model.device

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None,
                labels: torch.Tensor | None = None, **kwargs: Any):
        """Logits (B, T, V) of the routed model (and the shifted-label loss when labels are given)."""
        from transformers.modeling_outputs import CausalLMOutput

        logits, record, _ = sparse_forward(self.model, self.routers, input_ids, attention_mask=attention_mask,
                                           policy=self.kv_policy)
        self.records = [record]
        loss = None
        if labels is not None:
            loss = torch.nn.functional.cross_entropy(logits[:, :-1].flatten(0, 1).float(),
                                                     labels[:, 1:].flatten().to(logits.device), ignore_index=-100)
        return CausalLMOutput(loss=loss, logits=logits)

    @torch.no_grad()
    def generate(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None,
                 kv_policy: str | None = None, **generation: Any) -> torch.Tensor:
        """(B, T + new) ids from `brisklm.generate` with routed prefill and decode steps.

        generation: GenerationConfig fields (max_new_tokens=..., do_sample=..., eos_token_id=...)."""
        self.records = []
        return sparse_generate(self.model, self.routers, input_ids, attention_mask,
                               policy=check_policy(kv_policy or self.kv_policy), records=self.records, **generation)

    def skip_rates(self) -> dict[str, float]:
        """Skipped fraction of (valid token, layer) module slots over the last call: attention, MLP, both."""
        from brisklm.pruning.study import merged_rates

        if not self.records:
            raise BriskError("no routed call yet: run forward or generate first")
        return merged_rates(self.records)


def load_skipgpt(path: str | Path, device: str = "auto", dtype: str = "auto", kv_policy: str = "full") -> SkipGPTModel:
    """A `SkipGPTModel` (model, tokenizer and routers) from a folder written by `save_skipgpt` / `brisk prune skipgpt`."""
    from brisklm.zoo.store import load, resolve

    check_policy(kv_policy)
    folder = resolve(str(path), train_if_missing=False)
    if not has_routers(folder):
        raise BriskError(f"{folder} has no SkipGPT routers ({ROUTER_CONFIG} + {ROUTER_WEIGHTS}); pass a folder written "
                         "by `brisk prune skipgpt`, or load it as a plain model")
    loaded = load(str(folder), device=device, dtype=dtype)
    return SkipGPTModel(loaded.model, RouterSet.load(folder), loaded.tokenizer, kv_policy)
