"""Logit lens: decode every layer's residual stream through the final norm (recomputed per layer) and the LM head.

Built on `brisklm.core.execute(record_hidden=True)`, so it works on every supported HF family, batched, with
right-padded prompts. Index 0 of the layer axis is the embedding output, index l (1..L) the output of block l,
so index L (the last) reproduces the model's own logits.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import torch

from brisklm.core.adapter import ModelAdapter
from brisklm.core.device import model_device
from brisklm.core.executor import ExecutorOutput, execute
from brisklm.core.text import TextLayer, as_text_layer
from brisklm.errors import BriskError


@dataclass
class EncodedPrompts:
    """Right-padded prompt ids (B, T), their attention mask (B, T) and each row's real length (B,)."""

    input_ids: torch.Tensor
    attention_mask: torch.Tensor
    lengths: torch.Tensor


def encode_prompts(tokenizer, prompts: Sequence[str], add_bos: bool = True) -> EncodedPrompts:
    """Prompts -> right-padded ids through the text layer: `[bos] prompt` (bos only when the tokenizer has one)."""
    if not prompts:
        raise BriskError("no prompts given: pass at least one prompt")
    text = as_text_layer(tokenizer)
    rows = [text.text_ids(p) if add_bos else text.encode(p) for p in prompts]
    return pad_right(rows, text.roles.pad_id)


def lens_prompt_ids(text: TextLayer, prompt: str) -> list[int]:
    """What the lens reads: the chat frame (with generation prompt) when templating is on, else `[bos] prompt`."""
    return text.prompt_ids(prompt) if text.chat_template else text.text_ids(prompt)


def pad_right(rows: Sequence[Sequence[int]], pad_id: int) -> EncodedPrompts:
    """Right-pad id lists; right padding keeps real tokens' positions equal to an unpadded run."""
    lengths = torch.tensor([len(r) for r in rows], dtype=torch.long)
    ids = torch.full((len(rows), int(lengths.max())), pad_id, dtype=torch.long)
    for i, r in enumerate(rows):
        ids[i, : len(r)] = torch.tensor(list(r), dtype=torch.long)
    mask = (torch.arange(ids.shape[1])[None, :] < lengths[:, None]).long()
    return EncodedPrompts(ids, mask, lengths)


