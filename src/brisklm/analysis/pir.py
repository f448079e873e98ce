"""Peak Inverse Rank (PIR): does the label position already carry the task concept? Two named variants.

* ``residual`` (the paper's text): the residual stream at the label token after each block, decoded by the logit
  lens (final norm recomputed per layer, then the LM head); RR_l = 1 / (rank of the task token + 1).
* ``attn_contrib`` (the public code): at each block l, the label token's value vectors v = W_V . norm_in(h_l[label])
  weighted per head by the last position's attention to the label token, concatenated, through o_proj, the final
  norm and the LM head. This is what the label token writes into the last position through attention. Where the
  family norms the attention output before the residual add (Gemma's post-attention norm) that norm is applied to
  the label's share itself; that differs from scaling the share as the whole output is scaled by a per-row factor
  only, which the final norm removes, so the ranks are the same (up to the norms' epsilon).

PIR = max over layers of RR_l. Both are batched over prompts of different lengths (right padding).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import torch

from brisklm.analysis.lens import EncodedPrompts, check_positions, decode_hidden, gather_positions, run_recorded, token_rank
from brisklm.core.adapter import ModelAdapter
from brisklm.core.executor import ExecutorOutput
from brisklm.errors import BriskError

PirMode = Literal["residual", "attn_contrib"]
MODES: tuple[str, ...] = ("residual", "attn_contrib")


@dataclass
class PirResult:
    """Per prompt and layer: 0-based ranks (B, L) and inverse ranks (B, L); PIR (B,) and its peak layer (B,)."""

    mode: str
    ranks: torch.Tensor
    inverse_ranks: torch.Tensor
    pir: torch.Tensor
    peak_layer: torch.Tensor

    def mean_curve(self) -> list[float]:
        """Mean inverse rank per layer (L,), averaged over prompts."""
        return self.inverse_ranks.float().mean(dim=0).tolist()

    def mean_pir(self) -> float:
        """PIR averaged over prompts."""
        return float(self.pir.float().mean())


def _check_mode(mode: str) -> None:
    if mode not in MODES:
        raise BriskError(f"unknown PIR mode {mode!r}: use one of {', '.join(MODES)}")


def _result(mode: str, logits: torch.Tensor, task_ids: torch.Tensor) -> PirResult:
    """Ranks of task_ids (B,) under logits (L, B, V) -> PirResult with (B, L) tensors."""
    ranks = token_rank(logits, task_ids[None, :].expand(logits.shape[0], -1)).T.cpu()  # (B, L), a host result
    inverse = 1.0 / (ranks.double() + 1.0)
    pir, peak = inverse.max(dim=1)
    return PirResult(mode, ranks, inverse, pir, peak)


def residual_logits(adapter: ModelAdapter, layer_hidden: list[torch.Tensor], label_pos: torch.Tensor) -> torch.Tensor:
    """Lens logits (L, B, V) of the residual stream at label_pos (B,) after each block 1..L."""
    hidden = torch.stack([gather_positions(h, label_pos[:, None])[:, 0] for h in layer_hidden[1:]])  # (L, B, D)
    return decode_hidden(adapter, hidden)


def attn_contrib_logits(adapter: ModelAdapter, layer_hidden: list[torch.Tensor], attentions: list,
                        label_pos: torch.Tensor, query_pos: torch.Tensor) -> torch.Tensor:
    """Logits (L, B, V) of the label token's attention-weighted values written into the query row, per block."""
    batch = label_pos.shape[0]
    rows = torch.arange(batch, device=label_pos.device)
    out = []
    groups = adapter.num_heads // adapter.num_kv_heads
    for layer_idx in range(adapter.num_layers):
        record = attentions[layer_idx]
        if record is None or record.probs is None:
            raise BriskError(f"layer {layer_idx} has no recorded attention; run with record_attention=True")
        x = gather_positions(layer_hidden[layer_idx], label_pos[:, None])  # (B, 1, D): input of block l
        (value,) = adapter.project(layer_idx, adapter.attn_input(layer_idx, x), "v")  # (B, Hkv, 1, hd)
        value = value[:, :, 0].repeat_interleave(groups, dim=1)  # (B, H, hd)
        weight = record.probs[rows, :, query_pos, label_pos]  # (B, H): attention of the query row to the label key
        mixed = (weight[..., None] * value).reshape(batch, 1, adapter.num_heads * adapter.head_dim)
        out.append(decode_hidden(adapter, adapter.attn_output(layer_idx, mixed))[:, 0])  # (B, V)
    return torch.stack(out)


@torch.no_grad()
def peak_inverse_rank(model, enc: EncodedPrompts, label_positions: torch.Tensor, task_token_ids: torch.Tensor,
                      query_positions: torch.Tensor | None = None,
                      modes: tuple[str, ...] = MODES) -> dict[str, PirResult]:
    """PIR of each prompt in a batch for the asked modes; positions count from the row's first id (`<bos>` = 0).

    label_positions (B,): the label token whose information is measured; query_positions (B,): the row that reads
    it (default: each prompt's last real token); task_token_ids (B,): the token naming the task.
    """
    for mode in modes:
        _check_mode(mode)
    adapter = ModelAdapter.from_model(model)
    batch, length = enc.input_ids.shape
    label_pos = check_positions(label_positions, enc.lengths, length, "label")[:, 0]
    query_pos = enc.lengths - 1 if query_positions is None else check_positions(query_positions, enc.lengths, length, "query")[:, 0]
    task_ids = torch.as_tensor(task_token_ids, dtype=torch.long).reshape(-1)
    if task_ids.shape[0] != batch or label_pos.shape[0] != batch or query_pos.shape[0] != batch:
        raise BriskError(f"give one label position, query position and task token per prompt ({batch} prompts)")
    if bool((task_ids < 0).any()) or bool((task_ids >= adapter.vocab_size).any()):
        raise BriskError(f"task token ids must lie in [0, {adapter.vocab_size}); got {task_ids.tolist()}")
    if bool((label_pos > query_pos).any()):
        raise BriskError("a label position lies after its query position: the query cannot attend to it")
    out = run_recorded(model, enc, record_attention="attn_contrib" in modes)
    return pir_from_output(adapter, out, label_pos, query_pos, task_ids, modes)


def pir_from_output(adapter: ModelAdapter, out: ExecutorOutput, label_pos: torch.Tensor, query_pos: torch.Tensor,
                    task_ids: torch.Tensor, modes: tuple[str, ...] = MODES) -> dict[str, PirResult]:
    """PIR for each mode from one recorded executor pass (hidden states, and attentions for attn_contrib)."""
    results: dict[str, PirResult] = {}
    device = out.last_hidden.device  # positions and ids are checked on the host, used where the model runs
    label_pos, query_pos, task_ids = label_pos.to(device), query_pos.to(device), task_ids.to(device)
    if "residual" in modes:
        results["residual"] = _result("residual", residual_logits(adapter, out.layer_hidden, label_pos), task_ids)
    if "attn_contrib" in modes:
        logits = attn_contrib_logits(adapter, out.layer_hidden, out.attentions, label_pos, query_pos)
        results["attn_contrib"] = _result("attn_contrib", logits, task_ids)
    return results


def concat_results(parts: list[PirResult]) -> PirResult:
    """Join the PirResults of several batches (same mode) along the prompt axis."""
    if not parts:
        raise BriskError("no PIR results to join")
    return PirResult(parts[0].mode, torch.cat([p.ranks for p in parts]), torch.cat([p.inverse_ranks for p in parts]),
                     torch.cat([p.pir for p in parts]), torch.cat([p.peak_layer for p in parts]))
