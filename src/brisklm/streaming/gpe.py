"""Group Position Encoding layouts: per-segment token ids, wait-k visibility with the one-row shift, positions.

A stream is two groups of segments. Source: s_0 = prompt (`<bos>`, empty when the tokenizer has no BOS),
s_1..s_n = the words, s_{n+1} = the end-of-source marker (eos). Target: u_0 = header (the sep token, else the
encoding of "\n"), u_1..u_m = the words, u_{m+1} = eos (`StreamFrame`). Words become segments through the text
layer (core/text.py): one id each with brisklm's word tokenizer, one or more subword ids on a real checkpoint;
together they are exactly the tokenizer's ids of the joined text.

A schedule says how many source segments after the prompt (`sees`, the end marker counts as segment n+1)
target segment j may attend to when it is *predicted*. Because row r's logits predict token r+1, the last row
of target segment j takes the visibility of segment j+1 (the one-row shift); the final row keeps its own.
The end of the target (u_{m+1}) is predicted with the whole source visible: a stream ends only after its source.

Subword targets (`next_segment_rows`): a row cannot know whether the token it predicts continues its word or
starts the next one, so every row of target segment j takes segment j+1's wait-k visibility (what the engine
does); only the row that predicts the end sees the whole source (the engine re-feeds an early end after reading
more). With one token per segment this is the same mask as the one-row shift above.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal, Sequence

import torch

from brisklm.core.text import TextLayer, as_text_layer
from brisklm.errors import BriskError, VocabularyError

PositionMode = Literal["group", "contiguous", "arrival"]
POSITION_MODES: tuple[str, ...] = ("group", "contiguous", "arrival")
IGNORE = -100


def check_k(k: int) -> int:
    """Validate a wait-k lag (at least one source word is read before the first write)."""
    if not isinstance(k, int) or isinstance(k, bool) or k < 1:
        raise BriskError(f"wait-k needs an integer k >= 1, got {k!r}: pass --k 1 or more")
    return k


def wait_k_sees(k: int, num_source_words: int, segment: int) -> int:
    """Source segments after the prompt visible when target segment `segment` (0 = header) is predicted."""
    return max(0, min(k + segment - 1, num_source_words + 1))


@dataclass
class StreamLayout:
    """One stream's token ids by segment: source (prompt, words, end) and target (header, words, end)."""

    source: list[list[int]]
    target: list[list[int]]
    next_segment_rows: bool = False  # every row of a target segment sees what the segment after it sees

    @property
    def num_source_words(self) -> int:
        return len(self.source) - 2

    @property
    def source_ids(self) -> list[int]:
        return [t for seg in self.source for t in seg]

    @property
    def target_ids(self) -> list[int]:
        return [t for seg in self.target for t in seg]

    @property
    def input_ids(self) -> list[int]:
        """Source tokens then target tokens: the training (full masked pass) sequence."""
        return self.source_ids + self.target_ids

    def source_segment_of_tokens(self) -> list[int]:
        """Segment index (0 = prompt, n+1 = end marker) of every source token."""
        return [i for i, seg in enumerate(self.source) for _ in seg]

    def target_row_sees(self, k: int) -> list[int]:
        """Per target token row, the source segments it sees under wait-k, with the one-row shift."""
        check_k(k)
        n, rows = self.num_source_words, []
        last = len(self.target) - 1

        def sees(j: int) -> int:  # the end of the target is only written once the whole source is read
            return n + 1 if j == last else wait_k_sees(k, n, j)

        for j, seg in enumerate(self.target):
            if self.next_segment_rows and j < last - 1:
                rows += [wait_k_sees(k, n, j + 1)] * len(seg)
            elif self.next_segment_rows:  # the last word: only the row that predicts the end sees everything
                rows += [wait_k_sees(k, n, j + 1)] * (len(seg) - 1) + [sees(min(j + 1, last))]
            else:
                rows += [sees(j)] * (len(seg) - 1) + [sees(min(j + 1, last))]
        return rows


@dataclass(frozen=True)
class StreamFrame:
    """The special segments of a stream for one tokenizer: plain, or the chat template's turns.

    Plain: source `[bos] | words | eos`, target `sep (or "\\n") | words | eos`. Chat template (the tokenizer
    has one and it is not turned off): the source group starts with the template up to the user's content plus
    the instruction, and ends with the user turn's closing (`<|im_end|>\\n`); the target group starts with the
    assistant header (`<|im_start|>assistant\\n`) and ends with the end-of-turn token. A template without an
    assistant header (Mistral's `[INST] .. [/INST]`) puts the closing in the target group as its header and
    ends the source with eos.
    """

    prompt: tuple[int, ...]  # source segment 0 (may be empty: no BOS, no template, no instruction)
    header: tuple[int, ...]  # target segment 0 (never empty)
    source_end: tuple[int, ...]  # the end-of-source segment (never empty)
    target_end: int  # what a training target ends with (eos, or the template's end-of-turn token)
    ends: frozenset[int]  # every id that ends a written target (all eos ids, the end-of-turn token)
    pad: int
    first_at_start: bool = True  # the first source word starts the text (no instruction before it)
    batch_separator: tuple[int, ...] = ()  # between source and target in one-group layouts (re-encoding, interleaved)


