"""Static width pruning: unstructured magnitude / Wanda, and structured MLP-channel + attention-head pruning.

Unstructured methods zero weights (same shapes; no dense speed-up). Structured pruning really shrinks
the matrices: MLP channels leave gate/up rows and down columns, query heads leave q rows and o columns
(the same number per KV group in every layer, so GQA stays balanced and the config stays uniform); fused
projections (Phi3 `gate_up_proj`, `qkv_proj`, named by the adapter's recipe) lose the same rows in each of
their parts. The result saves and reloads as a normal HF checkpoint with smaller intermediate_size /
num_attention_heads.
"""

from __future__ import annotations

import copy

import torch
from torch import nn

from brisklm.core.adapter import ModelAdapter
from brisklm.core.device import model_device
from brisklm.errors import BriskError
from brisklm.pruning.calibration import CalibData
from brisklm.pruning.skipgpt import check_sparsity

WIDTH_METHODS = ("magnitude", "wanda", "structured")


def _linears(adapter: ModelAdapter) -> dict[str, nn.Linear]:
    """Every projection of the decoder layers (attention and MLP, fused ones included) as 'layer.module'."""
    out = {}
    for i, layer in enumerate(adapter.layers):
        for parent in (layer.self_attn, layer.mlp):
            for name, child in parent.named_children():
                if isinstance(child, nn.Linear):
                    out[f"{i}.{name}"] = child
    return out


@torch.no_grad()
def activation_norms(model, data: CalibData, pad_id: int, batch_size: int = 16) -> dict[str, torch.Tensor]:
    """||X_j||_2 over valid calibration tokens for the input channel j of every decoder projection."""
    adapter = ModelAdapter.from_model(model)
    linears = _linears(adapter)
    sums = {name: torch.zeros(lin.in_features, dtype=torch.float64) for name, lin in linears.items()}
    current: dict[str, torch.Tensor] = {}

    def hook(name):
        def fn(module, args, output):
            x = args[0][current["mask"]]  # (N_valid, in)
            sums[name] += x.double().pow(2).sum(0).to(sums[name].device)
        return fn

    handles = [lin.register_forward_hook(hook(name)) for name, lin in linears.items()]
    try:
        for batch in data.batches(batch_size, pad_id, model_device(model)):
            current["mask"] = batch["attention_mask"].bool()
            model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"])
    finally:
        for h in handles:
            h.remove()
    return {k: v.sqrt().float() for k, v in sums.items()}


def decoder_linear_params(model) -> int:
    """Parameters of all decoder-layer projections (the pool pruning sparsity refers to)."""
    return sum(lin.weight.numel() for lin in _linears(ModelAdapter.from_model(model)).values())


def zero_fraction(model) -> float:
    """Fraction of decoder-layer projection weights that are exactly zero."""
    linears = _linears(ModelAdapter.from_model(model)).values()
    return sum(int((l.weight == 0).sum()) for l in linears) / sum(l.weight.numel() for l in linears)


def parse_nm(pattern: str) -> tuple[int, int]:
    """'2:4' -> (2, 4): keep N weights in every group of M consecutive inputs (1 <= N < M)."""
    try:
        n, m = (int(part) for part in str(pattern).split(":"))
    except ValueError:
        raise BriskError(f"N:M pattern {pattern!r} is not of the form N:M, e.g. 2:4") from None
    if not 1 <= n < m:
        raise BriskError(f"N:M pattern {pattern!r} must keep 1 <= N < M weights per group of M, e.g. 2:4")
    return n, m


def check_nm(model, n: int, m: int) -> None:
    """A user error naming the first decoder projection whose input size M does not divide."""
    for name, lin in _linears(ModelAdapter.from_model(model)).items():
        if lin.in_features % m:
            layer, module = name.split(".", 1)
            raise BriskError(f"N:M {n}:{m} needs every projection's input size divisible by {m}, but layer {layer} "
                             f"{module} has {lin.in_features} inputs; choose an M that divides it (e.g. 2:4)")


