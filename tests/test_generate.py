"""brisklm.generate: the one generation loop over the executor equals HF `model.generate` where it must."""

import pytest
import torch
from transformers import DynamicCache, LogitsProcessor, LogitsProcessorList

import brisklm
from brisklm.core import KVCache, LayerStep, ModelAdapter, Plan, execute
from brisklm.errors import BriskError, UnsupportedModelError
from brisklm.pruning.kv import ReuseKVCache
from brisklm.pruning.sparse import RoutingRecord, sparse_forward, sparse_generate

from conftest import FAMILIES, tiny_model
from test_pruning_sparse import random_routers

PAD = 0


def model_of(family: str):
    """The tiny random model of a family, or a skip naming why the adapter refuses it."""
    model = tiny_model(family)
    try:
        ModelAdapter.from_model(model)
    except UnsupportedModelError as error:
        pytest.skip(f"ModelAdapter refuses {family}: {error}")
    return model


def left_padded(lengths=(9, 5, 7), seed=1):
    """Random prompts of different lengths, left-padded with PAD: ids and mask (B, T)."""
    g = torch.Generator().manual_seed(seed)
    width = max(lengths)
    ids = torch.full((len(lengths), width), PAD, dtype=torch.long)
    mask = torch.zeros_like(ids)
    for row, n in enumerate(lengths):
        ids[row, width - n:] = torch.randint(3, 97, (n,), generator=g)
        mask[row, width - n:] = 1
    return ids, mask


def hf(model, ids, mask, **kw):
    return model.generate(input_ids=ids, attention_mask=mask, **kw)


@torch.no_grad()
@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_greedy_equals_hf_generate(family):
    model = model_of(family)
    ids, mask = left_padded()
    kw = dict(max_new_tokens=14, do_sample=False, pad_token_id=PAD, eos_token_id=None)
    single = ids[1:2, -5:]
    assert torch.equal(brisklm.generate(model, single, **kw), hf(model, single, torch.ones_like(single), **kw))
    ours = brisklm.generate(model, ids, mask, **kw)
    assert ours.shape == (3, ids.shape[1] + 14)
    assert torch.equal(ours, hf(model, ids, mask, **kw))
    # each padded row decodes as it would alone (padding is invisible, positions count real tokens)
    alone = brisklm.generate(model, ids[1:2, -5:], **kw)
    assert torch.equal(ours[1, -14:], alone[0, -14:])


@torch.no_grad()
def test_several_eos_ids_stop_rows_and_pad_after():
    model = model_of("llama")
    ids, mask = left_padded()
    free = brisklm.generate(model, ids, mask, max_new_tokens=12, do_sample=False, eos_token_id=None)[:, ids.shape[1]:]
    # two eos ids that greedy decoding really emits: row 0's 3rd token and row 2's 5th token
    eos = [int(free[0, 2]), int(free[2, 4])]
    kw = dict(max_new_tokens=12, do_sample=False, eos_token_id=eos, pad_token_id=PAD)
    ours = brisklm.generate(model, ids, mask, **kw)
    assert torch.equal(ours, hf(model, ids, mask, **kw))
    new = ours[:, ids.shape[1]:]
    stopped = 0
    for row in new.tolist():
        hits = [i for i, t in enumerate(row) if t in eos]
        if hits:
            stopped += 1
            assert all(t == PAD for t in row[hits[0] + 1:])  # finished rows get pad afterwards
    assert stopped >= 2
    # without a pad id, pad falls back to the first eos id (as in HF)
    no_pad = brisklm.generate(model, ids, mask, max_new_tokens=12, do_sample=False, eos_token_id=eos, pad_token_id=None)
    assert torch.equal(no_pad, hf(model, ids, mask, max_new_tokens=12, do_sample=False, eos_token_id=eos))


@torch.no_grad()
def test_max_length_and_generation_config_merging():
    from transformers import GenerationConfig

    model = model_of("qwen2")
    ids, mask = left_padded()
    ours = brisklm.generate(model, ids, mask, max_length=ids.shape[1] + 5, do_sample=False, eos_token_id=None)
    assert ours.shape[1] == ids.shape[1] + 5
    config = GenerationConfig(max_new_tokens=6, do_sample=False, eos_token_id=None, pad_token_id=PAD)
    by_config = brisklm.generate(model, ids, mask, generation_config=config)
    assert by_config.shape[1] == ids.shape[1] + 6
    assert torch.equal(by_config[:, :ids.shape[1] + 5], ours)
    # keyword overrides win over the config
    assert brisklm.generate(model, ids, mask, generation_config=config, max_new_tokens=2).shape[1] == ids.shape[1] + 2


@torch.no_grad()
@pytest.mark.parametrize("family", ["llama", "mistral"])
def test_sampling_with_a_seed_equals_hf_sampling(family):
    model = model_of(family)
    ids, mask = left_padded()
    kw = dict(max_new_tokens=16, do_sample=True, temperature=0.8, top_k=20, top_p=0.9, repetition_penalty=1.3,
              pad_token_id=PAD, eos_token_id=None)
    torch.manual_seed(7)
    ours = brisklm.generate(model, ids, mask, **kw)
    torch.manual_seed(7)
    assert torch.equal(ours, hf(model, ids, mask, **kw))
    torch.manual_seed(8)
    assert not torch.equal(ours, brisklm.generate(model, ids, mask, **kw))  # the seed matters: it samples
    greedy = brisklm.generate(model, ids, mask, max_new_tokens=16, do_sample=False, eos_token_id=None)
    assert torch.equal(brisklm.generate(model, ids, mask, max_new_tokens=16, do_sample=True, top_k=1,
                                        eos_token_id=None), greedy)


