"""The layer-loop executor: runs a HF decoder layer by layer from a `Plan`, using the model's own modules.

Per layer it gathers the rows a step sends through attention (queries), the rows that write keys/values,
and the rows that go through the MLP, applies the layer's norms, projections, rotary and MLP to just those
rows, and scatters the results back into the residual stream. Keys carry metadata so that visibility rules
stay exact under caching, gathering and token dropping. A no-op plan reproduces `model(...)`.

The loop is the same for every family: the adapter's recipe says where the norms are, how q/k/v come out
of a layer, which rotary table and window a layer uses, and any soft-capping (see `core/adapter.py`).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal, Sequence

import torch
import torch.nn.functional as F

from brisklm.core.adapter import ModelAdapter
from brisklm.core.cache import KVCache, RowMeta, cat_meta
from brisklm.core.flops import FlopsCounter, layer_macs
from brisklm.core.plan import CausalVisibility, LayerStep, Plan, rope_meta, window_mask
from brisklm.errors import PlanError


@dataclass
class AttentionRecord:
    """Attention probabilities of one layer (B, H, Tq, Tk) with the metadata of its queries and keys."""

    probs: torch.Tensor
    query_meta: RowMeta
    key_meta: RowMeta


@dataclass
class ExecutorOutput:
    """Logits (of the requested rows), the last hidden state, and what was asked to be recorded."""

    logits: torch.Tensor | None
    last_hidden: torch.Tensor
    meta: RowMeta
    layer_hidden: list[torch.Tensor] = field(default_factory=list)
    layer_meta: list[RowMeta] = field(default_factory=list)
    attentions: list[AttentionRecord | None] = field(default_factory=list)


# ----------------------------------------------------------------------------------------------- rows
def pack_rows(mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Indices (B, n) of the True rows of a (B, T) mask, in order, padded to the batch maximum; and validity."""
    batch, length = mask.shape
    counts = mask.sum(dim=1)
    n = int(counts.max().item()) if batch else 0
    arange = torch.arange(length, device=mask.device)
    sort_key = (~mask).long() * length + arange
    index = sort_key.argsort(dim=1)[:, :n]
    valid = torch.arange(n, device=mask.device)[None, :] < counts[:, None]
    return index, valid


