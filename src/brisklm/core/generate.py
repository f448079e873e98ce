"""The one generation loop: prefill, then token-by-token decoding through the layer-loop executor.

It honours a transformers `GenerationConfig` the way `model.generate` does (greedy or sampling with HF's own
logits processors and warpers, `max_new_tokens` / `max_length`, several eos ids with pad after a row finished,
left-padded batches with positions from the mask's cumsum), and lets a method set the plan of the prefill and of
every decode step (`plan_fn`), so every method that decodes uses this loop and any plan keeps its KV cache exact.
"""

from __future__ import annotations

import copy
import dataclasses
from typing import Callable, Sequence

import torch

from brisklm.core.adapter import ModelAdapter
from brisklm.core.cache import KVCache
from brisklm.core.executor import execute
from brisklm.core.plan import Plan
from brisklm.errors import BriskError

PlanFn = Callable[[int, torch.Tensor, KVCache], "Plan | None"]
"""plan_fn(step, input_ids_so_far, cache): the plan of the prefill (step 0) or of decode step k >= 1 (or None)."""

# GenerationConfig fields this loop does not implement, with the values that mean "off".
_UNSUPPORTED: dict[str, tuple] = {
    "num_beams": (None, 1), "num_return_sequences": (None, 1), "num_beam_groups": (None, 1),
    "penalty_alpha": (None,), "dola_layers": (None,), "constraints": (None,), "force_words_ids": (None,),
    "diversity_penalty": (None, 0.0), "stop_strings": (None,), "max_time": (None,), "guidance_scale": (None, 1.0),
    "watermarking_config": (None,), "return_dict_in_generate": (None, False), "prompt_lookup_num_tokens": (None,),
    "token_healing": (None, False), "use_mtp": (None, False),
}


def left_pad(rows: Sequence[Sequence[int]], pad_id: int, device=None) -> tuple[torch.Tensor, torch.Tensor]:
    """Prompts of different lengths as (B, T) left-padded ids and their 0/1 attention mask (what `generate`
    takes), filled on the host and moved to `device` once."""
    width = max(len(r) for r in rows)
    ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
    mask = torch.zeros_like(ids)
    for i, row in enumerate(rows):
        ids[i, width - len(row):] = torch.tensor(list(row), dtype=torch.long)
        mask[i, width - len(row):] = 1
    return ids.to(device), mask.to(device)


def resolve_generation_config(model, generation_config=None, **overrides):
    """The effective GenerationConfig, merged as HF does: argument > model.generation_config > HF defaults; then
    `overrides` (e.g. max_new_tokens=8) on top. Unknown override names raise a BriskError."""
    from transformers import GenerationConfig

    base = getattr(model, "generation_config", None)
    config = copy.deepcopy(generation_config) if generation_config is not None else GenerationConfig()
    if base is not None:
        config.update(**base.to_dict(), defaults_only=True, allow_custom_entries=True)
    config.update(**GenerationConfig._get_default_generation_params(), defaults_only=True)
    unused = config.update(**overrides)
    if unused:
        raise BriskError(f"unknown generation option(s) {', '.join(sorted(unused))}; pass GenerationConfig fields "
                         "such as max_new_tokens, do_sample, temperature, top_k, top_p, eos_token_id, pad_token_id")
    for name, off in _UNSUPPORTED.items():
        if getattr(config, name, None) not in off:
            raise BriskError(f"generation option {name}={getattr(config, name)!r} is not supported by "
                             "brisklm.generate (greedy and sampling only); unset it or use model.generate")
    return config


def eos_ids(config) -> list[int]:
    """The config's end-of-sequence ids as a list (an int, a list, or none)."""
    eos = config.eos_token_id
    if eos is None:
        return []
    return [int(e) for e in (eos if isinstance(eos, (list, tuple)) else [eos])]