CHAT_MARK = "brisk_source_marker"  # stands for the source text when the chat template is rendered


def stream_frame(tokenizer: object, instruction: str | None = None) -> StreamFrame:
    """The frame of a tokenizer (or TextLayer): roles from the text layer (no BOS / no pad / several eos), the
    chat template when the layer uses one, and an optional instruction that opens the source group."""
    text = as_text_layer(tokenizer)
    roles = text.roles
    instruction = (instruction or "").strip()
    ends = frozenset(text.stop_ids)
    if text.chat_template:
        return _chat_frame(text, instruction, ends)
    prompt = (() if roles.bos_id is None else (roles.bos_id,)) + tuple(text.encode(instruction) if instruction else ())
    header = tuple(text.separator_ids)
    if not header:
        raise BriskError("the tokenizer has no sep token and encodes '\\n' to nothing: no target header")
    return StreamFrame(prompt, header, (roles.eos_id,), roles.eos_id, ends, roles.pad_id, not instruction, header)


def _chat_frame(text: TextLayer, instruction: str, ends: frozenset[int]) -> StreamFrame:
    tok = text.tokenizer
    content = f"{instruction} {CHAT_MARK}" if instruction else CHAT_MARK
    messages = ([{"role": "system", "content": text.system_prompt}] if text.system_prompt else []) + [
        {"role": "user", "content": content}]
    turn = tok.apply_chat_template(messages, tokenize=False)
    with_header = tok.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    at = turn.find(CHAT_MARK)
    if at < 0 or not with_header.startswith(turn[:at + len(CHAT_MARK)]):
        raise BriskError("the chat template does not render the user's text verbatim; pass --no-chat-template")

    def ids(piece: str) -> tuple[int, ...]:
        return tuple(int(i) for i in tok(piece, add_special_tokens=False)["input_ids"]) if piece else ()

    prefix, closing = turn[:at], turn[at + len(CHAT_MARK):]
    generation = with_header[at + len(CHAT_MARK):]
    header_text = generation[len(closing):] if generation.startswith(closing) else ""
    if header_text.strip():
        source_end, header = ids(closing), ids(header_text)
        separator = ids(generation)
    else:  # no assistant header: the user turn's closing opens the target, eos ends the source
        source_end, header = (text.roles.eos_id,), ids(generation)
        separator = header
    if not source_end or not header:
        raise BriskError("the chat template has no text after the user's turn to mark where the reply starts; "
                         "pass --no-chat-template")
    return StreamFrame(ids(prefix.rstrip(" ") if instruction else prefix), header, source_end, text.end_id, ends,
                       text.roles.pad_id, not instruction, separator)


def word_segments(tokenizer: object, words: Sequence[str], at_start: bool = True) -> list[list[int]]:
    """One id list per word through the text layer (`at_start=False`: the words continue earlier text).

    A word the tokenizer can only encode as its unknown token is refused (VocabularyError naming the word)."""
    text = as_text_layer(tokenizer)
    segments = text.word_segments(list(words), at_start)
    unk = text.roles.unk_id
    if unk is not None and not text.word_level:
        bad = [w for w, seg in zip(words, segments) if unk in seg]
        if bad:
            raise VocabularyError(f"the tokenizer cannot encode word(s) {bad[:3]!r} (they become its unknown token); "
                                  "remove or transliterate them")
    return segments


def token_words(tokenizer: object, ids: Sequence[int]) -> list[list[int]]:
    """Written target ids grouped into words as the text layer's WordDecoder groups them (specials alone)."""
    text: TextLayer = as_text_layer(tokenizer)
    if text.word_level:
        return [[int(i)] for i in ids]
    decoder, groups = text.decoder(), []
    for token in (int(i) for i in ids):
        decoder.feed(token)
        if text.is_special(token) or decoder.pending == [token] or not groups:
            groups.append([token])
        else:
            groups[-1].append(token)
    return groups


def build_layout(tokenizer, source_words: Sequence[str], target_words: Sequence[str] = (), *,
                 target_segments: Sequence[Sequence[int]] | None = None, instruction: str | None = None) -> StreamLayout:
    """The GPE layout of a source sentence and (for training) its target sentence (words, or id segments);
    `tokenizer` may be a TextLayer (its chat-template setting picks the frame)."""
    if not source_words:
        raise BriskError("the source stream is empty: pass at least one source word")
    frame = stream_frame(tokenizer, instruction)
    if target_segments is None:
        target_segments = word_segments(tokenizer, target_words) if len(target_words) else []
    source = [list(frame.prompt), *word_segments(tokenizer, source_words, frame.first_at_start),
              list(frame.source_end)]
    target = [list(frame.header), *[list(seg) for seg in target_segments], [frame.target_end]]
    return StreamLayout(source, target, next_segment_rows=True)