@torch.no_grad()
def prune_unstructured(model, sparsity: float | None, method: str = "wanda",
                       norms: dict[str, torch.Tensor] | None = None, nm: tuple[int, int] | str | None = None):
    """Zero low-scoring weights, scored |W| (magnitude) or |W|*||X|| (Wanda), on a copy of `model`.

    Without `nm`: the lowest `sparsity` fraction of each output row. With `nm=(N, M)` (or "N:M"): in every
    group of M consecutive input weights of a row, keep the N highest-scoring (2:4 = 50%, the sparse-tensor-core
    pattern); `sparsity` is then ignored (pass None).
    """
    if nm is None:
        check_sparsity(sparsity)
    else:
        nm = parse_nm(nm) if isinstance(nm, str) else nm
        check_nm(model, *nm)
    if method not in ("magnitude", "wanda"):
        raise BriskError(f"unknown unstructured method {method!r}; use magnitude or wanda")
    if method == "wanda" and norms is None:
        raise BriskError("Wanda needs calibration activations; pass norms=activation_norms(model, data, pad_id)")
    pruned = copy.deepcopy(model)
    for name, lin in _linears(ModelAdapter.from_model(pruned)).items():
        score = lin.weight.abs().float()  # (out, in)
        if method == "wanda":
            score = score * norms[name].to(score.device)[None, :]
        if nm is not None:
            n, m = nm
            groups = score.view(score.shape[0], -1, m)  # (out, in / M, M)
            drop = groups.topk(m - n, dim=2, largest=False).indices
            mask = torch.ones_like(groups, dtype=torch.bool).scatter_(2, drop, False).view_as(score)
            lin.weight.masked_fill_(~mask, 0.0)
            continue
        k = int(round(sparsity * lin.in_features))
        if k == 0:
            continue
        drop = score.topk(k, dim=1, largest=False).indices
        lin.weight.scatter_(1, drop, 0.0)
    return pruned.eval()


def nm_violations(model, n: int, m: int) -> int:
    """Groups of M consecutive inputs (in any decoder projection row) holding more than N non-zeros."""
    bad = 0
    for lin in _linears(ModelAdapter.from_model(model)).values():
        nonzero = (lin.weight != 0).view(lin.out_features, -1, m).sum(-1)
        bad += int((nonzero > n).sum())
    return bad


def _shrink_linear(lin: nn.Linear, keep: torch.Tensor, dim: int) -> nn.Linear:
    """A new Linear keeping output rows (dim=0) or input columns (dim=1) `keep`."""
    weight = lin.weight.index_select(dim, keep)
    new = nn.Linear(weight.shape[1], weight.shape[0], bias=lin.bias is not None, dtype=weight.dtype,
                    device=weight.device)
    new.weight.data.copy_(weight)
    if lin.bias is not None:
        new.bias.data.copy_(lin.bias if dim == 1 else lin.bias.index_select(0, keep))
    return new


def heads_for_sparsity(model, head_sparsity: float) -> int:
    """Query heads to remove per KV group for a fraction of query heads; a group left empty is a user error."""
    adapter = ModelAdapter.from_model(model)
    h, hkv = adapter.num_heads, adapter.num_kv_heads
    group = h // hkv
    if not isinstance(head_sparsity, (int, float)) or not 0.0 <= head_sparsity < 1.0:
        raise BriskError(f"head sparsity must be in [0, 1), got {head_sparsity!r}")
    remove = int(round(head_sparsity * group))
    if remove >= group:
        raise BriskError(f"head sparsity {head_sparsity} removes all {group} query heads of each KV group ({h} query "
                         f"heads / {hkv} KV heads), leaving a GQA group empty; use at most "
                         f"{(group - 1) / group:.3g}")
    return remove