def logits_processors(config, prompt_length: int, attention_mask: torch.Tensor | None, user=None,
                      device: torch.device | str = "cpu"):
    """HF's own processors (and, when sampling, warpers) for `config`, in the order `model.generate` applies them;
    the user's LogitsProcessorList comes after the processors and before the warpers, as in HF."""
    from transformers.generation import logits_process as lp

    c, eos, out = config, eos_ids(config), lp.LogitsProcessorList()
    if c.sequence_bias is not None:
        out.append(lp.SequenceBiasLogitsProcessor(sequence_bias=c.sequence_bias))
    if c.repetition_penalty is not None and c.repetition_penalty != 1.0:
        pads = (attention_mask != 0).int().argmax(dim=1) if attention_mask is not None else None
        out.append(lp.RepetitionPenaltyLogitsProcessor(c.repetition_penalty, prompt_ignore_length=pads))
    if c.no_repeat_ngram_size:
        out.append(lp.NoRepeatNGramLogitsProcessor(c.no_repeat_ngram_size))
    if c.bad_words_ids is not None:
        out.append(lp.NoBadWordsLogitsProcessor(c.bad_words_ids, eos or None))
    if c.min_length and eos:
        out.append(lp.MinLengthLogitsProcessor(c.min_length, eos, device=device))
    if c.min_new_tokens and eos:
        out.append(lp.MinNewTokensLengthLogitsProcessor(prompt_length, c.min_new_tokens, eos, device=device))
    if c.forced_bos_token_id is not None:
        out.append(lp.ForcedBOSTokenLogitsProcessor(c.forced_bos_token_id))
    if c.forced_eos_token_id is not None:
        out.append(lp.ForcedEOSTokenLogitsProcessor(c.max_length, c.forced_eos_token_id, device=device))
    if c.remove_invalid_values:
        out.append(lp.InfNanRemoveLogitsProcessor())
    if c.exponential_decay_length_penalty is not None:
        out.append(lp.ExponentialDecayLengthPenalty(c.exponential_decay_length_penalty, eos, prompt_length))
    if c.suppress_tokens is not None:
        out.append(lp.SuppressTokensLogitsProcessor(c.suppress_tokens, device=device))
    if c.begin_suppress_tokens is not None:
        out.append(lp.SuppressTokensAtBeginLogitsProcessor(c.begin_suppress_tokens, prompt_length, device=device))
    out.extend(user or [])
    if c.do_sample:
        if c.temperature is not None and c.temperature != 1.0:
            out.append(lp.TemperatureLogitsWarper(c.temperature))
        if c.top_h is not None:
            out.append(lp.TopHLogitsWarper(top_h=c.top_h))
        if c.top_k:
            out.append(lp.TopKLogitsWarper(top_k=c.top_k, min_tokens_to_keep=1))
        if c.top_p is not None and c.top_p < 1.0:
            out.append(lp.TopPLogitsWarper(top_p=c.top_p, min_tokens_to_keep=1))
        if c.min_p is not None:
            out.append(lp.MinPLogitsWarper(min_p=c.min_p, min_tokens_to_keep=1))
        if c.typical_p is not None and c.typical_p < 1.0:
            out.append(lp.TypicalLogitsWarper(mass=c.typical_p, min_tokens_to_keep=1))
        if c.epsilon_cutoff is not None and 0.0 < c.epsilon_cutoff < 1.0:
            out.append(lp.EpsilonLogitsWarper(epsilon=c.epsilon_cutoff, min_tokens_to_keep=1))
        if c.eta_cutoff is not None and 0.0 < c.eta_cutoff < 1.0:
            out.append(lp.EtaLogitsWarper(epsilon=c.eta_cutoff, min_tokens_to_keep=1, device=device))
    if c.renormalize_logits:
        out.append(lp.LogitNormalization())
    return out


def _after_cache(cache: KVCache, batch: int, device) -> tuple[torch.Tensor, torch.Tensor]:
    """(B, 1) next rotary position (after the valid keys) and next arrival order after what `cache` holds."""
    position = torch.zeros(batch, 1, dtype=torch.long, device=device)
    order = position.clone()
    for layer in cache.layers:
        meta = layer.meta
        if layer.keys is None or not meta or not meta["order"].numel():
            continue
        order = torch.maximum(order, meta["order"].max(dim=1, keepdim=True).values + 1)
        last = meta["position"].masked_fill(~meta["valid"], -1).max(dim=1, keepdim=True).values + 1
        position = torch.maximum(position, last)
    return position, order


def _complete(plan: Plan | None, positions: torch.Tensor, order: torch.Tensor) -> Plan:
    """The step's plan with the loop's positions and arrival order wherever the method left them unset."""
    plan = Plan() if plan is None else plan
    if plan.position_ids is not None and plan.order is not None:
        return plan
    return dataclasses.replace(plan, position_ids=positions if plan.position_ids is None else plan.position_ids,
                               order=order if plan.order is None else plan.order)


