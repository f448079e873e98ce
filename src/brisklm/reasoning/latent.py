"""Latent chain of thought: pause tokens, Coconut continuous thoughts and stepwise internalization (iCoT-SI).

Each method starts from an explicit-CoT model and trains with `transformers.Trainer`; every curriculum stage
gets a fresh Trainer (a fresh AdamW), the optimiser reset of Coconut and iCoT-SI. A CoT is a list of steps
(word lists, each ending with the step marker) and a tail (`answer X`):
  pause        stage k: `<bos> Q <sep> <pause>*M steps[k:] tail <eos>`: M pause tokens after the input, no loss on
               them, and the first k steps dropped (the last stage is Goyal et al.'s pause format, no CoT at all).
  coconut      stage k: `<bos> Q <sep> <bot> <latent>*(c*min(k, n)) <eot> steps[k:] tail <eos>`. The input
               embedding of each `<latent>` slot is the model's last hidden state at the position before it (a
               continuous thought, fed back through the HF model's own `inputs_embeds`); loss on the remaining
               language tokens only.
  internalize  stage k: `<bos> Q <sep> cot[s_k:] tail <eos>`, s_k = min(k*delta, len(cot)) leading CoT tokens
               removed (plus, with `smoothing`, a random extra o ~ exp(-lambda*o), iCoT's removal smoothing).
"""

from __future__ import annotations

import math
import random
import tempfile
from dataclasses import dataclass
from typing import Any, Callable, Sequence

import torch
import torch.nn.functional as F
from transformers import Trainer

from brisklm.core.adapter import ModelAdapter
from brisklm.core.cache import KVCache
from brisklm.core.executor import execute
from brisklm.core.generate import generate, left_pad
from brisklm.errors import BriskError
from brisklm.core.plan import Plan
from brisklm.core.text import TextLayer, as_text_layer
from brisklm.zoo.textlm import IGNORE, PadCollator, TrainOptions, training_arguments

PAUSE, BOT, EOT, LATENT = "<pause>", "<bot>", "<eot>", "<latent>"
LATENT_TOKENS = (PAUSE, BOT, EOT, LATENT)
METHODS = ("pause", "coconut", "internalize")


@dataclass(frozen=True)
class CoT:
    """A prompt with its explicit reasoning: steps (word lists, each ending with the step marker) and the tail."""

    prompt: str
    steps: tuple[tuple[str, ...], ...]
    tail: tuple[str, ...]

    @property
    def cot_words(self) -> list[str]:
        """All step words in order (what internalization removes from the left)."""
        return [w for step in self.steps for w in step]


def split_cot(prompt: str, text: str, step_end: str = ";") -> CoT:
    """Split an explicit CoT `s1 ; s2 ; ... tail` at each `step_end` word; the words after the last one are the tail."""
    steps, current = [], []
    for word in text.split():
        current.append(word)
        if word == step_end:
            steps.append(tuple(current))
            current = []
    if not current:
        raise BriskError(f"the CoT {text!r} has no answer after its last {step_end!r}; the tail must be non-empty")
    return CoT(prompt, tuple(steps), tuple(current))


def cot_of_example(example: Any) -> CoT:
    """The CoT of an example: a data line's `steps` (each step's words) and answer, else the minimal CoT of a
    cot_arithmetic example (meta['minimal_cot']), else its completion split at `;`."""
    steps = getattr(example, "steps", None)
    if steps:
        return CoT(example.prompt, tuple(tuple(step.split()) for step in steps), tuple(example.answer.split()))
    meta = getattr(example, "meta", None) or {}
    return split_cot(example.prompt, meta.get("minimal_cot", example.completion))


def raw_tokenizer(tokenizer):
    """The transformers tokenizer behind a TextLayer (or the tokenizer itself)."""
    return getattr(tokenizer, "tokenizer", tokenizer) if isinstance(tokenizer, TextLayer) else tokenizer


def add_latent_tokens(model, tokenizer):
    """Add `<pause> <bot> <eot> <latent>` to the tokenizer as special tokens (if missing) and resize the model's
    embeddings (input and output) when the tokenizer outgrew them; both survive save_pretrained + reload."""
    tok = raw_tokenizer(tokenizer)
    missing = [t for t in LATENT_TOKENS if t not in tok.get_vocab()]
    if missing:
        tok.add_tokens(missing, special_tokens=True)
    if model.get_input_embeddings().num_embeddings < len(tok):
        model.resize_token_embeddings(len(tok))
    return tok


