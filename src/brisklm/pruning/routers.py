"""SkipGPT token routers: one execute/skip router per layer for attention and one for the MLP.

A router maps a token's layer input x (B, T, D) to two logits (index 0 = execute, 1 = skip). Training uses
Gumbel-softmax straight-through gates; inference uses the deterministic argmax. Routers are saved as a
small safetensors file plus a JSON description beside a normal HF checkpoint.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from brisklm.errors import BriskError

ROUTER_KINDS = ("linear", "lowrank")
ROUTER_WEIGHTS = "routers.safetensors"
ROUTER_CONFIG = "routers.json"
EXECUTE, SKIP = 0, 1


class TokenRouter(nn.Module):
    """Linear(d, 2) or low-rank Linear(d, r) -> Linear(r, 2); bias starts in favour of executing."""

    def __init__(self, hidden_size: int, kind: str = "linear", rank: int = 16, init_bias: float = 1.0) -> None:
        super().__init__()
        if kind not in ROUTER_KINDS:
            raise BriskError(f"unknown router kind {kind!r}; choose one of {', '.join(ROUTER_KINDS)}")
        if kind == "lowrank" and not 1 <= rank <= hidden_size:
            raise BriskError(f"router rank must be in [1, {hidden_size}], got {rank}")
        self.down = nn.Linear(hidden_size, rank, bias=False) if kind == "lowrank" else None
        self.out = nn.Linear(rank if kind == "lowrank" else hidden_size, 2)
        nn.init.normal_(self.out.weight, std=0.02)
        with torch.no_grad():
            self.out.bias.copy_(torch.tensor([init_bias, 0.0], device=self.out.bias.device))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """(B, T, D) -> (B, T, 2) logits in float32 (routing decisions are precision-sensitive)."""
        x = x.float()
        if self.down is not None:
            x = self.down(x)
        return self.out(x)


class RouterSet(nn.Module):
    """Per-layer attention and MLP routers of one model (both read the layer input, as SkipGPT does)."""

    def __init__(self, num_layers: int, hidden_size: int, kind: str = "linear", rank: int = 16) -> None:
        super().__init__()
        self.kind, self.rank, self.hidden_size = kind, rank, hidden_size
        self.attn = nn.ModuleList(TokenRouter(hidden_size, kind, rank) for _ in range(num_layers))
        self.mlp = nn.ModuleList(TokenRouter(hidden_size, kind, rank) for _ in range(num_layers))

    @property
    def num_layers(self) -> int:
        return len(self.attn)

    def logits(self, layer_idx: int, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(attention, MLP) router logits (B, T, 2) for the layer input x (B, T, D)."""
        return self.attn[layer_idx](x), self.mlp[layer_idx](x)

    def decisions(self, layer_idx: int, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Deterministic argmax decisions: bool (B, T) execute-masks for attention and MLP."""
        za, zm = self.logits(layer_idx, x)
        return za[..., EXECUTE] >= za[..., SKIP], zm[..., EXECUTE] >= zm[..., SKIP]

    def config_dict(self) -> dict:
        return {"num_layers": self.num_layers, "hidden_size": self.hidden_size, "kind": self.kind, "rank": self.rank}

    def save(self, out_dir: str | Path, info: dict | None = None) -> None:
        """Write routers.safetensors and routers.json (config + any training info) into out_dir."""
        from safetensors.torch import save_file

        out = Path(out_dir)
        out.mkdir(parents=True, exist_ok=True)
        save_file({k: v.detach().contiguous().cpu() for k, v in self.state_dict().items()}, str(out / ROUTER_WEIGHTS))
        (out / ROUTER_CONFIG).write_text(json.dumps({**self.config_dict(), "info": info or {}}, indent=2) + "\n")

    def follow(self, model) -> "RouterSet":
        """Move to the model's device (routers stay float32: routing decisions are precision-sensitive)."""
        from brisklm.core.device import model_device

        return self.to(model_device(model))

    @classmethod
    def load(cls, path: str | Path, device: str | torch.device | None = None) -> "RouterSet":
        """Read routers saved by `save` from a checkpoint folder (onto `device`, default cpu)."""
        from safetensors.torch import load_file

        path = Path(path)
        if not (path / ROUTER_CONFIG).exists() or not (path / ROUTER_WEIGHTS).exists():
            raise BriskError(f"{path} has no {ROUTER_CONFIG}/{ROUTER_WEIGHTS}; train routers with `brisk prune skipgpt`")
        cfg = json.loads((path / ROUTER_CONFIG).read_text())
        routers = cls(cfg["num_layers"], cfg["hidden_size"], cfg["kind"], cfg["rank"])
        routers.load_state_dict(load_file(str(path / ROUTER_WEIGHTS)))
        return routers.to(device or "cpu").eval()

    def num_parameters(self) -> int:
        return sum(p.numel() for p in self.parameters())


def gumbel_gate(logits: torch.Tensor, tau: float, noise: float = 1.0) -> torch.Tensor:
    """Straight-through Gumbel-softmax execute gate (B, T): forward is hard 0/1, gradient is soft.

    noise scales the Gumbel sample (1 = standard Gumbel-softmax; 0 = deterministic argmax forward with a
    softmax(z / tau) gradient), so annealing it closes the gap between sampled training and argmax inference.
    """
    if noise == 1.0:
        return F.gumbel_softmax(logits, tau=tau, hard=True, dim=-1)[..., EXECUTE]
    u = torch.rand_like(logits).clamp_(1e-10, 1 - 1e-10)
    soft = torch.softmax((logits - noise * torch.log(-torch.log(u))) / tau, dim=-1)
    hard = F.one_hot(soft.argmax(-1), 2).to(soft.dtype)
    return (hard - soft.detach() + soft)[..., EXECUTE]


def argmax_gate(logits: torch.Tensor) -> torch.Tensor:
    """Deterministic 0/1 execute gate (B, T) from router logits (B, T, 2)."""
    return (logits[..., EXECUTE] >= logits[..., SKIP]).to(logits.dtype)
