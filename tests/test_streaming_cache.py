"""KVCache appends grow a preallocated buffer geometrically: same tensors as torch.cat, no whole-cache copy per token."""

import torch

from brisklm.core.cache import GROW_AFTER, KVCache, cat_meta


def _step(t: int, n: int = 1, batch: int = 2, heads: int = 2, dim: int = 4):
    g = torch.Generator().manual_seed(t)
    keys, values = torch.randn(batch, heads, n, dim, generator=g), torch.randn(batch, heads, n, dim, generator=g)
    meta = {"order": torch.arange(t, t + n).repeat(batch, 1), "position": torch.arange(t, t + n).repeat(batch, 1),
            "valid": torch.rand(batch, n, generator=g) > 0.2}
    return keys, values, meta


def test_appends_equal_torch_cat_and_survive_outside_edits():
    cache = KVCache(2)
    ref_k, ref_v, ref_m = [None, None], [None, None], [{}, {}]
    t = 0
    for step in range(2 * GROW_AFTER):
        n = 1 if step % 7 else 3  # mostly one token, sometimes a segment
        for layer in range(2):
            keys, values, meta = _step(100 * layer + t, n)
            got_k, got_v, got_m = cache.update(keys, values, meta, layer)
            ref_k[layer] = keys if ref_k[layer] is None else torch.cat([ref_k[layer], keys], 2)
            ref_v[layer] = values if ref_v[layer] is None else torch.cat([ref_v[layer], values], 2)
            ref_m[layer] = cat_meta([ref_m[layer], meta])
            assert torch.equal(got_k, ref_k[layer]) and torch.equal(got_v, ref_v[layer])
            assert got_m.keys() == ref_m[layer].keys()
            assert all(torch.equal(got_m[name], ref_m[layer][name]) for name in got_m)
        t += n
        if step in (40, GROW_AFTER + 40):  # the streaming engine retracts a key by replacing a metadata tensor
            for layer, held in enumerate(cache.layers):
                valid = held.meta["valid"].clone()
                valid[0, -1] = False
                held.meta["valid"] = valid
                ref_m[layer]["valid"] = valid.clone()
    assert cache.get_seq_length(1) == t > 2 * GROW_AFTER
    assert cache.layers[0].capacity > cache.layers[0].length  # the last appends went into a grown buffer


def test_growth_is_geometric_and_earlier_views_are_untouched():
    cache = KVCache(1)
    buffers, first = set(), None
    for t in range(GROW_AFTER + 1500):
        keys, _, _ = cache.update(*_step(t), 0)
        if t >= GROW_AFTER:
            buffers.add(cache.layers[0].keys.untyped_storage().data_ptr())
        if t == GROW_AFTER + 10:
            first = keys.clone(), keys
    assert GROW_AFTER + 1500 <= cache.layers[0].capacity < 2 * (GROW_AFTER + 1500)
    assert len(buffers) <= 4  # doublings past GROW_AFTER (a cat per token would give 1500 storages)
    assert torch.equal(first[0], first[1])  # a view handed out earlier never changes


def test_autograd_and_mismatched_appends_fall_back_to_cat():
    cache = KVCache(1)
    keys = torch.randn(1, 2, 3, 4, requires_grad=True)
    meta = {"order": torch.arange(3)[None], "position": torch.arange(3)[None], "valid": torch.ones(1, 3, dtype=torch.bool)}
    cache.update(keys, keys * 2, meta, 0)
    later = torch.randn(1, 2, 1, 4, requires_grad=True)
    k, v, _ = cache.update(later, later, {name: t[:, :1] for name, t in meta.items()}, 0)
    (k.sum() + v.sum()).backward()
    assert torch.equal(keys.grad, torch.full_like(keys, 3.0)) and torch.equal(later.grad, torch.full_like(later, 2.0))
    other = KVCache(1)
    other.update(*_step(0), 0)
    k2, v2, m2 = _step(1)
    k, _, m = other.update(k2.double(), v2.double(), {"order": m2["order"]}, 0)  # cat's promotion and meta rules
    assert k.dtype == torch.float64 and set(m) == {"order"} and k.shape[2] == 2
