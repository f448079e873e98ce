"""Masked (gate-multiplied) routing on the HF model itself: the training path and the exactness reference.

Hooks compute each layer's router logits from the layer input, then multiply the attention and MLP
outputs by a per-token gate. Every token still pays for both modules; `sparse.py` is the path that skips.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from brisklm.core.adapter import ModelAdapter
from brisklm.pruning.routers import RouterSet, argmax_gate, gumbel_gate

GATE_MODES = ("argmax", "gumbel")


@dataclass
class GateRecord:
    """Per-layer execute gates (B, T) of the last forward, attention and MLP."""

    attn: list[torch.Tensor] = field(default_factory=list)
    mlp: list[torch.Tensor] = field(default_factory=list)

    def clear(self) -> None:
        self.attn.clear()
        self.mlp.clear()

    def exec_rate(self, valid: torch.Tensor | None = None) -> torch.Tensor:
        """Global execution rate rho over layers, both modules and valid tokens (differentiable)."""
        gates = torch.stack(self.attn + self.mlp)  # (2L, B, T)
        if valid is None:
            return gates.mean()
        w = valid.to(gates.dtype)[None]
        return (gates * w).sum() / (w.sum() * gates.shape[0]).clamp(min=1)


class GatedRouting:
    """Installs router hooks on a model's decoder layers; use as a context manager or call remove()."""

    def __init__(self, model, routers: RouterSet, mode: str = "argmax", tau: float = 1.0, noise: float = 1.0) -> None:
        if mode not in GATE_MODES:
            raise ValueError(f"gate mode must be one of {GATE_MODES}, got {mode!r}")
        adapter = ModelAdapter.from_model(model)
        if adapter.num_layers != routers.num_layers:
            from brisklm.errors import BriskError

            raise BriskError(f"routers are for {routers.num_layers} layers but the model has {adapter.num_layers}")
        self.routers, self.mode, self.tau, self.noise = routers.follow(model), mode, tau, noise
        self.record = GateRecord()
        self._handles = []
        self._pending: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}
        for idx, layer in enumerate(adapter.layers):
            self._handles.append(layer.register_forward_pre_hook(self._pre_hook(idx), with_kwargs=True))
            self._handles.append(layer.self_attn.register_forward_hook(self._attn_hook(idx)))
            self._handles.append(layer.mlp.register_forward_hook(self._mlp_hook(idx)))

    def _gate(self, logits: torch.Tensor) -> torch.Tensor:
        return gumbel_gate(logits, self.tau, self.noise) if self.mode == "gumbel" else argmax_gate(logits)

    def _pre_hook(self, idx: int):
        def hook(module, args, kwargs):
            x = args[0] if args else kwargs["hidden_states"]  # (B, T, D) layer input
            if idx == 0:
                self.record.clear()
            za, zm = self.routers.logits(idx, x)
            ga, gm = self._gate(za), self._gate(zm)
            self.record.attn.append(ga)
            self.record.mlp.append(gm)
            self._pending[idx] = (ga, gm)
            return None

        return hook

    def _attn_hook(self, idx: int):
        def hook(module, args, output):
            gate = self._pending[idx][0].to(output[0].dtype)
            return (output[0] * gate[..., None],) + tuple(output[1:])

        return hook

    def _mlp_hook(self, idx: int):
        def hook(module, args, output):
            return output * self._pending[idx][1].to(output.dtype)[..., None]

        return hook

    def remove(self) -> None:
        for h in self._handles:
            h.remove()
        self._handles.clear()

    def __enter__(self) -> "GatedRouting":
        return self

    def __exit__(self, *exc) -> None:
        self.remove()


@torch.no_grad()
def masked_forward(model, routers: RouterSet, input_ids: torch.Tensor,
                   attention_mask: torch.Tensor | None = None) -> tuple[torch.Tensor, GateRecord]:
    """Logits (B, T, V) of the gate-multiplied model with argmax routing, and its gates."""
    with GatedRouting(model, routers, mode="argmax") as routing:
        logits = model(input_ids=input_ids, attention_mask=attention_mask).logits
        return logits, routing.record