def gather_positions(x: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
    """x[b, positions[b, p]] for x (B, T, ...) and positions (B, P) -> (B, P, ...)."""
    index = positions.reshape(*positions.shape, *([1] * (x.dim() - 2))).expand(*positions.shape, *x.shape[2:])
    return x.gather(1, index)


def check_positions(positions: torch.Tensor, lengths: torch.Tensor | None, length: int, what: str) -> torch.Tensor:
    """Validate (B,) or (B, P) positions against each row's real length; returns them as (B, P) long."""
    positions = torch.as_tensor(positions, dtype=torch.long)
    if positions.dim() == 1:
        positions = positions[:, None]
    limit = lengths[:, None] if lengths is not None else torch.full_like(positions[:, :1], length)
    if positions.dim() != 2 or bool((positions < 0).any()) or bool((positions >= limit).any()):
        raise BriskError(f"{what} positions must lie inside each prompt (0 <= p < its length); got {positions.tolist()}")
    return positions


def run_recorded(model, enc: EncodedPrompts, record_attention: bool = False) -> ExecutorOutput:
    """One executor pass that keeps every layer's input hidden state (and attention probabilities if asked)."""
    device = model_device(model)  # prompts are encoded on the host
    return execute(model, enc.input_ids.to(device), attention_mask=enc.attention_mask.to(device), logits_rows="none",
                   record_hidden=True, record_attention=record_attention)


def decode_hidden(adapter: ModelAdapter, hidden: torch.Tensor) -> torch.Tensor:
    """Final norm (applied to this hidden state alone) then LM head: (..., D) -> (..., V)."""
    return adapter.logits(hidden)


@torch.no_grad()
def logit_lens(model, input_ids: torch.Tensor, positions: torch.Tensor | None = None,
               attention_mask: torch.Tensor | None = None) -> torch.Tensor:
    """Lens logits (L+1, B, P, V) at `positions` (B, P) (default: every position) for layers 0 (embeddings)..L."""
    adapter = ModelAdapter.from_model(model)
    input_ids = input_ids.to(model_device(model))
    mask = attention_mask.to(input_ids.device) if attention_mask is not None else torch.ones_like(input_ids)
    lengths = mask.long().sum(dim=1)
    enc = EncodedPrompts(input_ids, mask, lengths)
    out = run_recorded(model, enc)
    if positions is None:
        positions = torch.arange(input_ids.shape[1], device=input_ids.device)[None, :].expand(input_ids.shape[0], -1)
    else:
        positions = check_positions(positions, None, input_ids.shape[1], "lens").to(input_ids.device)
    hidden = torch.stack([gather_positions(h, positions) for h in out.layer_hidden])  # (L+1, B, P, D)
    return decode_hidden(adapter, hidden)


def token_rank(logits: torch.Tensor, token_ids: torch.Tensor) -> torch.Tensor:
    """0-based rank of token_ids (...) under logits (..., V): how many tokens score strictly higher."""
    target = logits.gather(-1, token_ids[..., None].long())
    return (logits > target).sum(dim=-1)


_VISIBLE = {" ": "␣", "\n": "\\n", "\t": "\\t", "\r": "\\r"}


def readable_token(text: TextLayer, token_id: int) -> str:
    """One token as a person reads it: its decoded text (not the raw `Ġ`/`▁` piece) with whitespace made visible
    ('␣' for a space, '\\n' for a newline), e.g. `Ġcat` / `▁cat` -> `␣cat`; a piece of a multi-byte character
    shows its bytes (`<0xC3>`); a word-level tokenizer's token is the word itself.

    The token is decoded after an anchor token and the anchor's text removed, because SentencePiece-style decoders
    drop the leading space of a sequence's first token.
    """
    token_id = int(token_id)
    raw = text.tokenizer.convert_ids_to_tokens(token_id)
    if text.word_level:
        return str(raw)
    decode = lambda ids: text.tokenizer.decode(ids, clean_up_tokenization_spaces=False)  # noqa: E731
    anchor = text.encode("a")[:1]
    before, after = decode(anchor), decode(anchor + [token_id])
    piece = after[len(before):] if anchor and after.startswith(before) else decode([token_id])
    if "\ufffd" in piece and isinstance(raw, str) and raw and all(c in _BYTE_OF for c in raw):
        return "".join(f"<0x{_BYTE_OF[c]:02X}>" for c in raw)  # part of a multi-byte character: show its bytes
    if not piece:
        return f"<{raw}>"
    return "".join(_VISIBLE.get(c) or (c if c.isprintable() else f"\\x{ord(c):02x}") for c in piece)


def _byte_level_alphabet() -> dict[str, int]:
    """Character -> byte of the byte-level BPE alphabet (printable bytes map to themselves, the rest to 256+)."""
    kept = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    out, extra = {}, 0
    for b in range(256):
        if b in kept:
            out[chr(b)] = b
        else:
            out[chr(256 + extra)] = b
            extra += 1
    return out


_BYTE_OF = _byte_level_alphabet()


@torch.no_grad()
def lens_top_tokens(model, tokenizer, prompt: str, k: int = 5, position: int = -1,
                    text: TextLayer | None = None, readable: bool = False) -> list[list[tuple[str, float]]]:
    """For one prompt, the top-k lens tokens and probabilities at `position` for every layer (0 = embeddings).

    `text` (default: the tokenizer's text layer) decides the framing, see `lens_prompt_ids`. readable: tokens as
    `readable_token` shows them (decoded, visible spaces); else the tokenizer's raw pieces.
    """
    text = text or as_text_layer(tokenizer)
    enc = pad_right([lens_prompt_ids(text, prompt)], text.roles.pad_id)
    pos = int(enc.lengths[0]) + position if position < 0 else position
    logits = logit_lens(model, enc.input_ids, torch.tensor([[pos]]), enc.attention_mask)[:, 0, 0]  # (L+1, V)
    probs = logits.float().softmax(dim=-1)
    top = probs.topk(min(k, probs.shape[-1]), dim=-1)
    flat = top.indices.reshape(-1).tolist()
    words = [readable_token(text, i) for i in flat] if readable else tokenizer.convert_ids_to_tokens(flat)
    values = top.values.reshape(-1).tolist()
    width = top.indices.shape[1]
    return [list(zip(words[i * width:(i + 1) * width], values[i * width:(i + 1) * width])) for i in range(len(probs))]
