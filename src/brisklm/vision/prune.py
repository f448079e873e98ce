"""One entry point for the visual-token pruning methods: build the plan for a batch, run prefill (and decode).

`prune_prefill` returns the last-position logits, the per-layer record and (optionally) the KV cache whose
later layers hold only the kept rows; `prune_generate` runs the same prefill inside `brisklm.generate` and decodes
from that cache with positions continuing after the unpruned prompt.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch

from brisklm.core.cache import KVCache
from brisklm.core.executor import execute
from brisklm.core.flops import FlopsCounter
from brisklm.core.generate import PlanFn, generate
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
    if spec.keep is not None and spec.method != "dense":
        most = int(visual.sum(dim=1).max()) if visual.numel() else 0
        if spec.keep > most:
            raise BriskError(f"the budget keep={spec.keep} is larger than the {most} visual tokens of these prompts; "
                             f"pass a keep of at most {most}")
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
    batch = batch.to(model.device)  # a processor's batch may live elsewhere (e.g. made on the cpu)
    plan = build_plan(model, batch.input_ids, batch.position_ids, spec, record)
    embeds = _multimodal(model, batch, plan, embeds)
    out = execute(model, inputs_embeds=embeds, plan=plan, cache=cache, attention_mask=batch.attention_mask,
                  logits_rows="last", flops=flops)
    record.plan = plan  # type: ignore[attr-defined]
    return out.logits[:, -1], record


def _multimodal(model, batch, plan: Plan, embeds: torch.Tensor | None) -> torch.Tensor:
    """The prompts' embeddings with the images written in; a Qwen2-VL batch also gives the plan its M-RoPE
    positions (kept rows keep theirs: the executor gathers cos/sin with the rows)."""
    rope = getattr(batch, "rope_position_ids", None)
    if rope is not None:
        from brisklm.vision.qwen2vl import embed_qwen2vl

        plan.rope_position_ids = rope
        return embed_qwen2vl(model, batch) if embeds is None else embeds
    return embed_multimodal(model, batch.input_ids, batch.pixel_values) if embeds is None else embeds


def decode_plan_fn(visibility, prefill: Plan | None = None) -> PlanFn:
    """Plans for `brisklm.generate`: `prefill` at step 0 (when given), then text rows (not visual, no sink) under
    the prefill's visibility, with positions continuing after the unpruned prompt (the loop's rule)."""

    def plan_fn(step: int, ids: torch.Tensor, cache) -> Plan:
        if step == 0 and prefill is not None:
            return prefill
        false = torch.zeros(ids.shape[0], ids.shape[1] if step == 0 else 1, dtype=torch.bool, device=ids.device)
        return Plan(visibility=visibility, row_meta={"visual": false, "sink": false})

    return plan_fn


@torch.no_grad()
def prune_generate(model, batch: VLMBatch, spec: PruneSpec, max_new_tokens: int = 4, cache: KVCache | None = None,
                   embeds: torch.Tensor | None = None, **generation) -> tuple[torch.Tensor, PruneRecord]:
    """(B, new) ids decoded by `brisklm.generate` with `spec` applied during prefill, and the method's record.

    Decoding continues from the pruned cache (later layers hold only the kept rows). Greedy, stopping at the
    text model's eos, unless `generation` (GenerationConfig fields) says otherwise.
    """
    text = model.config.get_text_config()
    record = PruneRecord()
    batch = batch.to(model.device)  # a processor's batch may live elsewhere (e.g. made on the cpu)
    plan = build_plan(model, batch.input_ids, batch.position_ids, spec, record)
    record.plan = plan  # type: ignore[attr-defined]
    embeds = _multimodal(model, batch, plan, embeds)
    options = {"do_sample": False, "eos_token_id": text.eos_token_id, "pad_token_id": text.pad_token_id, **generation}
    ids = generate(model, batch.input_ids, batch.attention_mask, inputs_embeds=embeds,
                   plan_fn=decode_plan_fn(plan.visibility, plan), cache=cache, max_new_tokens=max_new_tokens, **options)
    return ids[:, batch.input_ids.shape[1]:], record


@torch.no_grad()
def greedy_answer(model, batch: VLMBatch, spec: PruneSpec, max_new_tokens: int = 4) -> tuple[list[list[int]], PruneRecord]:
    """Greedy answers (ids up to <eos>) of the prompts with the method applied during prefill."""
    ids, record = prune_generate(model, batch, spec, max_new_tokens)
    eos = model.config.get_text_config().eos_token_id
    stops = set(eos if isinstance(eos, (list, tuple)) else [eos])
    answers = []
    for row in ids.tolist():
        end = next((i for i, t in enumerate(row) if t in stops), len(row))
        answers.append(row[:end])
    return answers, record