class ForceToken(LogitsProcessor):
    """Only `token` may follow; records the lengths of the ids it was shown."""

    def __init__(self, token: int) -> None:
        self.token, self.lengths = token, []

    def __call__(self, input_ids, scores):
        self.lengths.append(input_ids.shape[1])
        out = torch.full_like(scores, float("-inf"))
        out[:, self.token] = 0.0
        return out


@torch.no_grad()
def test_user_logits_processor_is_applied():
    model = model_of("llama")
    ids, mask = left_padded()
    force = ForceToken(5)
    ours = brisklm.generate(model, ids, mask, max_new_tokens=4, do_sample=False, eos_token_id=None,
                            logits_processor=LogitsProcessorList([force]))
    assert (ours[:, ids.shape[1]:] == 5).all()
    assert force.lengths == [ids.shape[1] + k for k in range(4)]  # it sees the ids so far at every step
    assert torch.equal(ours, hf(model, ids, mask, max_new_tokens=4, do_sample=False, eos_token_id=None,
                                pad_token_id=PAD, logits_processor=LogitsProcessorList([ForceToken(5)])))


@torch.no_grad()
def test_plan_fn_is_called_for_prefill_and_every_step():
    model = model_of("llama")
    ids, mask = left_padded()
    calls = []

    def noop(step, so_far, cache):
        calls.append((step, so_far.shape[1], isinstance(cache, KVCache)))
        return Plan()

    kw = dict(max_new_tokens=6, do_sample=False, eos_token_id=None)
    dense = brisklm.generate(model, ids, mask, **kw)
    assert torch.equal(brisklm.generate(model, ids, mask, plan_fn=noop, **kw), dense)
    assert calls == [(k, ids.shape[1] + k, True) for k in range(6)]

    def skip_mlp_when_decoding(step, so_far, cache):
        if step == 0:
            return None
        off = torch.zeros(so_far.shape[0], 1, dtype=torch.bool)
        return Plan(steps=[LayerStep(mlp_rows=off)] * 3)

    skipped = brisklm.generate(model, ids, mask, plan_fn=skip_mlp_when_decoding, **kw)
    width = ids.shape[1]
    assert torch.equal(skipped[:, :width + 1], dense[:, :width + 1])  # the prefill is unchanged
    assert not torch.equal(skipped, dense)  # the decode-step plans were really used


@torch.no_grad()
def test_inputs_embeds_prefill_and_continuing_a_cache():
    model = model_of("qwen3")
    ids, mask = left_padded()
    kw = dict(max_new_tokens=8, do_sample=False, eos_token_id=None)
    full = brisklm.generate(model, ids, mask, **kw)
    embeds = model.get_input_embeddings()(ids)
    only_new = brisklm.generate(model, attention_mask=mask, inputs_embeds=embeds, **kw)
    assert torch.equal(only_new, full[:, ids.shape[1]:])  # embeds only: the new tokens, like HF
    # prefill the prompt but its last token into a cache, then continue with that token
    cache = KVCache(3)
    execute(model, ids[:, :-1], cache=cache, attention_mask=mask[:, :-1], logits_rows="none",
            plan=Plan(position_ids=(mask[:, :-1].cumsum(1) - 1).clamp(min=0)))
    cont = brisklm.generate(model, ids[:, -1:], cache=cache, **kw)
    assert torch.equal(cont[:, 1:], full[:, ids.shape[1]:])


@torch.no_grad()
@pytest.mark.parametrize("policy", ["full", "evict", "reuse"])
def test_sparse_generate_equals_recomputing_the_routed_prefix(policy):
    model = model_of("llama")
    routers = random_routers(model)
    ids = torch.randint(3, 97, (1, 8), generator=torch.Generator().manual_seed(2))
    records: list[RoutingRecord] = []
    out = sparse_generate(model, routers, ids, policy=policy, records=records, max_new_tokens=6, do_sample=False,
                          eos_token_id=None)
    assert len(records) == 6 and records[1].attn[0].shape == (1, 1)  # one routing record per forward
    assert 0 < sum(r.skip_rates()["total"] for r in records)  # the routers really skip
    seq = ids
    for _ in range(6):  # reference: the routed model over the whole sequence so far, no decoding cache
        cache = ReuseKVCache(3) if policy == "reuse" else KVCache(3)
        logits, _, _ = sparse_forward(model, routers, seq, policy=policy, cache=cache)
        seq = torch.cat([seq, logits[:, -1].argmax(-1, keepdim=True)], 1)
    assert torch.equal(out, seq)


def test_bad_input_raises_one_line_errors():
    model = model_of("llama")
    ids, mask = left_padded()
    right = torch.flip(mask, dims=[1])
    with pytest.raises(BriskError, match="left padding"):
        brisklm.generate(model, ids, right, max_new_tokens=2)
    with pytest.raises(BriskError, match="unknown generation option"):
        brisklm.generate(model, ids, mask, max_new_tokenz=2)
    with pytest.raises(BriskError, match="num_beams"):
        brisklm.generate(model, ids, mask, max_new_tokens=2, num_beams=2)
    with pytest.raises(BriskError, match="KVCache"):
        brisklm.generate(model, ids, mask, max_new_tokens=2, cache=DynamicCache())
    with pytest.raises(BriskError, match="max_new_tokens"):
        brisklm.generate(model, ids, mask, max_length=3)


def test_left_pad_puts_rows_at_the_right_edge():
    from brisklm.core.generate import left_pad

    ids, mask = left_pad([[5, 6, 7], [9]], pad_id=0)
    assert ids.tolist() == [[5, 6, 7], [0, 0, 9]] and mask.tolist() == [[1, 1, 1], [0, 0, 1]]
    assert ids.dtype == torch.long and mask.dtype == torch.long
