"""SkipGPT two-stage training: (1) routers with the backbone frozen, (2) LoRA with the routers frozen.

Stage 1 loss: CE + weight * |(1 - s*) - rho|, rho = execution rate over layers, both modules and valid
tokens, with straight-through Gumbel-softmax gates whose temperature anneals linearly per optimizer step.
Stage 2: peft LoRA (r=16, alpha=32, dropout 0.1 on q_proj, v_proj, gate_proj), argmax routing, no
sparsity loss; the adapters are merged so the result is a plain HF checkpoint plus routers.json.
Both stages run through transformers.Trainer.
"""

from __future__ import annotations

import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn
from transformers import TrainerCallback

from brisklm.core.adapter import ModelAdapter
from brisklm.core.text import as_text_layer
from brisklm.errors import BriskError
from brisklm.pruning.gating import GatedRouting
from brisklm.pruning.routers import ROUTER_KINDS, RouterSet
from brisklm.zoo.textlm import PadCollator, TrainOptions

STAGES = ("routers", "lora")


def check_sparsity(sparsity: float) -> float:
    """Return the sparsity or raise a user error unless it lies strictly between 0 and 1."""
    if not isinstance(sparsity, (int, float)) or not 0.0 < float(sparsity) < 1.0:
        raise BriskError(f"sparsity must be strictly between 0 and 1 (e.g. 0.25), got {sparsity!r}")
    return float(sparsity)


@dataclass
class SkipGPTOptions:
    """Hyper-parameters of both stages (SkipGPT defaults, shortened for tiny models)."""

    sparsity: float = 0.25
    router: str = "linear"
    rank: int = 16
    loss_weight: float = 20.0
    tau_start: float = 5.0
    tau_end: float = 1.0
    noise_start: float = 1.0  # Gumbel noise scale; annealed to noise_end (1.0 = original SkipGPT)
    noise_end: float = 0.0
    router_steps: int = 300
    router_lr: float = 2e-3
    lora_steps: int = 200
    lora_lr: float = 2e-4
    lora_r: int = 16
    lora_alpha: int = 32
    lora_dropout: float = 0.1
    lora_targets: tuple[str, ...] = ("q_proj", "v_proj", "gate_proj")
    batch_size: int = 16
    seed: int = 0
    extra: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        check_sparsity(self.sparsity)
        if self.router not in ROUTER_KINDS:
            raise BriskError(f"unknown router kind {self.router!r}; choose one of {', '.join(ROUTER_KINDS)}")


class RoutedLM(nn.Module):
    """A causal LM with gate-multiplied routing; adds the sparsity loss while training with it on."""

    def __init__(self, model, routers: RouterSet, target_sparsity: float | None, loss_weight: float,
                 mode: str = "gumbel", tau: float = 1.0) -> None:
        super().__init__()
        self.model, self.routers = model, routers
        self.target, self.loss_weight = target_sparsity, loss_weight
        self.routing = GatedRouting(model, routers, mode=mode, tau=tau)
        self.last_rate: float | None = None

    def forward(self, input_ids, attention_mask=None, labels=None, **kwargs):
        out = self.model(input_ids=input_ids, attention_mask=attention_mask, labels=labels)
        loss = out.loss
        valid = attention_mask.bool() if attention_mask is not None else None
        rate = self.routing.record.exec_rate(valid)
        self.last_rate = float(rate.detach())
        if self.training and self.target is not None and loss is not None:
            loss = loss + self.loss_weight * ((1.0 - self.target) - rate).abs()
        return {"loss": loss, "logits": out.logits}


class TemperatureSchedule(TrainerCallback):
    """Linear anneal of the Gumbel temperature and noise scale by optimizer step (not by forward count)."""

    def __init__(self, routing: GatedRouting, opts: "SkipGPTOptions") -> None:
        self.routing, self.opts = routing, opts

    def on_step_begin(self, args, state, control, **kwargs):
        frac = min(state.global_step / max(state.max_steps, 1), 1.0)
        o = self.opts
        self.routing.tau = o.tau_start - (o.tau_start - o.tau_end) * frac
        self.routing.noise = o.noise_start - (o.noise_start - o.noise_end) * frac


