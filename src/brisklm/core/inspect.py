"""What brisklm sees in a checkpoint: family, layer recipe, windows, rope, dtype/device and tokenizer roles.

`brisk inspect` prints this; areas read the same report to say which of their commands can run on it.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any

from brisklm.core.adapter import ModelAdapter
from brisklm.core.text import TextLayer


@dataclass
class CheckpointReport:
    """A checkpoint as the adapter and the text layer see it (plain data, printable and JSON-able)."""

    family: str
    architecture: str
    multimodal: bool
    layers: int
    hidden_size: int
    heads: int
    kv_heads: int
    head_dim: int
    intermediate_size: int
    vocab_size: int
    windows: list[int | None]
    rope_type: str
    rope_theta: float | None
    dtype: str
    device: str
    parameters: int
    bos_id: int | None
    eos_ids: list[int]
    pad_id: int
    pad_source: str
    sep_id: int | None
    end_of_turn_id: int | None
    chat_template: bool
    word_level: bool
    tokens: dict[str, str | None] = field(default_factory=dict)

    def to_json(self) -> dict[str, Any]:
        return asdict(self)


def _rope(config) -> tuple[str, float | None]:
    """Rope type and base from `rope_parameters` (transformers 5) or the older `rope_scaling` / `rope_theta`."""
    params = getattr(config, "rope_parameters", None) or getattr(config, "rope_scaling", None) or {}
    if isinstance(params, dict) and "full_attention" in params:  # per-layer-type parameters (Gemma3)
        params = params["full_attention"]
    rope_type = str(params.get("rope_type") or params.get("type") or "default") if isinstance(params, dict) else "default"
    theta = params.get("rope_theta") if isinstance(params, dict) else None
    theta = theta if theta is not None else getattr(config, "rope_theta", None)
    return rope_type, None if theta is None else float(theta)


def describe(model, tokenizer) -> CheckpointReport:
    """Describe a loaded model and its tokenizer; raises the adapter's or the text layer's one-line errors."""
    adapter = ModelAdapter.from_model(model)
    text = TextLayer.for_model(model, tokenizer)
    roles = text.roles
    first = next(adapter.model.parameters())
    rope_type, theta = _rope(adapter.config)
    name = lambda i: None if i is None else tokenizer.convert_ids_to_tokens(int(i))  # noqa: E731
    return CheckpointReport(
        family=adapter.family,
        architecture=type(adapter.model).__name__,
        multimodal=adapter.config is not getattr(adapter.model, "config", None),
        layers=adapter.num_layers,
        hidden_size=adapter.hidden_size,
        heads=adapter.num_heads,
        kv_heads=adapter.num_kv_heads,
        head_dim=adapter.head_dim,
        intermediate_size=adapter.intermediate_size,
        vocab_size=adapter.vocab_size,
        windows=[adapter.sliding_window(i) for i in range(adapter.num_layers)],
        rope_type=rope_type,
        rope_theta=theta,
        dtype=str(first.dtype).replace("torch.", ""),
        device=str(first.device),
        parameters=sum(p.numel() for p in adapter.model.parameters()),
        bos_id=roles.bos_id,
        eos_ids=list(roles.eos_ids),
        pad_id=roles.pad_id,
        pad_source=roles.pad_source,
        sep_id=roles.sep_id,
        end_of_turn_id=roles.end_of_turn_id,
        chat_template=text.chat_template,
        word_level=text.word_level,
        tokens={"bos": name(roles.bos_id), "eos": ", ".join(name(i) for i in roles.eos_ids),
                "pad": name(roles.pad_id), "sep": name(roles.sep_id), "end_of_turn": name(roles.end_of_turn_id)},
    )


def _windows_text(windows: list[int | None]) -> str:
    """'full' / 'all 4' / 'sliding 4 on layers 0, 2; full on 1, 3'."""
    if all(w is None for w in windows):
        return "full attention on every layer"
    if len(set(windows)) == 1:
        return f"sliding window {windows[0]} on every layer"
    sliding = [i for i, w in enumerate(windows) if w is not None]
    full = [i for i, w in enumerate(windows) if w is None]
    sizes = sorted({w for w in windows if w is not None})
    return (f"sliding window {'/'.join(map(str, sizes))} on layers {', '.join(map(str, sliding))}; "
            f"full on {', '.join(map(str, full)) or 'none'}")


def _token(report: CheckpointReport, role: str, token_id: int | None) -> str:
    return f"{token_id} {report.tokens[role]}"


def report_lines(report: CheckpointReport) -> list[str]:
    """The human-readable summary `brisk inspect` prints (one fact a line)."""
    r = report
    gqa = f"GQA {r.heads // max(r.kv_heads, 1)}:1" if r.kv_heads != r.heads else "MHA"
    eos = ", ".join(f"{i} {t}" for i, t in zip(r.eos_ids, (r.tokens["eos"] or "").split(", ")))
    bos = "none (not prepended)" if r.bos_id is None else _token(r, "bos", r.bos_id)
    if r.chat_template:
        separator = "the chat template's assistant header"
    elif r.sep_id is not None:
        separator = _token(r, "sep", r.sep_id)
    else:
        separator = "plain newline"
    template = "no"
    if r.chat_template:
        template = "yes" if r.end_of_turn_id is None else f"yes, turns end with {_token(r, 'end_of_turn', r.end_of_turn_id)}"
    source = ", text model of a multimodal checkpoint" if r.multimodal else ""
    return [
        f"family        {r.family} ({r.architecture}{source})",
        f"shape         {r.layers} layers, d={r.hidden_size}, {r.heads} heads / {r.kv_heads} kv heads ({gqa}), "
        f"head_dim {r.head_dim}, MLP {r.intermediate_size}, vocab {r.vocab_size}, {r.parameters / 1e6:.2f}M parameters",
        f"attention     {_windows_text(r.windows)}",
        f"rope          {r.rope_type}" + ("" if r.rope_theta is None else f", theta {r.rope_theta:g}"),
        f"weights       {r.dtype} on {r.device}",
        f"tokenizer     {'word-level (one id per word)' if r.word_level else 'subword (words may span several tokens)'}",
        f"bos           {bos}",
        f"eos           {eos}",
        f"pad           {_token(r, 'pad', r.pad_id)} (from {r.pad_source})",
        f"separator     {separator}",
        f"chat template {template}",
    ]


# ------------------------------------------------------------------------------------- command support
# An area declares, per command, a rule `report -> None (can run) | reason it cannot`. These are the shared ones.
def causal_lm_only(report: CheckpointReport) -> str | None:
    """Text commands load the checkpoint as a causal LM."""
    if report.multimodal:
        return "it is a multimodal checkpoint; text commands need a *ForCausalLM checkpoint (use brisk vision ...)"
    return None


def multimodal_only(report: CheckpointReport) -> str | None:
    """Vision commands need a LLaVA-style checkpoint with an image tower and projector."""
    if report.architecture != "LlavaForConditionalGeneration":
        return f"it is a {report.architecture}; vision commands need a LlavaForConditionalGeneration checkpoint"
    return None


def word_level_only(report: CheckpointReport) -> str | None:
    """Streaming commands still write one token per target word (subword streaming is the streaming issue)."""
    reason = causal_lm_only(report)
    if reason is None and not report.word_level:
        reason = ("its tokenizer splits words into several tokens; streaming still writes one token per word "
                  "(use a word-level checkpoint such as the zoo's translate-gpe)")
    return reason
