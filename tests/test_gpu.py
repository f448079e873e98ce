"""The same paths on a CUDA GPU: fp32 on cuda equals fp32 on the cpu, bf16 on cuda stays within bf16's tolerance,
and no path mixes devices (inputs the user makes on the cpu are moved by the library). Skipped without CUDA."""

from __future__ import annotations

import copy

import pytest
import torch

from brisklm.core import LayerStep, Plan, execute
from brisklm.core.device import model_device

from test_device_dtype import (  # the CPU test's models, paths and tolerance
    BF16_REL_TOL,
    ids_for,
    llama,
    noop_path,
    random_routers,
    save_checkpoint,
    sparse_path,
    streaming_path,
    vision_path,
)

pytestmark = pytest.mark.gpu

CUDA = torch.device("cuda")
FP32_TOL = 1e-3  # fp32 on two devices: different kernels and reduction orders, same precision


@pytest.fixture(scope="module")
def tok():
    from brisklm.tasks.tokenizer import build_word_tokenizer
    from brisklm.tasks.translation import TranslationTask

    return build_word_tokenizer(TranslationTask().vocabulary())


@pytest.fixture(scope="module")
def cpu_model(tok):
    return llama(len(tok))


def on(model, dtype=torch.float32):
    return copy.deepcopy(model).to(CUDA, dtype)


def assert_close(out: torch.Tensor, ref: torch.Tensor, rel: float) -> None:
    out, ref = out.float().cpu(), ref.float().cpu()
    diff, scale = (out - ref).abs().max().item(), ref.abs().max().item()
    assert diff <= rel * scale, f"differs by {diff:.4g} (scale {scale:.4g}, allowed {rel * scale:.4g})"


@torch.no_grad()
@pytest.mark.parametrize("dtype, rel", [(torch.float32, FP32_TOL), (torch.bfloat16, BF16_REL_TOL)])
def test_noop_plan_on_cuda(cpu_model, tok, dtype, rel):
    ids = ids_for(len(tok))
    ref = noop_path(cpu_model, ids)
    model = on(cpu_model, dtype)
    out = noop_path(model, ids.to(CUDA))
    assert out.device.type == "cuda"
    assert_close(out, ref, rel)
    dense = model(ids.to(CUDA)).logits
    plan = Plan(steps=[LayerStep()] * model.config.num_hidden_layers)
    assert_close(execute(model, ids.to(CUDA), plan=plan).logits, dense, rel)


@torch.no_grad()
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_generate_on_cuda_matches_hf(cpu_model, tok, dtype):
    generate = pytest.importorskip("brisklm.core.generate").generate
    model = on(cpu_model, dtype)
    prompt = ids_for(len(tok), batch=1, length=8).to(CUDA)
    mask = torch.ones_like(prompt)
    ours = generate(model, prompt, mask, max_new_tokens=8, do_sample=False)
    theirs = model.generate(prompt, attention_mask=mask, max_new_tokens=8, do_sample=False)
    assert ours.device.type == "cuda"
    if dtype == torch.float32:
        assert torch.equal(ours, theirs)
    else:  # bf16 may flip a near-tie; the first new token must agree
        assert torch.equal(ours[:, :9], theirs[:, :9])


@torch.no_grad()
@pytest.mark.parametrize("dtype, rel", [(torch.float32, FP32_TOL), (torch.bfloat16, BF16_REL_TOL)])
def test_streaming_engine_on_cuda(cpu_model, tok, dtype, rel):
    forced = [tok.convert_tokens_to_ids(w) for w in ("drak", "flun", "sly", "pask")] + [tok.eos_token_id] * 2
    ref = streaming_path(cpu_model, tok, forced)
    assert_close(streaming_path(on(cpu_model, dtype), tok, forced), ref, rel)


@torch.no_grad()
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_sparse_execution_on_cuda(cpu_model, tok, dtype):
    routers = random_routers(cpu_model.config.num_hidden_layers)  # made on the cpu: they follow the model
    ids = ids_for(len(tok), batch=3, length=10)
    ref, ref_gates = sparse_path(cpu_model, routers, ids)
    out, gates = sparse_path(on(cpu_model, dtype), copy.deepcopy(routers), ids.to(CUDA))
    same = (gates.cpu() == ref_gates).flatten(2).all(-1).all(0)
    assert bool(same.any())
    assert_close(out[same.to(out.device)], ref[same], FP32_TOL if dtype == torch.float32 else BF16_REL_TOL)


@torch.no_grad()
@pytest.mark.parametrize("dtype, rel", [(torch.float32, FP32_TOL), (torch.bfloat16, BF16_REL_TOL)])
def test_vision_on_cuda(dtype, rel):
    from brisklm.tasks import get_task
    from brisklm.vision.prune import PruneSpec
    from brisklm.vision.vlm import build_vlm_tokenizer, new_tiny_llava

    task = get_task("shapes_vqa", image_size=32)
    tokenizer = build_vlm_tokenizer(task.vocabulary())
    vlm = new_tiny_llava(tokenizer, 0, patch_size=8, text=dict(hidden_size=64, intermediate_size=128,
                                                               num_hidden_layers=4, num_attention_heads=4,
                                                               num_key_value_heads=2)).eval()
    examples = task.examples("test", 3, seed=0)
    images, questions = [e.meta["image"] for e in examples], [e.prompt for e in examples]
    for spec in (PruneSpec("dense"), PruneSpec("fastv", keep=4)):
        ref, _ = vision_path(vlm, tokenizer, images, questions, spec)
        out, _ = vision_path(on(vlm, dtype), tokenizer, images, questions, spec)
        assert_close(out, ref, rel)


def test_loader_and_command_on_cuda(tmp_path, tok, capsys):
    from brisklm.cli import main
    from brisklm.zoo.store import load

    path = save_checkpoint(tmp_path / "m", tok)
    loaded = load(str(path), device="cuda", dtype="bfloat16")
    assert model_device(loaded.model).type == "cuda" and loaded.model.dtype == torch.bfloat16
    word = tok.convert_ids_to_tokens(10)
    status = main(["analyze", "lens", "--model", str(path), "--prompt", word, "--device", "cuda", "--dtype", "bfloat16"])
    assert status == 0, capsys.readouterr().err
