"""Qwen2-VL / Qwen2.5-VL as the second vision family: the qwen2-vl and qwen2.5-vl fixtures (dynamic resolution,
M-RoPE, their own image processor and chat template) through our executor, against HF's own forward, generate,
rope index and eager attention weights."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from brisklm.core.adapter import ModelAdapter
from brisklm.core.plan import Plan
from brisklm.errors import BriskError, PlanError
from brisklm.vision.prune import PruneSpec, prune_generate, prune_prefill
from brisklm.vision.qwen2vl import QwenVLProcessor, mrope_positions, prefill_logits
from brisklm.vision.vlm import load_vlm


@pytest.fixture(scope="module", params=["qwen2-vl", "qwen2.5-vl"])
def loaded(fixture_checkpoints, request):
    return load_vlm(str(fixture_checkpoints(request.param)), device="cpu", dtype="float32")


def _image(height: int, width: int, seed: int = 0) -> np.ndarray:
    return (np.random.default_rng(seed).random((height, width, 3)) * 255).astype(np.uint8)


@pytest.fixture(scope="module")
def batch(loaded):
    """Two left-padded rows: a non-square image (6 x 8 patches: 12 tokens), and a square plus a tall image."""
    images = [_image(30, 40), [_image(32, 32, 1), _image(64, 16, 2)]]
    return loaded.processor(images, ["What colour is the circle?", "Compare <|image_pad|> with <|image_pad|> now."])


def _hf_inputs(loaded, batch) -> dict:
    mm = (batch.input_ids == loaded.model.config.image_token_id).int()
    return dict(input_ids=batch.input_ids, attention_mask=batch.attention_mask, pixel_values=batch.pixel_values,
                image_grid_thw=batch.image_grid_thw, mm_token_type_ids=mm)


def test_dynamic_resolution_token_counts(loaded, batch) -> None:
    processor = loaded.processor
    assert isinstance(processor, QwenVLProcessor) and loaded.model.config.model_type in ("qwen2_vl", "qwen2_5_vl")
    assert batch.image_grid_thw.tolist() == [[1, 6, 8], [1, 8, 8], [1, 16, 4]]
    image_rows = batch.input_ids == loaded.model.config.image_token_id
    assert image_rows.sum(dim=1).tolist() == [12, 16 + 16]  # grid prod / merge**2 per image, read from the grids
    assert not bool(batch.attention_mask[0, 0]) and bool(batch.attention_mask[:, -1].all())  # left-padded
    assert processor.tokens_per_image == 16  # the most one image can get (max_pixels)


def test_mrope_positions_match_hf_rope_index(loaded, batch) -> None:
    inputs = _hf_inputs(loaded, batch)
    expected, deltas = loaded.model.model.get_rope_index(inputs["input_ids"], inputs["mm_token_type_ids"],
                                                         batch.image_grid_thw, attention_mask=batch.attention_mask)
    assert torch.equal(batch.rope_position_ids, expected)
    # the three axes really differ on image rows (height / width of the 6 x 8 merged grid: 3 x 4 tokens)
    image = (batch.input_ids[0] == loaded.model.config.image_token_id)
    rows = batch.rope_position_ids[:, 0, image]
    assert rows[0].unique().numel() == 1 and rows[1].unique().numel() == 3 and rows[2].unique().numel() == 4
    # the 1-D position of the last prompt row continues as HF's decode does (max position + 1 = length + delta)
    real = batch.attention_mask.sum(dim=1)
    assert torch.equal(batch.position_ids[:, -1] + 1, real + deltas[:, 0])


def test_mrope_positions_reject_mismatched_grids(loaded, batch) -> None:
    with pytest.raises(BriskError, match="image grid"):
        mrope_positions(batch.input_ids, batch.attention_mask, batch.image_grid_thw[:2], loaded.model.config.image_token_id, 2)
    with pytest.raises(BriskError, match="image tokens for"):
        mrope_positions(batch.input_ids[:1], batch.attention_mask[:1], batch.image_grid_thw, loaded.model.config.image_token_id, 2)


def test_adapter_applies_the_mrope_sections(loaded, batch) -> None:
    adapter = ModelAdapter.from_model(loaded.model)
    assert adapter.family == "qwen2_vl" and adapter.num_layers == 4
    hidden = torch.zeros(*batch.input_ids.shape, adapter.hidden_size)
    cos3, _ = adapter.rotary(hidden, batch.rope_position_ids)
    cos1, _ = adapter.rotary(hidden, batch.rope_position_ids[0])
    text = batch.input_ids != loaded.model.config.image_token_id
    assert torch.equal(cos3[text], cos1[text])  # text rows: all three axes equal
    assert not torch.allclose(cos3[~text], cos1[~text])  # image rows: height / width bands differ


def test_noop_executor_equals_hf_forward(loaded, batch) -> None:
    """Our executor's logits on the fixture equal HF's own Qwen2-VL forward, images at non-square resolutions."""
    with torch.no_grad():
        ref = loaded.model(**_hf_inputs(loaded, batch)).logits[:, -1]
    ours = prefill_logits(loaded.model, batch)
    assert (ours - ref).abs().max().item() < 1e-4
    # the same rows with plain 1-D positions (no M-RoPE) do not match: the test sees the positions
    plain = prefill_logits(loaded.model, batch, Plan(position_ids=batch.position_ids,
                                                     rope_position_ids=batch.position_ids[None]))
    assert (plain - ref).abs().max().item() > 1e-3
    with pytest.raises(PlanError, match="rope_position_ids"):
        prefill_logits(loaded.model, batch, Plan(rope_position_ids=batch.rope_position_ids[:, :1]))


def test_dense_generation_equals_hf_generate(loaded, batch) -> None:
    ids, _ = prune_generate(loaded.model, batch, PruneSpec("dense"), max_new_tokens=5, eos_token_id=[],
                            pad_token_id=loaded.processor.text.roles.pad_id)
    with torch.no_grad():
        ref = loaded.model.generate(**_hf_inputs(loaded, batch), max_new_tokens=5, min_new_tokens=5, do_sample=False,
                                    pad_token_id=loaded.processor.text.roles.pad_id)
    assert torch.equal(ids, ref[:, batch.input_ids.shape[1]:])


def test_fastv_full_budget_equals_hf_and_a_real_budget_prunes(loaded, batch) -> None:
    """FastV keeping every visual token (rows regathered after layer 1, rows of 12 and 32 visual tokens) equals HF,
    so gathered rows keep their M-RoPE cos/sin; a real budget drops rows and changes the logits."""
    with torch.no_grad():
        ref = loaded.model(**_hf_inputs(loaded, batch)).logits[:, -1]
    full, _ = prune_prefill(loaded.model, batch, PruneSpec("fastv", keep=32, layer=1))
    assert (full - ref).abs().max().item() < 1e-4
    pruned, record = prune_prefill(loaded.model, batch, PruneSpec("fastv", keep=4, layer=1))
    assert [int(v) for v in record.visual[-1]] == [4, 4] and (pruned - ref).abs().max().item() > 1e-3


def test_pdrop_prunes_in_stages(loaded, batch) -> None:
    pruned, record = prune_prefill(loaded.model, batch, PruneSpec("pdrop", keep=8, pdrop_ratio=0.5))
    counts = [int(v[1]) for v in record.visual]
    assert counts[0] == 32 and counts[-1] < 8 and counts == sorted(counts, reverse=True)
    assert bool(torch.isfinite(pruned).all())


@pytest.mark.parametrize("keep", [3, 7])
def test_fastv_keeps_the_top_k_by_hf_eager_attention(loaded, batch, keep) -> None:
    """FastV scores image rows with their M-RoPE keys: it keeps exactly the top-k visual tokens by the last
    token's head-mean attention at layer K-1, as HF's eager attention weights give them."""
    from transformers import AutoModelForImageTextToText

    from brisklm.core.executor import execute
    from brisklm.vision.common import PruneRecord
    from brisklm.vision.prune import build_plan
    from brisklm.vision.qwen2vl import embed_qwen2vl

    eager = AutoModelForImageTextToText.from_pretrained(loaded.path, attn_implementation="eager").eval()
    with torch.no_grad():
        attentions = eager(**_hf_inputs(loaded, batch), output_attentions=True).attentions
    score = attentions[1][:, :, -1].mean(dim=1)  # layer K-1 = 1, the last row, head mean: (B, T)
    visual = batch.input_ids == loaded.model.config.image_token_id
    plan = build_plan(loaded.model, batch.input_ids, batch.position_ids, PruneSpec("fastv", keep=keep, layer=2),
                      PruneRecord())
    plan.rope_position_ids = batch.rope_position_ids
    with torch.no_grad():
        out = execute(loaded.model, inputs_embeds=embed_qwen2vl(loaded.model, batch), plan=plan,
                      attention_mask=batch.attention_mask, logits_rows="last")
    for b in range(batch.input_ids.shape[0]):
        expected = score[b].masked_fill(~visual[b], -1.0).topk(keep).indices.sort().values
        rows = out.meta["row"][b][out.meta["valid"][b] & out.meta["visual"][b]].sort().values
        assert torch.equal(rows, expected)


def test_visipruner_runs_on_qwen2vl(loaded, batch) -> None:
    """VisiPruner goes through the same plan builder: with a layer threshold every layer meets it fires at the
    first tested layer and keeps only its critical set; decoding continues from the pruned cache."""
    from brisklm.vision.visipruner import VisiPrunerConfig

    config = VisiPrunerConfig(shallow_layers=1, layer_threshold=1.0, token_threshold=0.05)
    spec = PruneSpec("visipruner", visipruner=config)
    _, record = prune_prefill(loaded.model, batch, spec)
    assert record.fusion_layer.tolist() == [1, 1]
    kept = record.kept.tolist()
    assert [int(v) for v in record.visual[-1]] == kept and all(k < 12 for k in kept)  # row 0 has 12 visual tokens
    ids, _ = prune_generate(loaded.model, batch, spec, max_new_tokens=3)
    assert ids.shape == (2, 3)


def test_vision_answer_cli_on_the_fixture(fixture_checkpoints, tmp_path, capsys) -> None:
    import json

    from PIL import Image

    from brisklm.cli import main

    image = tmp_path / "wide.png"
    Image.fromarray(_image(30, 40)).save(image)
    model = str(fixture_checkpoints("qwen2-vl"))
    for method in (["--method", "dense"], ["--method", "fastv", "--keep", "4"], ["--method", "pdrop", "--keep", "4"]):
        assert main(["vision", "answer", "--model", model, "--image", str(image), "--question", "What is it?",
                     "--max-new-tokens", "3", "--device", "cpu", *method]) == 0
        out = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
        assert out["image_tokens"] == 12 and isinstance(out["answer"], str)
        assert out["visual_tokens_per_layer"][0] == 12 and (method[1] == "dense") == (out["visual_tokens_per_layer"][-1] == 12)


def test_vision_eval_on_user_data(fixture_checkpoints, tmp_path, capsys) -> None:
    """`vision eval --data` on Qwen2-VL: images of different sizes (different token counts) in one batch."""
    import json

    from PIL import Image

    from brisklm.cli import main

    rows = []
    for i, (height, width) in enumerate([(30, 40), (32, 32), (64, 16)]):
        Image.fromarray(_image(height, width, i)).save(tmp_path / f"{i}.png")
        rows.append({"image": f"{i}.png", "question": "What colour is it?", "answer": "blue"})
    (tmp_path / "qa.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    assert main(["vision", "eval", "--model", str(fixture_checkpoints("qwen2-vl")), "--data", str(tmp_path / "qa.jsonl"),
                 "--methods", "fastv,pdrop", "--budgets", "4", "--out", str(tmp_path / "eval"), "--device", "cpu"]) == 0
    results = json.loads((tmp_path / "eval" / "results.json").read_text())
    runs = {r["run"]: r for r in results["runs"]}
    assert set(runs) == {"dense", "fastv@4", "pdrop@4"}
    assert runs["fastv@4"]["flops_ratio"] < 1.0 and runs["pdrop@4"]["flops_ratio"] < runs["fastv@4"]["flops_ratio"]


def test_bad_input_one_line(fixture_checkpoints, loaded, tmp_path, capsys) -> None:
    from brisklm.cli import main

    with pytest.raises(BriskError, match="2 <\\|image_pad\\|> token"):
        loaded.processor([_image(30, 40)], ["Compare <|image_pad|> with <|image_pad|>."])
    with pytest.raises(BriskError, match="larger than the 12 visual tokens"):
        prune_prefill(loaded.model, loaded.processor([_image(30, 40)], ["What?"]), PruneSpec("fastv", keep=13))
    model = str(fixture_checkpoints("qwen2-vl"))
    assert main(["vision", "train", "--arch", "vica", "--base", model, "--steps", "2", "--out", str(tmp_path)]) != 0
    assert "ViCA training needs a LLaVA checkpoint" in capsys.readouterr().err


def _additive_mask(valid: torch.Tensor) -> torch.Tensor:
    """(B, 1, T, T) causal mask over the valid keys (each row also sees itself, so padding rows stay finite)."""
    length = valid.shape[1]
    allowed = torch.ones(length, length, dtype=torch.bool).tril()[None] & valid[:, None, :]
    allowed = allowed | torch.eye(length, dtype=torch.bool)[None]
    return torch.zeros(allowed.shape).masked_fill(~allowed, float("-inf"))[:, None]


def test_fastv_real_budget_equals_hf_layers_on_the_kept_rows(loaded, batch) -> None:
    """FastV at a real budget equals HF's own decoder layers run on the full prompt up to layer K-1 and on the kept
    rows from layer K on, each kept row with its original M-RoPE cos/sin (HF's rotary over the full prompt)."""
    from brisklm.core.executor import execute
    from brisklm.vision.common import PruneRecord
    from brisklm.vision.prune import build_plan
    from brisklm.vision.qwen2vl import embed_qwen2vl

    model, layer_k = loaded.model, 2
    lm = model.model.language_model
    with torch.no_grad():
        embeds = embed_qwen2vl(model, batch)
        plan = build_plan(model, batch.input_ids, batch.position_ids, PruneSpec("fastv", keep=5, layer=layer_k),
                          PruneRecord())
        plan.rope_position_ids = batch.rope_position_ids
        out = execute(model, inputs_embeds=embeds, plan=plan, attention_mask=batch.attention_mask, logits_rows="last")
        index, valid = out.meta["row"], out.meta["valid"]
        assert int((valid & out.meta["visual"]).sum()) == 10  # 5 per row
        assert all(bool((index[b][valid[b]].diff() > 0).all()) for b in range(2))  # kept rows stay in order
        cos, sin = lm.rotary_emb(embeds, batch.rope_position_ids)
        hidden, rows_valid = embeds, batch.attention_mask.bool()
        for i, layer in enumerate(lm.layers):
            if i == layer_k:
                hidden, cos, sin = (t.gather(1, index[..., None].expand(-1, -1, t.shape[-1])) for t in (hidden, cos, sin))
                rows_valid = valid
            hidden = layer(hidden, attention_mask=_additive_mask(rows_valid), position_embeddings=(cos, sin))
        ref = model.lm_head(lm.norm(hidden))[:, -1]
        assert (out.logits[:, -1] - ref).abs().max().item() < 1e-4


def test_fastv_cached_decode_step_equals_hf_layers(loaded, batch) -> None:
    """A decode step after FastV prefill (later layers' cache holds only the kept rows) equals HF's own layers on
    prompt + token, the token at the M-RoPE text position after the prompt (max position + 1, all axes)."""
    from brisklm.core.cache import KVCache
    from brisklm.core.executor import execute
    from brisklm.vision.prune import decode_plan_fn
    from brisklm.vision.qwen2vl import embed_qwen2vl

    model, layer_k = loaded.model, 2
    lm = model.model.language_model
    with torch.no_grad():
        cache = KVCache(len(lm.layers))
        first, record = prune_prefill(model, batch, PruneSpec("fastv", keep=5, layer=layer_k), cache=cache)
        token = first.argmax(dim=-1, keepdim=True)
        plan = decode_plan_fn(record.plan.visibility)(1, token, cache)
        plan.position_ids = batch.position_ids[:, -1:] + 1
        ours = execute(model, token, plan=plan, cache=cache, attention_mask=torch.ones_like(token),
                       logits_rows="last").logits[:, -1]
        # the kept rows, as a no-cache prefill with the same plan reports them
        again = execute(model, inputs_embeds=embed_qwen2vl(model, batch), plan=record.plan,
                        attention_mask=batch.attention_mask, logits_rows="none")
        length = batch.input_ids.shape[1]
        index = torch.cat([again.meta["row"], torch.full_like(token, length)], dim=1)
        valid = torch.cat([again.meta["valid"], torch.ones_like(token, dtype=torch.bool)], dim=1)
        hidden = torch.cat([embed_qwen2vl(model, batch), model.get_input_embeddings()(token)], dim=1)
        rope = torch.cat([batch.rope_position_ids, (batch.position_ids[:, -1:] + 1)[None].expand(3, -1, -1)], dim=2)
        cos, sin = lm.rotary_emb(hidden, rope)
        rows_valid = torch.cat([batch.attention_mask.bool(), torch.ones_like(token, dtype=torch.bool)], dim=1)
        for i, layer in enumerate(lm.layers):
            if i == layer_k:
                hidden, cos, sin = (t.gather(1, index[..., None].expand(-1, -1, t.shape[-1])) for t in (hidden, cos, sin))
                rows_valid = valid
            hidden = layer(hidden, attention_mask=_additive_mask(rows_valid), position_embeddings=(cos, sin))
        ref = model.lm_head(lm.norm(hidden))[:, -1]
    assert (ours - ref).abs().max().item() < 1e-4