def gather_rows(x: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    """x[b, index[b, j]] for a (B, T, ...) tensor."""
    expand = index.reshape(*index.shape, *([1] * (x.dim() - 2))).expand(*index.shape, *x.shape[2:])
    return x.gather(1, expand)


def gather_meta(meta: RowMeta, index: torch.Tensor, valid: torch.Tensor | None = None) -> RowMeta:
    out = {k: v.gather(1, index) for k, v in meta.items()}
    if valid is not None:
        out["valid"] = out["valid"] & valid
    return out


# ----------------------------------------------------------------------------------------------- caches
class _DynamicCacheView:
    """Lets a transformers Cache (e.g. DynamicCache) serve the executor for dense-key plans.

    The metadata of the keys the executor writes (positions, padding validity) is kept on the cache object
    beside the keys, so later calls see it. Keys written by HF itself get what HF assumes: position = arrival
    index, all valid. A sliding-window layer of a DynamicCache built with the model config returns only its
    last keys; their arrival index is counted back from the number of tokens the layer has seen. (Reordering
    the cache's batch, e.g. beam search, is not tracked.)
    """

    META_ATTR = "_brisklm_key_meta"

    def __init__(self, cache) -> None:
        self.cache = cache
        self.known: dict[int, RowMeta] = cache.__dict__.setdefault(self.META_ATTR, {})

    def get_seq_length(self, layer_idx: int = 0) -> int:
        return int(self.cache.get_seq_length(layer_idx))

    def update(self, keys, values, meta, layer_idx):
        new = keys.shape[2]
        keys, values = self.cache.update(keys, values, layer_idx)
        batch, total = keys.shape[0], keys.shape[2]
        old_count = total - new
        parts = []
        known = self.known.get(layer_idx)
        if known is not None and known["order"].shape[0] != batch:
            known = None
        from_known = 0 if known is None else min(known["order"].shape[1], old_count)
        if old_count > from_known:  # oldest keys, written by HF: index positions, all valid
            first = self.get_seq_length(layer_idx) - total
            order = (first + torch.arange(old_count - from_known, device=keys.device)).expand(batch, -1)
            parts.append({"order": order, "position": order, "valid": torch.ones_like(order, dtype=torch.bool)})
        if from_known:
            parts.append({k: v[:, v.shape[1] - from_known:] for k, v in known.items()})
        full = cat_meta(parts + [meta])
        self.known[layer_idx] = full
        return keys, values, full


def _next_order(cache, batch: int, device) -> torch.Tensor:
    """(B, 1) arrival order that continues after what the cache holds."""
    if cache is None:
        return torch.zeros(batch, 1, dtype=torch.long, device=device)
    if isinstance(cache, KVCache):  # layers may hold different keys (evicted rows): take the latest anywhere
        latest = [l.meta["order"].max(dim=1, keepdim=True).values for l in cache.layers
                  if "order" in l.meta and l.meta["order"].numel()]
        if latest:
            return torch.stack(latest).max(dim=0).values + 1
        return torch.zeros(batch, 1, dtype=torch.long, device=device)
    return torch.full((batch, 1), cache.get_seq_length(0), dtype=torch.long, device=device)


# ----------------------------------------------------------------------------------------------- main
def execute(
    model,
    input_ids: torch.Tensor | None = None,
    *,
    inputs_embeds: torch.Tensor | None = None,
    plan: Plan | None = None,
    cache=None,
    context: Sequence[KVCache] = (),
    attention_mask: torch.Tensor | None = None,
    logits_rows: Literal["all", "last", "none"] | int = "all",
    record_hidden: bool = False,
    record_attention: bool | Sequence[int] = False,
    flops: FlopsCounter | None = None,
) -> ExecutorOutput:
    """Run `model` layer by layer from `plan` over new tokens, reading `context` caches and writing `cache`.

    input_ids / inputs_embeds: (B, T) / (B, T, D) new rows. attention_mask: (B, T) 1 = real token.
    cache: a `KVCache` (any plan) or a transformers `DynamicCache` (plans with dense keys only).
    context: read-only caches whose keys every layer may also attend to (e.g. a streaming source cache).
    logits_rows: "all", "last", "none" or an int n (the last n rows).
    """
    adapter = ModelAdapter.from_model(model)
    plan = plan or Plan()
    hidden = _embed(adapter, input_ids, inputs_embeds)
    batch, length, _ = hidden.shape
    device = hidden.device
    _check_plan(adapter, plan, batch, length, cache)
    cache_view = None if cache is None else (cache if isinstance(cache, KVCache) else _DynamicCacheView(cache))

    start = _next_order(cache, batch, device)
    arange = torch.arange(length, device=device)[None, :]
    order = plan.order if plan.order is not None else start + arange
    positions = plan.position_ids if plan.position_ids is not None else start + arange
    valid = (
        attention_mask.bool()
        if attention_mask is not None
        else torch.ones(batch, length, dtype=torch.bool, device=device)
    )
    meta: RowMeta = {"order": order, "position": positions, "valid": valid, "row": arange.expand(batch, length)}
    meta.update(plan.row_meta)
    if plan.rope_position_ids is not None:
        meta.update(rope_meta(plan.rope_position_ids))
    rope_positions = plan.rope_position_ids if plan.rope_position_ids is not None else positions
    ropes = adapter.rotaries(hidden, rope_positions)  # rope kind -> (cos, sin), gathered with the rows
    visibility = plan.visibility or CausalVisibility()

    out = ExecutorOutput(logits=None, last_hidden=hidden, meta=meta)
    record_layers = _record_set(record_attention, adapter.num_layers)
    for layer_idx in range(adapter.num_layers):
        step = plan.step(layer_idx)
        if plan.decide is not None:
            step = plan.decide(layer_idx, hidden, meta, step)
            step = None if step is None or step.is_noop else step
            _check_step(step, layer_idx, batch, hidden.shape[1], cache)
        if record_hidden:
            out.layer_hidden.append(hidden)
            out.layer_meta.append(meta)
        window = adapter.sliding_window(layer_idx) if plan.apply_window else None
        hidden, record = _attention_block(
            adapter, layer_idx, hidden, meta, ropes[adapter.rope_kind(layer_idx)], step, visibility, window,
            cache_view, context, layer_idx in record_layers, flops, plan.on_attention,
        )
        out.attentions.append(record)
        hidden = _mlp_block(adapter, layer_idx, hidden, meta, step, flops)
        if step is not None and step.keep_after is not None:
            keep = step.keep_after
            hidden = gather_rows(hidden, keep)
            ropes = {kind: (gather_rows(c, keep), gather_rows(s, keep)) for kind, (c, s) in ropes.items()}
            meta = gather_meta(meta, keep, step.keep_valid)

    if record_hidden:
        out.layer_hidden.append(hidden)
        out.layer_meta.append(meta)
    out.last_hidden, out.meta = hidden, meta
    out.logits = _logits(adapter, hidden, meta, logits_rows, flops)
    return out


def _embed(adapter: ModelAdapter, input_ids, inputs_embeds) -> torch.Tensor:
    if (input_ids is None) == (inputs_embeds is None):
        raise PlanError("pass exactly one of input_ids (B, T) or inputs_embeds (B, T, D)")
    if inputs_embeds is not None:
        if inputs_embeds.dim() != 3 or inputs_embeds.shape[-1] != adapter.hidden_size:
            raise PlanError(
                f"inputs_embeds has shape {tuple(inputs_embeds.shape)}; expected (batch, tokens, {adapter.hidden_size})"
            )
        return inputs_embeds
    if input_ids.dim() != 2:
        raise PlanError(f"input_ids has shape {tuple(input_ids.shape)}; expected (batch, tokens)")
    if input_ids.numel() and (int(input_ids.max()) >= adapter.embed_tokens.num_embeddings or int(input_ids.min()) < 0):
        raise PlanError(
            f"input_ids contain ids outside the vocabulary [0, {adapter.embed_tokens.num_embeddings}); "
            "was the text encoded with this model's tokenizer?"
        )
    return adapter.embed_tokens(input_ids)


def _check_plan(adapter: ModelAdapter, plan: Plan, batch: int, length: int, cache) -> None:
    """Reject plans whose shapes do not fit the model or the input, naming the mismatch."""
    for name in ("position_ids", "order"):
        value = getattr(plan, name)
        if value is not None and tuple(value.shape) != (batch, length):
            raise PlanError(f"plan.{name} has shape {tuple(value.shape)}; the input is (batch={batch}, tokens={length})")
    rope = plan.rope_position_ids
    if rope is not None and (rope.dim() != 3 or tuple(rope.shape[1:]) != (batch, length)):
        raise PlanError(f"plan.rope_position_ids has shape {tuple(rope.shape)}; expected (axes, {batch}, {length})")
    for name, value in plan.row_meta.items():
        if tuple(value.shape) != (batch, length):
            raise PlanError(f"plan.row_meta[{name!r}] has shape {tuple(value.shape)}; expected ({batch}, {length})")
    if plan.steps is not None and len(plan.steps) != adapter.num_layers:
        raise PlanError(
            f"plan has {len(plan.steps)} layer steps but the model has {adapter.num_layers} layers; "
            "give one LayerStep (or None) per layer"
        )
    rows = length
    for idx in range(adapter.num_layers):
        step = plan.step(idx)
        if step is not None:
            rows = _check_step(step, idx, batch, rows, cache)
    if cache is not None and not isinstance(cache, KVCache) and plan.visibility is not None:
        raise PlanError("a custom visibility rule needs a brisklm KVCache (it stores key metadata); got " + type(cache).__name__)


def _check_step(step: LayerStep | None, idx: int, batch: int, rows: int, cache) -> int:
    """Reject a layer step whose masks do not fit the (batch, rows) at that layer; return the rows after it."""
    if step is None:
        return rows
    for name in ("attn_rows", "mlp_rows", "kv_rows"):
        value = getattr(step, name)
        if value is not None and (value.dtype != torch.bool or tuple(value.shape) != (batch, rows)):
            raise PlanError(
                f"layer {idx}: {name} must be a bool tensor of shape ({batch}, {rows}) "
                f"(the rows at that layer); got {value.dtype} {tuple(value.shape)}"
            )
    if step.keep_after is not None:
        keep = step.keep_after
        if keep.dim() != 2 or keep.shape[0] != batch or keep.dtype != torch.long:
            raise PlanError(f"layer {idx}: keep_after must be long indices (batch, kept); got {tuple(keep.shape)}")
        if keep.numel() and (int(keep.max()) >= rows or int(keep.min()) < 0):
            raise PlanError(f"layer {idx}: keep_after indexes rows outside [0, {rows})")
        if step.keep_valid is not None and (step.keep_valid.dtype != torch.bool or step.keep_valid.shape != keep.shape):
            raise PlanError(f"layer {idx}: keep_valid must be a bool tensor shaped like keep_after {tuple(keep.shape)}")
        rows = keep.shape[1]
    if cache is not None and not isinstance(cache, KVCache) and (step.kv_rows is not None or step.keep_after is not None):
        raise PlanError(
            "plans that drop rows or store only some keys need a brisklm KVCache; "
            "a transformers DynamicCache cannot record which keys are missing"
        )
    return rows


def _record_set(record_attention, num_layers: int) -> set[int]:
    if record_attention is True:
        return set(range(num_layers))
    if not record_attention:
        return set()
    return set(int(i) for i in record_attention)


def _select_rows(mask, hidden, meta, cos, sin):
    """Pack the rows of a (B, T) mask (None = all rows): index, validity, hidden, metadata, cos, sin."""
    if mask is None:
        return None, None, hidden, meta, cos, sin
    index, valid = pack_rows(mask)
    return (index, valid, gather_rows(hidden, index), gather_meta(meta, index, valid),
            gather_rows(cos, index), gather_rows(sin, index))


def _attention_block(
    adapter: ModelAdapter, layer_idx, hidden, meta, rope, step: LayerStep | None, visibility, window: int | None,
    cache_view, context, record: bool, flops: FlopsCounter | None, on_attention=None,
):
    cos, sin = rope
    q_mask = None if step is None else step.attn_rows
    kv_mask = None if step is None else step.kv_rows
    if q_mask is not None and not bool(q_mask.any()) and kv_mask is not None and not bool(kv_mask.any()):
        return hidden, None  # nothing enters this layer's attention

    # Queries, and keys/values of the new rows.
    q_index, q_valid, xq_raw, q_meta, cos_q, sin_q = _select_rows(q_mask, hidden, meta, cos, sin)
    _, _, xk_raw, k_meta_new, cos_k, sin_k = _select_rows(kv_mask, hidden, meta, cos, sin)
    same_rows = kv_mask is None and q_mask is None

    xq = adapter.attn_input(layer_idx, xq_raw)
    query = None
    if same_rows:
        query, key, value = adapter.project(layer_idx, xq, "qkv")
    else:
        key, value = adapter.project(layer_idx, adapter.attn_input(layer_idx, xk_raw), "kv")
    key = adapter.rotate(key, cos_k, sin_k)

    if cache_view is not None:
        keys, values, k_meta = cache_view.update(key, value, k_meta_new, layer_idx)
    else:
        keys, values, k_meta = key, value, k_meta_new
    if xq.shape[1] == 0:  # no row queries at this layer (keys/values were still stored above)
        if flops is not None:
            macs = layer_macs(adapter, layer_idx)["kv_proj"]
            flops.add(layer_idx, "kv_proj", 2 * int(k_meta_new["valid"].sum()) * macs)
        return hidden, None
    if query is None:
        (query,) = adapter.project(layer_idx, xq, "q")
    query = adapter.rotate(query, cos_q, sin_q)
    if on_attention is not None:
        on_attention(layer_idx, query, q_meta, keys, values, k_meta)
    ctx_parts = [c.read(layer_idx) for c in context]
    ctx_parts = [p for p in ctx_parts if p[0] is not None]
    if ctx_parts:
        keys = torch.cat([p[0] for p in ctx_parts] + [keys], dim=2)
        values = torch.cat([p[1] for p in ctx_parts] + [values], dim=2)
        k_meta = cat_meta([p[2] for p in ctx_parts] + [k_meta])

    visible = visibility(q_meta, k_meta, layer_idx) & k_meta["valid"][:, None, :]
    if window is not None:  # the model's sliding window holds under every rule (Plan.apply_window)
        visible = visible & window_mask(q_meta, k_meta, window)
    has_any = visible.any(dim=-1)
    safe = visible | ~has_any[..., None]
    groups = adapter.num_heads // adapter.num_kv_heads
    scaling, softcap = adapter.attn_scaling(layer_idx), adapter.attn_softcap(layer_idx)
    probs = None
    if record or softcap is not None:  # explicit scores: recorded, or soft-capped (SDPA cannot)
        k_rep = keys.repeat_interleave(groups, dim=1) if groups > 1 else keys
        v_rep = values.repeat_interleave(groups, dim=1) if groups > 1 else values
        scores = torch.matmul(query, k_rep.transpose(2, 3)) * scaling
        if softcap is not None:
            scores = torch.tanh(scores / softcap) * softcap
        scores = scores.masked_fill(~safe[:, None], float("-inf"))
        probs = torch.softmax(scores, dim=-1, dtype=torch.float32).to(query.dtype)
        probs = probs * has_any[:, None, :, None]
        context_out = torch.matmul(probs, v_rep)
    else:
        context_out = F.scaled_dot_product_attention(
            query, keys, values, attn_mask=safe[:, None], scale=scaling, enable_gqa=groups > 1
        )
    context_out = context_out * has_any[:, None, :, None]
    batch, _, n_q, _ = context_out.shape
    delta = adapter.attn_output(layer_idx, context_out.transpose(1, 2).reshape(batch, n_q, -1))

    if flops is not None:
        _count_attention(adapter, flops, layer_idx, q_meta, k_meta_new, visible)
    if q_index is None:
        hidden = hidden + delta
    else:
        delta = delta * q_valid[..., None]
        hidden = hidden.scatter_add(1, q_index[..., None].expand_as(delta), delta)
    record_out = AttentionRecord(probs, q_meta, k_meta) if record else None
    return hidden, record_out


def _count_attention(adapter, flops: FlopsCounter, layer_idx, q_meta, k_meta_new, visible) -> None:
    """FLOPs of the rows that really entered this attention; projection sizes come from the module shapes."""
    macs = layer_macs(adapter, layer_idx)
    n_q = int(q_meta["valid"].sum())
    n_kv = int(k_meta_new["valid"].sum())
    pairs = int((visible & q_meta["valid"][..., None]).sum())
    flops.add(layer_idx, "q_proj", 2 * n_q * macs["q_proj"])
    flops.add(layer_idx, "kv_proj", 2 * n_kv * macs["kv_proj"])
    flops.add(layer_idx, "o_proj", 2 * n_q * macs["o_proj"])
    flops.add(layer_idx, "attn_scores", 4 * adapter.num_heads * adapter.head_dim * pairs)


def _mlp_block(adapter: ModelAdapter, layer_idx, hidden, meta, step: LayerStep | None, flops: FlopsCounter | None):
    mask = None if step is None else step.mlp_rows
    if mask is None:
        if flops is not None:
            flops.add(layer_idx, "mlp", 2 * int(meta["valid"].sum()) * layer_macs(adapter, layer_idx)["mlp"])
        return hidden + adapter.mlp(layer_idx, hidden)
    rows = mask.nonzero(as_tuple=True)
    if flops is not None:
        real = int((mask & meta["valid"]).sum())
        flops.add(layer_idx, "mlp", 2 * real * layer_macs(adapter, layer_idx)["mlp"])
    if rows[0].numel() == 0:
        return hidden
    selected = hidden[rows]
    return hidden.index_put(rows, selected + adapter.mlp(layer_idx, selected))


def _logits(adapter, hidden, meta, logits_rows, flops: FlopsCounter | None):
    if logits_rows == "none":
        return None
    if logits_rows == "all":
        chosen = hidden
    elif logits_rows == "last":
        chosen = hidden[:, -1:]
    elif isinstance(logits_rows, int) and logits_rows > 0:
        chosen = hidden[:, -logits_rows:]
    else:
        raise PlanError(f"logits_rows must be 'all', 'last', 'none' or a positive int; got {logits_rows!r}")
    if flops is not None:
        flops.add(adapter.num_layers, "lm_head", 2 * chosen.shape[0] * chosen.shape[1] * adapter.hidden_size * adapter.vocab_size)
    return adapter.logits(chosen)
