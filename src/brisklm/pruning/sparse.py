"""The sparse executor: router decisions become per-layer `LayerStep`s, so skipped modules cost nothing.

At each layer the routers read the layer input (B, T, D) and pick, per token, whether attention and MLP
run (argmax). The core executor then gathers only the executing rows through each module and scatters
the results back. The KV policy decides which rows store keys/values (see kv.py). `sparse_generate` decodes
with the routers through the one generation loop (`brisklm.generate`).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from brisklm.core.cache import KVCache, RowMeta
from brisklm.core.executor import execute
from brisklm.core.flops import FlopsCounter
from brisklm.core.generate import generate
from brisklm.core.plan import LayerStep, Plan
from brisklm.errors import BriskError
from brisklm.pruning.kv import ReuseKVCache, check_policy
from brisklm.pruning.routers import RouterSet


@dataclass
class RoutingRecord:
    """Execute decisions (B, T) per layer for attention and MLP, with the rows' validity (B, T)."""

    attn: list[torch.Tensor] = field(default_factory=list)
    mlp: list[torch.Tensor] = field(default_factory=list)
    valid: torch.Tensor | None = None

    def skip_rates(self) -> dict[str, float]:
        """Fraction of (valid token, layer) module slots skipped: attention, MLP and both together."""
        valid = self.valid if self.valid is not None else torch.ones_like(self.attn[0])
        n = valid.sum().item() * len(self.attn)
        att = sum(((~a) & valid).sum().item() for a in self.attn) / max(n, 1)
        mlp = sum(((~m) & valid).sum().item() for m in self.mlp) / max(n, 1)
        return {"attn": att, "mlp": mlp, "total": (att + mlp) / 2}

    def skip_per_token(self) -> torch.Tensor:
        """(B, T) fraction of the 2L module slots each token skipped."""
        skipped = torch.stack([~a for a in self.attn] + [~m for m in self.mlp]).float()
        return skipped.mean(0)


def router_plan(routers: RouterSet, policy: str = "full", cache: KVCache | None = None,
                record: RoutingRecord | None = None) -> Plan:
    """A plan whose steps are decided at each layer by the routers (argmax) under a KV policy."""
    check_policy(policy)
    if policy == "reuse" and not isinstance(cache, ReuseKVCache):
        raise BriskError("the REUSE policy needs a brisklm.pruning.kv.ReuseKVCache")

    def decide(layer_idx: int, hidden: torch.Tensor, meta: RowMeta, step: LayerStep | None) -> LayerStep:
        attn, mlp = routers.decisions(layer_idx, hidden)  # (B, T) bool each
        if record is not None:
            record.attn.append(attn)
            record.mlp.append(mlp)
            record.valid = meta["valid"]
        kv = None if policy == "full" else attn
        if policy == "reuse":
            cache.begin_layer(layer_idx, attn, meta)
        return LayerStep(attn_rows=attn, mlp_rows=mlp, kv_rows=kv)

    return Plan(decide=decide)


@torch.no_grad()
def sparse_forward(model, routers: RouterSet, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None,
                   policy: str = "full", cache: KVCache | None = None, flops: FlopsCounter | None = None,
                   logits_rows="all") -> tuple[torch.Tensor, RoutingRecord, KVCache | None]:
    """Run the routed model with real skipping: logits (B, T, V), the decisions, and the cache used."""
    if policy == "reuse" and cache is None:
        cache = ReuseKVCache(routers.num_layers)
    record = RoutingRecord()
    plan = router_plan(routers.follow(model), policy, cache, record)
    if cache is not None:  # explicit positions: a token that skipped every layer left no key to count from
        start = getattr(cache, "tokens_seen", 0)
        length = input_ids.shape[1]
        plan.order = plan.position_ids = start + torch.arange(length, device=input_ids.device).expand_as(input_ids)
        cache.tokens_seen = start + length
    out = execute(model, input_ids, plan=plan, cache=cache, attention_mask=attention_mask, flops=flops,
                  logits_rows=logits_rows)
    if isinstance(cache, ReuseKVCache):
        cache.finish()
    return out.logits, record, cache


@torch.no_grad()
def sparse_generate(model, routers: RouterSet, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None,
                    policy: str = "full", cache: KVCache | None = None, records: list[RoutingRecord] | None = None,
                    **generation) -> torch.Tensor:
    """SkipGPT decoding: `brisklm.generate` with the routers deciding every layer of the prefill and of each step.

    Returns the sequences (B, T + new); `records`, when given, receives one RoutingRecord per forward.
    `generation` holds GenerationConfig fields (max_new_tokens=..., do_sample=..., eos_token_id=...).
    """
    check_policy(policy)
    if cache is None:
        cache = ReuseKVCache(routers.num_layers) if policy == "reuse" else KVCache(routers.num_layers)

    def plan_fn(step: int, ids: torch.Tensor, kv: KVCache) -> Plan:
        record = RoutingRecord()
        if records is not None:
            records.append(record)
        return router_plan(routers, policy, kv, record)

    out = generate(model, input_ids, attention_mask, plan_fn=plan_fn, cache=cache, **generation)
    if isinstance(cache, ReuseKVCache):
        cache.finish()
    return out