def latent_id(tokenizer, name: str) -> int:
    """The id of one latent special token; a one-line error when it was never added."""
    tok = raw_tokenizer(tokenizer)
    if name not in tok.get_vocab():
        raise BriskError(f"the tokenizer has no {name} token: train with brisk reason latent (it adds "
                         f"{' '.join(LATENT_TOKENS)}) or call add_latent_tokens(model, tokenizer)")
    return int(tok.convert_tokens_to_ids(name))


def _sequence(tokenizer, cot: CoT, forced: Sequence[str], supervised: Sequence[str]) -> dict[str, list[int]]:
    """`prompt frame, forced special tokens, supervised words, end` with loss only on `supervised` and the end.

    The prompt frame is the text layer's (chat template or `[bos] prompt [sep]`); forced latent tokens are put in
    as ids (never through text, so no subword tokenizer inserts a space token between them); the supervised words
    start a new segment after them.
    """
    text = as_text_layer(tokenizer)
    head = text.prompt_ids(cot.prompt) + [latent_id(tokenizer, name) for name in forced]
    tail = (text.encode(list(supervised)) if supervised else []) + [text.end_id]
    return {"input_ids": head + tail, "labels": [IGNORE] * len(head) + tail}


def explicit_features(tokenizer, cot: CoT) -> dict[str, list[int]]:
    """The explicit CoT: every step and the tail supervised (stage 0 of every method)."""
    return _sequence(tokenizer, cot, (), cot.cot_words + list(cot.tail))


def pause_features(tokenizer, cot: CoT, pauses: int, stage: int | None = None) -> dict[str, list[int]]:
    """`pauses` <pause> tokens right after the prompt (no loss on them), then the steps after the first `stage`.

    stage=None drops every step (the pause-token format with no explicit CoT).
    """
    if pauses < 0:
        raise BriskError(f"--pauses must be >= 0, got {pauses}")
    dropped = len(cot.steps) if stage is None else min(max(stage, 0), len(cot.steps))
    rest = [w for step in cot.steps[dropped:] for w in step]
    return _sequence(tokenizer, cot, [PAUSE] * pauses, rest + list(cot.tail))


def coconut_latents(n_steps: int, stage: int, thoughts: int) -> int:
    """Continuous thoughts at a stage: c per replaced step, and stage k replaces the first min(k, n) steps."""
    return thoughts * min(max(stage, 0), n_steps)


def coconut_features(tokenizer, cot: CoT, stage: int, thoughts: int = 1) -> dict[str, list[int]]:
    """Stage k: the first k steps become c*k `<latent>` slots between `<bot>` and `<eot>`; the rest stays language."""
    replaced = min(stage, len(cot.steps))
    rest = [w for step in cot.steps[replaced:] for w in step]
    forced = [BOT] + [LATENT] * coconut_latents(len(cot.steps), stage, thoughts) + [EOT]
    return _sequence(tokenizer, cot, forced, rest + list(cot.tail))


def removed_tokens(stage: int, delta: int, n_cot: int) -> int:
    """Leading CoT tokens removed at a stage of stepwise internalization: min(stage * delta, n_cot)."""
    return min(max(stage, 0) * delta, n_cot)


def smoothed_offset(rng: random.Random, smoothing: float | None, limit: int) -> int:
    """iCoT's removal smoothing: an extra o in 0..limit with P(o) proportional to exp(-lambda*o); 0 when off."""
    if smoothing is None or limit <= 0:
        return 0
    weights = [math.exp(-smoothing * o) for o in range(limit + 1)]
    return rng.choices(range(limit + 1), weights=weights)[0]


def internalize_features(tokenizer, cot: CoT, removed: int) -> dict[str, list[int]]:
    """The CoT without its first `removed` tokens (all of it when removed >= its length), then the tail."""
    words = cot.cot_words
    return _sequence(tokenizer, cot, (), words[min(removed, len(words)):] + list(cot.tail))


