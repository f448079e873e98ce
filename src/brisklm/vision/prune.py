"""One entry point for the visual-token pruning methods: build the plan for a batch, run prefill (and decode).

`prune_prefill` returns the last-position logits, the per-layer record and (optionally) the KV cache whose
later layers hold only the kept rows; `greedy_answer` decodes from it with positions continuing after the
unpruned prompt.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch

from brisklm.core.cache import KVCache
from brisklm.core.executor import execute
from brisklm.core.flops import FlopsCounter
from brisklm.core.plan import Plan
from brisklm.errors import BriskError
from brisklm.vision.baselines import fastv_plan, pdrop_plan, random_plan
from brisklm.vision.common import PruneRecord, VisualVisibility, visual_row_meta
from brisklm.vision.visipruner import VisiPrunerConfig, visipruner_plan
from brisklm.vision.vlm import VLMBatch, embed_multimodal, visual_mask

METHODS = ("dense", "visipruner", "fastv", "pdrop", "random")


@dataclass
class PruneSpec:
    """A method and its budget: `keep` visual tokens (FastV/random at `layer`, PyramidDrop's first stage);
    VisiPruner uses `visipruner` (its relative thresholds; `keep` caps the critical set when given)."""

    method: str = "visipruner"
    keep: int | None = None
    layer: int = 2
    pdrop_ratio: float = 0.5
    seed: int = 0
    visipruner: VisiPrunerConfig = field(default_factory=VisiPrunerConfig)

    def check(self) -> None:
        if self.method not in METHODS:
            raise BriskError(f"unknown method {self.method!r}: choose one of {', '.join(METHODS)}")
        if self.method in ("fastv", "pdrop", "random") and (self.keep is None or self.keep < 0):
            raise BriskError(f"{self.method} needs a budget: pass keep=N visual tokens (N >= 0)")


def build_plan(model, input_ids: torch.Tensor, position_ids: torch.Tensor, spec: PruneSpec,
               record: PruneRecord) -> Plan:
    """The executor plan of `spec` for prompts `input_ids` (image rows found from the model's image token)."""
    spec.check()
    visual = visual_mask(input_ids, model.config.image_token_id)
    kw: dict[str, Any] = dict(record=record, position_ids=position_ids)
    if spec.method == "visipruner":
        config = spec.visipruner
        if spec.keep is not None:
            config = VisiPrunerConfig(**{**config.__dict__, "max_keep": spec.keep})
        return visipruner_plan(model, visual, config, **kw)
    if spec.method == "fastv":
        return fastv_plan(model, visual, spec.keep, spec.layer, **kw)
    if spec.method == "random":
        return random_plan(model, visual, spec.keep, spec.layer, seed=spec.seed, **kw)
    if spec.method == "pdrop":
        return pdrop_plan(model, visual, spec.keep, spec.pdrop_ratio, **kw)

    def observe(layer_idx, hidden, meta, step):
        record.observe(layer_idx, meta)
        return step

    return Plan(position_ids=position_ids, visibility=VisualVisibility(), row_meta=visual_row_meta(visual),
                decide=observe)


@torch.no_grad()
def prune_prefill(model, batch: VLMBatch, spec: PruneSpec, cache: KVCache | None = None,
                  flops: FlopsCounter | None = None, embeds: torch.Tensor | None = None
                  ) -> tuple[torch.Tensor, PruneRecord]:
    """Last-position logits (B, V) of the prompts under `spec`, and what the method did per layer."""
    record = PruneRecord()
    plan = build_plan(model, batch.input_ids, batch.position_ids, spec, record)
    if embeds is None:
        embeds = embed_multimodal(model, batch.input_ids, batch.pixel_values)
    out = execute(model, inputs_embeds=embeds, plan=plan, cache=cache, attention_mask=batch.attention_mask,
                  logits_rows="last", flops=flops)
    record.plan = plan  # type: ignore[attr-defined]
    return out.logits[:, -1], record


@torch.no_grad()
def decode_steps(model, cache: KVCache, first: torch.Tensor, batch: VLMBatch, steps: int,
                 visibility=None) -> torch.Tensor:
    """Greedy-decode `steps` tokens after a prefill that filled `cache`; returns (B, steps) ids."""
    tokens = [first]
    next_pos = batch.position_ids[:, -1:] + 1
    false = torch.zeros_like(first[:, None], dtype=torch.bool)
    for _ in range(steps - 1):
        plan = Plan(position_ids=next_pos, visibility=visibility, row_meta={"visual": false, "sink": false})
        out = execute(model, tokens[-1][:, None], plan=plan, cache=cache, logits_rows="last")
        tokens.append(out.logits[:, -1].argmax(-1))
        next_pos = next_pos + 1
    return torch.stack(tokens, dim=1)


@torch.no_grad()
def greedy_answer(model, batch: VLMBatch, spec: PruneSpec, max_new_tokens: int = 4) -> tuple[list[list[int]], PruneRecord]:
    """Greedy answers (ids up to <eos>) of the prompts with the method applied during prefill."""
    from brisklm.core.adapter import ModelAdapter

    cache = KVCache(ModelAdapter.from_model(model).num_layers)
    logits, record = prune_prefill(model, batch, spec, cache=cache)
    ids = decode_steps(model, cache, logits.argmax(-1), batch, max_new_tokens, record.plan.visibility)
    eos = model.config.text_config.eos_token_id
    answers = []
    for row in ids.tolist():
        answers.append(row[: row.index(eos)] if eos in row else row)
    return answers, record