@torch.no_grad()
def generate(
    model,
    input_ids: torch.Tensor | None = None,
    attention_mask: torch.Tensor | None = None,
    *,
    inputs_embeds: torch.Tensor | None = None,
    plan_fn: PlanFn | None = None,
    generation_config=None,
    logits_processor=None,
    cache: KVCache | None = None,
    context: Sequence[KVCache] = (),
    **overrides,
) -> torch.LongTensor:
    """Generate like `model.generate` through the executor; returns (B, T + new) ids ((B, new) with embeds only).

    input_ids (B, T): the prompt (left-padded when rows differ); inputs_embeds (B, T', D): rows the prefill runs
    instead (input_ids, if also given, are what processors see and what is returned). attention_mask (B, T'):
    1 = real row of the prefill. plan_fn(step, ids_so_far, cache) -> Plan | None sets the plan of the prefill
    (step 0) and of decode step k (feeding ids_so_far[:, -1:]); positions/order it leaves None come from the
    loop (mask cumsum, as HF). cache: a KVCache to fill (may already hold a prefix: positions continue after
    it); context: read-only caches every step attends to (e.g. ViCA's visual K/V). overrides: GenerationConfig
    fields (max_new_tokens=..., do_sample=..., eos_token_id=[...]).
    """
    adapter = ModelAdapter.from_model(model)
    config = resolve_generation_config(adapter.model, generation_config, **overrides)
    rows_in = inputs_embeds if inputs_embeds is not None else input_ids
    if rows_in is None:
        raise BriskError("generate needs input_ids (batch, tokens) or inputs_embeds (batch, tokens, hidden)")
    if input_ids is not None and (input_ids.dim() != 2 or input_ids.shape[0] != rows_in.shape[0]):
        raise BriskError(f"input_ids has shape {tuple(input_ids.shape)}; expected (batch={rows_in.shape[0]}, tokens)")
    batch, length = rows_in.shape[:2]
    device = rows_in.device
    ids = input_ids if input_ids is not None else torch.empty(batch, 0, dtype=torch.long, device=device)
    mask = (torch.ones(batch, length, dtype=torch.bool, device=device) if attention_mask is None
            else attention_mask.to(device=device).bool())
    if tuple(mask.shape) != (batch, length):
        raise BriskError(f"attention_mask has shape {tuple(mask.shape)}; the prefill rows are ({batch}, {length})")
    if length and not bool(mask[:, -1].all()):
        raise BriskError("the batch is right-padded; decoder-only generation needs left padding "
                         "(pad before the prompt, e.g. tokenizer.padding_side = 'left')")
    cache = KVCache(adapter.num_layers) if cache is None else cache
    if not isinstance(cache, KVCache):
        raise BriskError("generate needs a brisklm KVCache (it keeps key metadata for any plan); "
                         f"got {type(cache).__name__}")

    max_new = config.max_new_tokens if config.max_new_tokens is not None else config.max_length - ids.shape[1]
    if max_new < 1:
        raise BriskError(f"nothing to generate: the prompt has {ids.shape[1]} tokens and max_length is "
                         f"{config.max_length}; pass max_new_tokens=N")
    eos = eos_ids(config)
    pad = config.pad_token_id if config.pad_token_id is not None else (eos[0] if eos else None)
    eos_t = torch.tensor(eos, dtype=torch.long, device=device) if eos else None
    processors = logits_processors(config, ids.shape[1], attention_mask, logits_processor, device)

    start_pos, start_order = _after_cache(cache, batch, device)
    positions = (start_pos + mask.long().cumsum(dim=1) - 1).masked_fill(~mask, 1)  # HF's left-padding rule
    order = start_order + torch.arange(length, device=device)[None, :]
    unfinished = torch.ones(batch, dtype=torch.bool, device=device)
    feed_ids, feed_embeds, feed_mask = input_ids if inputs_embeds is None else None, inputs_embeds, mask
    for step in range(max_new):
        plan = _complete(plan_fn(step, ids, cache) if plan_fn is not None else None, positions, order)
        out = execute(model, feed_ids, inputs_embeds=feed_embeds, plan=plan, cache=cache, context=context,
                      attention_mask=feed_mask, logits_rows="last")
        scores = processors(ids, out.logits[:, -1].to(dtype=torch.float32, copy=True))
        if config.do_sample:
            token = torch.multinomial(torch.softmax(scores, dim=-1), num_samples=1).squeeze(1)
        else:
            token = scores.argmax(dim=-1)
        if eos_t is not None:
            token = torch.where(unfinished, token, torch.full_like(token, pad))
        ids = torch.cat([ids, token[:, None]], dim=1)
        if eos_t is not None:
            unfinished &= ~torch.isin(token, eos_t)
            if not bool(unfinished.any()):
                break
        positions, order = plan.position_ids[:, -1:] + 1, plan.order[:, -1:] + 1
        feed_ids, feed_embeds, feed_mask = token[:, None], None, None
    return ids