def coconut_forward(model, input_ids: torch.Tensor, attention_mask: torch.Tensor | None,
                    latent_id: int) -> torch.Tensor:
    """Logits (B, T, V) where each `<latent>` slot's input embedding is the last hidden state one position earlier.

    Latent slots are filled left to right, one forward pass each (only up to the slot being filled; causal
    attention makes the prefix exact), then one pass over the whole sequence: #latents + 1 passes in all.
    Gradients flow through every continuous thought.
    """
    if attention_mask is None:
        attention_mask = torch.ones_like(input_ids)
    embeds = model.get_input_embeddings()(input_ids)  # (B, T, D)
    latent = input_ids == latent_id
    if bool(latent[:, 0].any()):
        raise BriskError("a <latent> slot cannot be the first token: it needs a hidden state before it")
    order = latent.long().cumsum(1) * latent  # 1-based index of each slot within its row, 0 elsewhere
    for p in range(1, int(order.max()) + 1 if latent.any() else 1):
        rows, cols = (order == p).nonzero(as_tuple=True)
        upto = int(cols.max())  # the hidden states at cols - 1 need positions [0, upto)
        hidden = model.base_model(inputs_embeds=embeds[:, :upto],
                                  attention_mask=attention_mask[:, :upto]).last_hidden_state  # (B, upto, D)
        embeds = embeds.index_put((rows, cols), hidden[rows, cols - 1])
    return model(inputs_embeds=embeds, attention_mask=attention_mask).logits