@torch.no_grad()
def prune_structured(model, sparsity: float, norms: dict[str, torch.Tensor], heads_per_group: int = 0):
    """Remove `heads_per_group` query heads per KV group and enough MLP channels to reach `sparsity`.

    Scores are Wanda-style: ||X_cols|| * ||W_cols|| on the module's output projection (o_proj / down_proj).
    Returns (smaller model, report with realised sparsity of the decoder projections).
    """
    check_sparsity(sparsity)
    adapter = ModelAdapter.from_model(model)
    d, h, hkv, hd, m = (adapter.hidden_size, adapter.num_heads, adapter.num_kv_heads, adapter.head_dim,
                        adapter.intermediate_size)
    group = h // hkv
    if not isinstance(heads_per_group, int) or not 0 <= heads_per_group < group:
        raise BriskError(f"heads_per_group must be in [0, {group - 1}]: each of the {hkv} KV groups has {group} query "
                         f"heads, and removing {heads_per_group} would leave a GQA group empty")
    total = decoder_linear_params(model)
    head_saving = adapter.num_layers * hkv * heads_per_group * 2 * hd * d
    mlp_saving_needed = sparsity * total - head_saving
    if mlp_saving_needed < 0:
        raise BriskError(f"removing {heads_per_group} head(s) per group already exceeds sparsity {sparsity}; "
                         "use fewer heads or a higher sparsity")
    drop_channels = int(round(mlp_saving_needed / (adapter.num_layers * 3 * d)))
    if drop_channels >= m:
        raise BriskError(f"sparsity {sparsity} would remove every MLP channel; use a lower sparsity")
    pruned = copy.deepcopy(model)
    padapter = ModelAdapter.from_model(pruned)
    recipe = padapter.recipe
    for i, layer in enumerate(padapter.layers):
        mlp, attn = layer.mlp, layer.self_attn
        # MLP channels: score_j = ||X_j|| * ||W_down[:, j]||.
        score = norms[f"{i}.down_proj"].to(mlp.down_proj.weight.device) * mlp.down_proj.weight.norm(dim=0)  # (m,)
        keep = score.topk(m - drop_channels).indices.sort().values
        if recipe.fused_gate_up is not None:  # gate rows [0, m), up rows [m, 2m): keep the same channels of both
            fused = getattr(mlp, recipe.fused_gate_up)
            setattr(mlp, recipe.fused_gate_up, _shrink_linear(fused, torch.cat([keep, keep + m]), 0))
        else:
            mlp.gate_proj = _shrink_linear(mlp.gate_proj, keep, 0)
            mlp.up_proj = _shrink_linear(mlp.up_proj, keep, 0)
        mlp.down_proj = _shrink_linear(mlp.down_proj, keep, 1)
        if heads_per_group:
            cols = (norms[f"{i}.o_proj"].to(attn.o_proj.weight.device) * attn.o_proj.weight.norm(dim=0)).view(h, hd)
            head_score = cols.pow(2).sum(1).view(hkv, group)  # (hkv, group)
            kept = head_score.topk(group - heads_per_group, dim=1).indices.sort(dim=1).values
            heads = (kept + torch.arange(hkv, device=kept.device)[:, None] * group).flatten()  # (hkv * kept,) head ids
            rows = (heads[:, None] * hd + torch.arange(hd, device=kept.device)[None]).flatten()
            if recipe.fused_qkv is not None:  # q rows first, then all k and v rows (kept whole)
                fused = getattr(attn, recipe.fused_qkv)
                kv_rows = h * hd + torch.arange(fused.out_features - h * hd, device=rows.device)
                setattr(attn, recipe.fused_qkv, _shrink_linear(fused, torch.cat([rows, kv_rows]), 0))
            else:
                attn.q_proj = _shrink_linear(attn.q_proj, rows, 0)
            attn.o_proj = _shrink_linear(attn.o_proj, rows, 1)
            attn.num_key_value_groups = group - heads_per_group
    cfg = pruned.config
    cfg.intermediate_size = m - drop_channels
    if heads_per_group:
        cfg.head_dim = hd
        cfg.num_attention_heads = hkv * (group - heads_per_group)
    realised = 1 - decoder_linear_params(pruned) / total
    report = {"method": "structured", "mlp_channels_removed": drop_channels, "heads_removed_per_group": heads_per_group,
              "intermediate_size": cfg.intermediate_size, "num_attention_heads": cfg.num_attention_heads,
              "realised_sparsity": realised}
    return pruned.eval(), report