def _train(module: nn.Module, tokenizer, features, steps: int, lr: float, opts: SkipGPTOptions, callbacks=()):
    """Fit `module` with transformers.Trainer (through zoo.textlm.train_lm's arguments)."""
    from transformers import Trainer

    from brisklm.zoo.textlm import training_arguments

    options = TrainOptions(steps=steps, batch_size=opts.batch_size, learning_rate=lr, warmup_ratio=0.1,
                           seed=opts.seed, log_every=max(steps // 4, 1))
    with tempfile.TemporaryDirectory() as tmp:
        args = training_arguments(options, tmp)
        args.max_grad_norm = 1.0
        trainer = Trainer(model=module, args=args, train_dataset=features,
                          data_collator=PadCollator(as_text_layer(tokenizer).roles.pad_id), callbacks=list(callbacks))
        result = trainer.train()
    module.eval()
    return {"train_loss": float(result.training_loss), "train_seconds": float(result.metrics.get("train_runtime", 0.0))}


def train_routers(model, tokenizer, features: list[dict], opts: SkipGPTOptions) -> tuple[RouterSet, dict]:
    """Stage 1: train fresh routers on `features` with the backbone frozen; returns routers and stats."""
    adapter = ModelAdapter.from_model(model)
    torch.manual_seed(opts.seed)
    routers = RouterSet(adapter.num_layers, adapter.hidden_size, opts.router, opts.rank)
    for p in model.parameters():
        p.requires_grad_(False)
    routed = RoutedLM(model, routers, opts.sparsity, opts.loss_weight, mode="gumbel", tau=opts.tau_start)
    try:
        stats = _train(routed, tokenizer, features, opts.router_steps, opts.router_lr, opts,
                       [TemperatureSchedule(routed.routing, opts)])
    finally:
        routed.routing.remove()
    for p in routers.parameters():
        p.requires_grad_(False)
    return routers.eval(), {**stats, "stage": "routers", "steps": opts.router_steps}


def lora_target_modules(model, names: tuple[str, ...]) -> list[str]:
    """LoRA target module names in the model's family (Phi3: q/v_proj -> qkv_proj, gate_proj -> gate_up_proj)."""
    adapter = ModelAdapter.from_model(model)
    return list(dict.fromkeys(adapter.module_name(name) for name in names))


def train_lora(model, tokenizer, features: list[dict], routers: RouterSet, opts: SkipGPTOptions):
    """Stage 2: LoRA on the backbone with frozen routers (argmax routing); returns the merged model."""
    from peft import LoraConfig, get_peft_model

    for p in routers.parameters():
        p.requires_grad_(False)
    routed_base = model
    config = LoraConfig(r=opts.lora_r, lora_alpha=opts.lora_alpha, lora_dropout=opts.lora_dropout,
                        target_modules=lora_target_modules(model, opts.lora_targets), task_type="CAUSAL_LM")
    peft_model = get_peft_model(routed_base, config)
    routing = GatedRouting(routed_base, routers, mode="argmax")
    wrapper = _PeftRouted(peft_model, routing)
    try:
        stats = _train(wrapper, tokenizer, features, opts.lora_steps, opts.lora_lr, opts)
    finally:
        routing.remove()
    merged = peft_model.merge_and_unload()
    for p in merged.parameters():
        p.requires_grad_(False)
    return merged.eval(), {**stats, "stage": "lora", "steps": opts.lora_steps}


class _PeftRouted(nn.Module):
    """The peft model under argmax routing hooks (routers frozen, no sparsity loss)."""

    def __init__(self, peft_model, routing: GatedRouting) -> None:
        super().__init__()
        self.peft_model, self.routing = peft_model, routing

    def forward(self, input_ids, attention_mask=None, labels=None, **kwargs):
        out = self.peft_model(input_ids=input_ids, attention_mask=attention_mask, labels=labels)
        return {"loss": out.loss, "logits": out.logits}


def save_skipgpt(out_dir: str | Path, model, tokenizer, routers: RouterSet, info: dict) -> Path:
    """Save a normal HF checkpoint (loads with from_pretrained) plus routers.safetensors / routers.json."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out)
    if tokenizer is not None:
        tokenizer.save_pretrained(out)
    routers.save(out, info)
    return out


def load_skipgpt(path: str | Path, device: str = "auto", dtype: str = "auto", kv_policy: str = "full"):
    """A SkipGPTModel from a folder written by save_skipgpt (see brisklm.pruning.skipmodel)."""
    from brisklm.pruning.skipmodel import load_skipgpt as load_model

    return load_model(path, device, dtype, kv_policy)