def masked_nll(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Token-mean next-token cross-entropy: logits (B, T, V) predict labels (B, T) shifted by one."""
    return F.cross_entropy(logits[:, :-1].transpose(1, 2).float(), labels[:, 1:], ignore_index=IGNORE)


class CoconutTrainer(Trainer):
    """A Trainer whose forward fills `<latent>` slots with continuous thoughts (`coconut_forward`)."""

    def __init__(self, *args: Any, latent_id: int | None = None, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        if latent_id is None:
            raise BriskError("CoconutTrainer needs latent_id=<the id of the <latent> token>")
        self.latent_id = latent_id

    def compute_loss(self, model, inputs, return_outputs: bool = False, num_items_in_batch=None):
        logits = coconut_forward(model, inputs["input_ids"], inputs["attention_mask"], self.latent_id)
        loss = masked_nll(logits, inputs["labels"])
        return (loss, {"logits": logits}) if return_outputs else loss


@dataclass
class LatentConfig:
    """One latent-CoT run: method, curriculum stages and the Trainer settings of each stage."""

    method: str = "coconut"
    stages: int = 3  # pause/coconut: steps replaced at the last stage; internalize: removal stages
    steps_per_stage: int = 150
    batch_size: int = 64
    learning_rate: float = 1e-3
    pauses: int = 6  # M, pause method
    thoughts: int = 1  # c, continuous thoughts per replaced step (coconut)
    remove_per_stage: int = 6  # delta, CoT tokens removed per stage (internalize)
    smoothing: float | None = None  # lambda of iCoT removal smoothing; None = off
    seed: int = 0

    def check(self) -> None:
        """Reject settings that cannot run, naming the fix."""
        if self.method not in METHODS:
            raise BriskError(f"unknown --method {self.method!r}: use one of {', '.join(METHODS)}")
        if self.stages < 1 or self.steps_per_stage < 1 or self.batch_size < 1:
            raise BriskError("--stages, --steps-per-stage and the batch size must be >= 1")
        if self.pauses < 0 or self.thoughts < 1 or self.remove_per_stage < 1:
            raise BriskError("need --pauses >= 0, --thoughts >= 1 and --remove-per-stage >= 1")
        if self.smoothing is not None and self.smoothing < 0:
            raise BriskError(f"--smoothing (lambda) must be >= 0, got {self.smoothing}")

    def stage_list(self) -> list[int]:
        """Stages to train, in order (stage 0 is the explicit-CoT starting point)."""
        return list(range(1, self.stages + 1))


def stage_features(tokenizer, cots: Sequence[CoT], config: LatentConfig, stage: int,
                   rng: random.Random | None = None) -> list[dict[str, list[int]]]:
    """Training sequences of one stage of `config.method`."""
    if config.method == "pause":
        return [pause_features(tokenizer, c, config.pauses, stage) for c in cots]
    if config.method == "coconut":
        return [coconut_features(tokenizer, c, stage, config.thoughts) for c in cots]
    rng = rng or random.Random(config.seed)
    out = []
    for c in cots:
        n = len(c.cot_words)
        base = removed_tokens(stage, config.remove_per_stage, n)
        out.append(internalize_features(tokenizer, c, base + smoothed_offset(rng, config.smoothing, n - base)))
    return out


def train_stage(model, tokenizer, features: list[dict], steps: int, batch_size: int, learning_rate: float,
                seed: int = 0, trainer_cls: type[Trainer] = Trainer, **trainer_kwargs: Any) -> float:
    """Fit one stage with a fresh transformers.Trainer (fresh AdamW, cosine schedule); returns the training loss."""
    options = TrainOptions(steps=steps, batch_size=batch_size, learning_rate=learning_rate, seed=seed,
                           log_every=max(steps, 1))
    with tempfile.TemporaryDirectory() as tmp:
        args = training_arguments(options, tmp)
        args.disable_tqdm = True
        trainer = trainer_cls(model=model, args=args, train_dataset=features,
                              data_collator=PadCollator(as_text_layer(tokenizer).roles.pad_id), **trainer_kwargs)
        result = trainer.train()
    model.eval()
    return float(result.training_loss)


def train_explicit(model, tokenizer, examples: Sequence[Any], steps: int, batch_size: int = 64,
                   learning_rate: float = 1e-3, seed: int = 0) -> float:
    """Stage 0: fine-tune on the explicit minimal CoT (the explicit baseline every latent method starts from)."""
    cots = [cot_of_example(e) for e in examples]
    return train_stage(model, tokenizer, [explicit_features(tokenizer, c) for c in cots], steps, batch_size,
                       learning_rate, seed)


def train_latent(model, tokenizer, examples: Sequence[Any], config: LatentConfig,
                 on_stage: Callable[[int, dict], None] | None = None) -> list[dict]:
    """Train `model` in place through the method's stages (adds the latent tokens first); one log per stage."""
    config.check()
    if not examples:
        raise BriskError("latent CoT training needs at least one example")
    add_latent_tokens(model, tokenizer)
    cots = [cot_of_example(e) for e in examples]
    rng = random.Random(config.seed)
    latent = latent_id(tokenizer, LATENT)
    logs = []
    for stage in config.stage_list():
        features = stage_features(tokenizer, cots, config, stage, rng)
        extra = dict(trainer_cls=CoconutTrainer, latent_id=latent) if config.method == "coconut" else {}
        loss = train_stage(model, tokenizer, features, config.steps_per_stage, config.batch_size,
                           config.learning_rate, config.seed + stage, **extra)
        record = {"stage": stage, "loss": loss,
                  "mean_sequence_tokens": sum(len(f["input_ids"]) for f in features) / len(features)}
        logs.append(record)
        if on_stage:
            on_stage(stage, record)
    return logs


def _decode(tokenizer, row: list[int]) -> tuple[str, int]:
    """Text up to the first eos id and the generated-token count (including that eos when present)."""
    text = as_text_layer(tokenizer)
    row, finished = text.cut_at_eos(row)
    return text.decode(row).strip(), len(row) + int(finished)


@torch.no_grad()
def greedy_after(model, tokenizer, heads: Sequence[list[int]], max_new_tokens: int,
                 batch_size: int = 128) -> list[tuple[str, int]]:
    """Greedy continuations of given id prefixes (left-padded batches, KV cache): (text, generated tokens)."""
    model.eval()
    text = as_text_layer(tokenizer)
    pad = text.roles.pad_id
    out = []
    for start in range(0, len(heads), batch_size):
        ids, mask = left_pad(heads[start:start + batch_size], pad, model.device)
        generated = generate(model, ids, mask, max_new_tokens=max_new_tokens, do_sample=False,
                             eos_token_id=list(text.stop_ids), pad_token_id=pad)[:, ids.shape[1]:]
        out.extend(_decode(tokenizer, row) for row in generated.tolist())
    return out


@torch.no_grad()
def coconut_generate(model, tokenizer, prompts: Sequence[str], latents: Sequence[int], max_new_tokens: int,
                     batch_size: int = 128) -> list[tuple[str, int]]:
    """`prompt frame <bot>`, then latents[i] continuous thoughts, `<eot>`, then greedy tokens (KV cache).

    The prompt and each thought (the normed last hidden state fed back as the next input embedding) run through
    the executor into one KVCache; `brisklm.generate` continues from it with `<eot>`. Prompts of any lengths are
    batched (left padding, positions from the mask as HF counts them) in groups of equal thought counts; returns
    (text, generated tokens) per prompt.
    """
    model.eval()
    adapter = ModelAdapter.from_model(model)
    text = as_text_layer(tokenizer)
    bot, eot = latent_id(tokenizer, BOT), latent_id(tokenizer, EOT)
    pad = text.roles.pad_id
    heads = [text.prompt_ids(p) + [bot] for p in prompts]
    groups: dict[int, list[int]] = {}
    for i in range(len(heads)):
        groups.setdefault(latents[i], []).append(i)
    out: list[tuple[str, int] | None] = [None] * len(prompts)
    device = adapter.embed_tokens.weight.device
    for n_latent, members in groups.items():
        for start in range(0, len(members), batch_size):
            idx = members[start:start + batch_size]
            cache = KVCache(adapter.num_layers)
            ids, mask = left_pad([heads[i] for i in idx], pad, device)
            positions = (mask.long().cumsum(dim=1) - 1).masked_fill(mask == 0, 1)  # HF's left-padding rule
            state = execute(model, ids, plan=Plan(position_ids=positions), cache=cache, attention_mask=mask,
                            logits_rows="none").last_hidden[:, -1:]
            after = positions[:, -1:]
            for _ in range(n_latent):  # a continuous thought: the last hidden state (after the final norm)
                after = after + 1
                state = execute(model, inputs_embeds=adapter.final_norm(state), plan=Plan(position_ids=after),
                                cache=cache, logits_rows="none").last_hidden
            first = torch.full((len(idx), 1), eot, dtype=torch.long, device=device)
            rows = generate(model, first, cache=cache, max_new_tokens=max_new_tokens, do_sample=False,
                            eos_token_id=list(text.stop_ids), pad_token_id=pad)[:, 1:]
            for i, row in zip(idx, rows.tolist()):
                out[i] = _decode(tokenizer, row)
    return out  # type: ignore[return-value]


def latent_heads(tokenizer, cots: Sequence[CoT], config: LatentConfig, stage: int) -> list[list[int]]:
    """The forced prefix at inference for pause/internalize: the prompt frame (+ M pauses, as ids)."""
    text = as_text_layer(tokenizer)
    forced = [latent_id(tokenizer, PAUSE)] * config.pauses if config.method == "pause" else []
    return [text.prompt_ids(c.prompt) + forced for c in cots]


def evaluate_latent(model, tokenizer, examples: Sequence[Any], verifier: Callable[[str, Any], bool],
                    config: LatentConfig, stage: int | None = None, max_new_tokens: int = 48) -> dict[str, Any]:
    """Greedy accuracy, generated language tokens and latent positions (pauses or thoughts) at a stage."""
    config.check()
    stage = config.stage_list()[-1] if stage is None else stage
    cots = [cot_of_example(e) for e in examples]
    if config.method == "coconut":
        latents = [coconut_latents(len(c.steps), stage, config.thoughts) for c in cots]
        results = coconut_generate(model, tokenizer, [c.prompt for c in cots], latents, max_new_tokens)
        positions = [n + 2 for n in latents]  # the thoughts and the forced <bot> <eot>
    else:
        results = greedy_after(model, tokenizer, latent_heads(tokenizer, cots, config, stage), max_new_tokens)
        positions = [config.pauses if config.method == "pause" else 0] * len(cots)
    ok = [bool(verifier(text, e)) for (text, _), e in zip(results, examples)]
    return {"accuracy": sum(ok) / len(ok), "mean_generated_tokens": sum(n for _, n in results) / len(results),
            "mean_latent_positions": sum(positions) / len(positions), "stage": stage, "samples": len(ok),
            "example": results[0][0]}


def evaluate_explicit(model, tokenizer, examples: Sequence[Any], verifier: Callable[[str, Any], bool],
                      max_new_tokens: int = 120) -> dict[str, Any]:
    """Greedy accuracy and generated tokens of an explicit-CoT model (the comparison for the latent methods)."""
    text = as_text_layer(tokenizer)
    results = greedy_after(model, tokenizer, [text.prompt_ids(e.prompt) for e in examples], max_new_tokens)
    ok = [bool(verifier(text, e)) for (text, _), e in zip(results, examples)]
    return {"accuracy": sum(ok) / len(ok), "mean_generated_tokens": sum(n for _, n in results) / len(results),
            "mean_latent_positions": 0.0, "samples": len(ok), "example": results[0][0]}