def streaming_visibility(layout: StreamLayout, k: int) -> torch.Tensor:
    """(L, L) bool: source causal and blind to target; target causal within itself and wait-k on the source."""
    s_len, t_len = len(layout.source_ids), len(layout.target_ids)
    total = s_len + t_len
    mask = torch.ones(total, total).tril().bool()  # causal over the layout
    seg = torch.tensor(layout.source_segment_of_tokens())  # (S,)
    sees = torch.tensor(layout.target_row_sees(k))  # (T,)
    mask[s_len:, :s_len] = seg[None, :] <= sees[:, None]  # (T, S) wait-k columns, shifted rows
    return mask


def position_ids(layout: StreamLayout, mode: PositionMode = "group", phi: int = 0, k: int | None = None) -> torch.Tensor:
    """(L,) positions: group (source 0.., target phi+0..), contiguous (0..L-1), or arrival order (needs k)."""
    s_len, t_len = len(layout.source_ids), len(layout.target_ids)
    if mode == "group":
        return torch.cat([torch.arange(s_len), phi + torch.arange(t_len)])
    if mode == "contiguous":
        return torch.arange(s_len + t_len)
    if mode == "arrival":
        if k is None:
            raise BriskError("arrival-order positions need the wait-k schedule: pass k")
        seg = layout.source_segment_of_tokens()
        keys = [(s, 0, i) for i, s in enumerate(seg)] + [(s, 1, i) for i, s in enumerate(layout.target_row_sees(k))]
        order = sorted(range(len(keys)), key=lambda i: keys[i])
        pos = torch.empty(len(keys), dtype=torch.long)
        pos[torch.tensor(order)] = torch.arange(len(keys))
        return pos
    raise BriskError(f"unknown position mode {mode!r}: choose one of {', '.join(POSITION_MODES)}")


def labels_of(layout: StreamLayout) -> list[int]:
    """Labels aligned with input_ids: target tokens after the header (words and end marker), -100 elsewhere."""
    s_len, header = len(layout.source_ids), len(layout.target[0])
    ids = layout.input_ids
    return [IGNORE] * (s_len + header) + ids[s_len + header:]


def padded_batch(layouts: Sequence[StreamLayout], pad_id: int, positions: Sequence[torch.Tensor]) -> dict[str, torch.Tensor]:
    """Right-padded input_ids, attention_mask, position_ids and labels (B, L) of layouts with their given positions."""
    length = max(len(x.input_ids) for x in layouts)
    batch = len(layouts)
    ids = torch.full((batch, length), pad_id, dtype=torch.long)
    mask = torch.zeros(batch, length, dtype=torch.long)
    pos = torch.zeros(batch, length, dtype=torch.long)
    labels = torch.full((batch, length), IGNORE, dtype=torch.long)
    for b, (layout, layout_pos) in enumerate(zip(layouts, positions)):
        n = len(layout.input_ids)
        ids[b, :n] = torch.tensor(layout.input_ids)
        mask[b, :n] = 1
        pos[b, :n] = layout_pos
        labels[b, :n] = torch.tensor(labels_of(layout))
    return {"input_ids": ids, "attention_mask": mask, "position_ids": pos, "labels": labels}


def padded_visibility(masks: Sequence[torch.Tensor], length: int) -> torch.Tensor:
    """Stack per-layout (n, n) visibilities into (B, L, L); padding rows see only themselves."""
    vis = torch.zeros(len(masks), length, length, dtype=torch.bool)
    for b, mask in enumerate(masks):
        n = mask.shape[0]
        vis[b, :n, :n] = mask
        vis[b, n:, n:] = torch.eye(length - n, dtype=torch.bool)
    return vis


def collate(layouts: Sequence[StreamLayout], ks: Sequence[int], pad_id: int, mode: PositionMode = "group",
            phi: int = 0) -> dict[str, torch.Tensor]:
    """Right-padded batch: input_ids, attention_mask, position_ids, labels (B, L) and visibility (B, L, L)."""
    if len(layouts) != len(ks):
        raise BriskError(f"{len(layouts)} layouts but {len(ks)} k values: pass one k per stream")
    batch = padded_batch(layouts, pad_id, [position_ids(x, mode, phi, k) for x, k in zip(layouts, ks)])
    length = batch["input_ids"].shape[1]
    batch["visibility"] = padded_visibility([streaming_visibility(x, k) for x, k in zip(layouts, ks)], length)
    return batch
