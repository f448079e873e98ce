"""--device / --dtype: resolution rules and their one-line errors, the loader's bad-input errors, every command's
arguments, bf16-vs-fp32 agreement of the no-op, streaming, sparse and vision paths, and a check that these paths
make their tensors on the model's device."""

from __future__ import annotations

import argparse
import contextlib

import pytest
import torch
from transformers import GPT2Config, GPT2LMHeadModel, LlamaConfig, LlamaForCausalLM

from brisklm.cli import build_parser, main
from brisklm.core import KVCache, LayerStep, Plan, execute
from brisklm.core import device as dev
from brisklm.errors import BriskError, UnsupportedModelError
from brisklm.pruning.routers import RouterSet
from brisklm.pruning.sparse import sparse_forward
from brisklm.streaming.engine import StreamingSession
from brisklm.tasks import get_task
from brisklm.tasks.tokenizer import build_word_tokenizer
from brisklm.tasks.translation import TranslationTask
from brisklm.vision.prune import PruneSpec, prune_prefill
from brisklm.vision.visipruner import VisiPrunerConfig
from brisklm.vision.vlm import VLMProcessor, build_vlm_tokenizer, new_tiny_llava
from brisklm.zoo.store import load

pytestmark = pytest.mark.usefixtures("one_thread")

# bf16 keeps 8 significant bits (~2.4 decimal digits, relative rounding 2**-8 = 0.4%). Each of the few layers of
# these random models adds such a rounding to every matmul, norm and softmax, so the logits of a bf16 run differ
# from fp32 by a few tenths of a percent of their scale per layer; 3% of the largest fp32 logit leaves a wide
# margin above that while a wrong path (a dropped row, a wrong position, garbage from an uninitialised tensor)
# moves logits by their own scale (tens of percent or more).
BF16_REL_TOL = 3e-2

# Commands that load no model take no --device/--dtype (every other leaf must, or this test fails).
NO_MODEL_COMMANDS = {("zoo", "list"), ("zoo", "fixture")}  # list reads quality files; fixture writes random weights

# ------------------------------------------------------------------------------------------ fixtures


@pytest.fixture(scope="module")
def tok():
    return build_word_tokenizer(TranslationTask().vocabulary())


def llama(vocab: int, layers: int = 3, seed: int = 0) -> LlamaForCausalLM:
    torch.manual_seed(seed)
    config = LlamaConfig(vocab_size=vocab, hidden_size=64, intermediate_size=128, num_hidden_layers=layers,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256)
    return LlamaForCausalLM(config).eval()


@pytest.fixture(scope="module")
def model(tok):
    return llama(len(tok))


@pytest.fixture(scope="module")
def vlm_setup():
    task = get_task("shapes_vqa", image_size=32)
    tokenizer = build_vlm_tokenizer(task.vocabulary())
    vlm = new_tiny_llava(tokenizer, 0, patch_size=8,
                         text=dict(hidden_size=64, intermediate_size=128, num_hidden_layers=4,
                                   num_attention_heads=4, num_key_value_heads=2)).eval()
    examples = task.examples("test", 3, seed=0)
    return vlm, tokenizer, [e.meta["image"] for e in examples], [e.prompt for e in examples]


def random_routers(layers: int, seed: int = 0) -> RouterSet:
    torch.manual_seed(seed)
    routers = RouterSet(layers, 64)
    with torch.no_grad():
        for router in list(routers.attn) + list(routers.mlp):
            router.out.weight.normal_(0, 3.0)
            router.out.bias.zero_()
    return routers.eval()


def source_words(n: int = 4) -> list[str]:
    return TranslationTask(min_len=n, max_len=n).examples("train", 1, seed=3)[0].prompt.split()[:n]


def cast(module: torch.nn.Module, dtype: torch.dtype) -> torch.nn.Module:
    """A copy of a model in another dtype (the original stays fp32)."""
    import copy

    return copy.deepcopy(module).to(dtype)


# ------------------------------------------------------------------------------------------ the four paths
# Each returns float32 CPU results of one path; the same function runs in fp32, in bf16 and under the meta check.


def noop_path(model, ids):
    plan = Plan(steps=[LayerStep()] * model.config.num_hidden_layers)
    full = execute(model, ids, plan=plan).logits
    cache = KVCache(model.config.num_hidden_layers)
    parts = [execute(model, ids[:, a:b], cache=cache).logits for a, b in [(0, 5), (5, 6), (6, ids.shape[1])]]
    return torch.cat([full, torch.cat(parts, 1)]).float()


def streaming_path(model, tok, forced_ids):
    session = StreamingSession(model, tok)
    logits = []
    for i, word in enumerate(source_words()):
        session.read([word])
        session.write(forced=[forced_ids[i]])
        logits.append(session.last_logits)
    session.close()
    session.write(forced=[forced_ids[-1]])
    logits.append(session.last_logits)
    return torch.cat(logits).float()


def sparse_path(model, routers, ids):
    logits, record, _ = sparse_forward(model, routers, ids)
    return logits.float(), torch.stack(record.attn + record.mlp)


def vision_path(vlm, tokenizer, images, questions, spec):
    processor = VLMProcessor(tokenizer, vlm.config, device=dev.model_device(vlm))
    batch = processor(images, questions)
    logits, record = prune_prefill(vlm, batch, spec)
    return logits.float(), record


def ids_for(vocab: int, batch: int = 2, length: int = 12, seed: int = 1) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(4, vocab, (batch, length), generator=g)


def assert_close_bf16(low: torch.Tensor, ref: torch.Tensor) -> None:
    scale = ref.abs().max().item()
    diff = (low - ref).abs().max().item()
    assert diff <= BF16_REL_TOL * scale, f"bf16 differs from fp32 by {diff:.4g} (logit scale {scale:.4g})"
    assert diff > 0, "the bf16 run gave fp32's exact logits: it did not run in bf16"


# ------------------------------------------------------------------------------------------ resolution rules


def test_auto_rules_and_aliases(monkeypatch):
    monkeypatch.delenv(dev.DEVICE_ENV, raising=False)
    monkeypatch.delenv(dev.DTYPE_ENV, raising=False)
    expected = "cuda" if torch.cuda.is_available() else "mps" if dev._mps_available() else "cpu"
    assert dev.resolve_device("auto").type == expected
    assert dev.resolve_device("cpu") == torch.device("cpu")
    assert dev.auto_dtype("cpu", torch.bfloat16) == torch.float32  # cpu: always float32
    assert dev.auto_dtype(torch.device("cuda"), {"torch_dtype": "bfloat16"}) == torch.bfloat16  # GPU: the saved one
    assert dev.auto_dtype(torch.device("cuda"), {"dtype": "float16"}) == torch.float16
    assert dev.auto_dtype(torch.device("cuda"), None) == torch.float32  # nothing recorded
    assert dev.resolve_dtype("auto", "cpu", {"dtype": "bfloat16"}) == torch.float32
    assert dev.resolve_dtype("bf16", "cpu") == torch.bfloat16 and dev.resolve_dtype("float32", "cpu") == torch.float32
    monkeypatch.setenv(dev.DTYPE_ENV, "bfloat16")
    assert dev.resolve_dtype("auto", "cpu") == torch.bfloat16  # the env var is what "auto" means
    assert dev.resolve_dtype("float32", "cpu") == torch.float32  # an explicit value wins


@pytest.mark.parametrize("name, message", [
    ("tpu", "is not a device: pass auto, cpu, cuda, cuda:N or mps"),
    ("cuda:x", "cuda or cuda:N"),
])
def test_bad_device_names(name, message):
    with pytest.raises(BriskError, match=message):
        dev.resolve_device(name)


@pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has CUDA")
@pytest.mark.parametrize("name", ["cuda", "cuda:1"])
def test_cuda_without_cuda_names_what_is_available(name):
    with pytest.raises(BriskError) as info:
        dev.resolve_device(name)
    text = str(info.value)
    assert "CUDA is not available" in text and "available: cpu" in text and "\n" not in text


def test_cuda_index_out_of_range(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    with pytest.raises(BriskError, match=r"has 2 CUDA device\(s\), cuda:0..cuda:1"):
        dev.resolve_device("cuda:5")
    assert dev.resolve_device("cuda:1") == torch.device("cuda:1")


def test_mps_without_mps(monkeypatch):
    monkeypatch.setattr(dev, "_mps_available", lambda: False)
    with pytest.raises(BriskError, match="no Apple MPS device"):
        dev.resolve_device("mps")


def test_dtype_whose_ops_fail_is_one_line_with_a_suggestion(monkeypatch):
    def failing_probe(device, dtype):
        if dtype == torch.float16:
            raise RuntimeError('"addmm_impl_cpu_" not implemented for \'Half\'\nsecond line')
        return None

    monkeypatch.setattr(dev, "_probe", failing_probe)
    monkeypatch.setattr(dev, "_PROBED", {})
    with pytest.raises(BriskError) as info:
        dev.resolve_dtype("float16", "cpu")
    text = str(info.value)
    assert "--dtype float16 does not work on cpu" in text and "not implemented for 'Half'" in text
    assert "--dtype bfloat16 or --dtype float32" in text and "\n" not in text
    assert dev.resolve_dtype("bfloat16", "cpu") == torch.bfloat16
    with pytest.raises(BriskError, match="is not a dtype"):
        dev.resolve_dtype("int8", "cpu")


def test_real_probe_runs_every_dtype_on_cpu():
    for dtype in dev.DTYPES.values():
        dev._probe(torch.device("cpu"), dtype)  # raises if this torch lacks a CPU kernel the models need


def test_device_defaults_set_and_restore_env(monkeypatch):
    monkeypatch.delenv(dev.DEVICE_ENV, raising=False)
    monkeypatch.delenv(dev.DTYPE_ENV, raising=False)
    monkeypatch.delenv(dev.TRAIN_DTYPE_ENV, raising=False)
    args = argparse.Namespace(device="cpu", dtype="bf16", device_training=False)
    with dev.device_defaults(args):
        assert dev.resolve_dtype("auto", "cpu") == torch.bfloat16
    assert dev.DTYPE_ENV not in __import__("os").environ
    train = argparse.Namespace(device="cpu", dtype="bfloat16", device_training=True)
    with dev.device_defaults(train):
        assert dev.trainer_precision() == {"use_cpu": True, "bf16": True, "fp16": False}
        assert dev.resolve_dtype("auto", "cpu") == torch.float32  # training sets mixed precision, not weights
    assert dev.trainer_precision() == {"use_cpu": True, "bf16": False, "fp16": False}
    assert dev.device_kwargs(train) == {"device": "cpu", "dtype": "float32"}


# ------------------------------------------------------------------------------------------ every command


def leaf_commands(parser: argparse.ArgumentParser, path: tuple[str, ...] = ()):
    """(path, parser) of every runnable command in the argparse tree."""
    subs = [a for a in parser._actions if isinstance(a, argparse._SubParsersAction)]
    if not subs:
        yield path, parser
        return
    for action in subs:
        for name, child in action.choices.items():
            yield from leaf_commands(child, path + (name,))


def test_every_command_takes_device_and_dtype():
    leaves = list(leaf_commands(build_parser()))
    assert len(leaves) >= 20, [p for p, _ in leaves]
    missing = []
    for path, parser in leaves:
        options = {opt for action in parser._actions for opt in action.option_strings}
        if path not in NO_MODEL_COMMANDS and not {"--device", "--dtype"} <= options:
            missing.append(" ".join(path))
    assert not missing, f"commands without --device/--dtype (add core.device.add_device_args): {missing}"


@pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has CUDA")
def test_cli_device_error_is_one_line(capsys):
    status = main(["analyze", "lens", "--model", "no-such-model", "--prompt", "a", "--device", "cuda"])
    err = capsys.readouterr().err
    assert status == 2 and err.startswith("brisk: error: --device cuda: CUDA is not available")
    assert "Traceback" not in err and len(err.strip().splitlines()) == 1


# ------------------------------------------------------------------------------------------ the loader


def save_checkpoint(path, tok, model=None):
    model = model or llama(len(tok), layers=2)
    model.save_pretrained(path)
    tok.save_pretrained(path)
    return path


def test_load_honours_device_and_dtype(tmp_path, tok):
    path = save_checkpoint(tmp_path / "m", tok)
    loaded = load(str(path), dtype="bfloat16", device="cpu")
    assert dev.model_dtype(loaded.model) == torch.bfloat16 and dev.model_device(loaded.model).type == "cpu"
    assert not loaded.model.training
    fp32 = load(str(path), device="cpu")
    assert dev.model_dtype(fp32.model) == torch.float32
    ids = ids_for(len(tok))
    with torch.no_grad():
        assert_close_bf16(loaded.model(ids).logits.float(), fp32.model(ids).logits)


def test_folder_without_tokenizer(tmp_path, tok):
    path = tmp_path / "m"
    llama(len(tok), layers=2).save_pretrained(path)
    with pytest.raises(BriskError, match=r"has no tokenizer .*tokenizer.save_pretrained"):
        load(str(path))


def test_tokenizer_that_does_not_fit(tmp_path, tok):
    path = save_checkpoint(tmp_path / "m", tok, llama(len(tok) - 5, layers=2))
    with pytest.raises(BriskError, match="embeds only"):
        load(str(path))


def test_tokenizer_without_eos(tmp_path, tok):
    model = llama(len(tok), layers=2)
    model.config.eos_token_id = None
    model.generation_config.eos_token_id = None
    path = save_checkpoint(tmp_path / "m", tok, model)
    config = (path / "tokenizer_config.json")
    import json

    data = json.loads(config.read_text())
    data["eos_token"] = None
    config.write_text(json.dumps(data))
    with pytest.raises(BriskError) as info:
        load(str(path))
    text = str(info.value)
    assert "no end-of-sequence token" in text and "eos_token" in text and "tokenizer that has one" in text


def test_unsupported_family_is_one_line(tmp_path, tok, capsys):
    path = tmp_path / "gpt2"
    GPT2LMHeadModel(GPT2Config(n_layer=2, n_embd=32, n_head=2, vocab_size=len(tok))).save_pretrained(path)
    tok.save_pretrained(path)
    with pytest.raises(UnsupportedModelError, match="brisklm supports llama"):
        load(str(path))
    status = main(["analyze", "lens", "--model", str(path), "--prompt", "a", "--device", "cpu"])
    err = capsys.readouterr().err.strip().splitlines()
    assert status == 2 and err[-1].startswith("brisk: error: model family 'gpt2' is not supported")


# ------------------------------------------------------------------------------------------ bf16 vs fp32


@torch.no_grad()
def test_noop_path_bf16_matches_fp32(model, tok):
    ids = ids_for(len(tok))
    ref = noop_path(model, ids)
    low_model = cast(model, torch.bfloat16)
    low = noop_path(low_model, ids)
    assert execute(low_model, ids).logits.dtype == torch.bfloat16
    assert_close_bf16(low, ref)


@torch.no_grad()
def test_streaming_path_bf16_matches_fp32(model, tok):
    forced = tok.convert_tokens_to_ids(TranslationTask().examples("train", 1, seed=4)[0].completion.split()[:5])
    forced += [tok.eos_token_id] * (6 - len(forced))
    assert_close_bf16(streaming_path(cast(model, torch.bfloat16), tok, forced), streaming_path(model, tok, forced))


@torch.no_grad()
def test_sparse_path_bf16_matches_fp32(model, tok):
    routers = random_routers(model.config.num_hidden_layers)
    ids = ids_for(len(tok), batch=3, length=10)
    ref, ref_gates = sparse_path(model, routers, ids)
    low, low_gates = sparse_path(cast(model, torch.bfloat16), routers, ids)
    assert 0.2 < (~ref_gates).float().mean() < 0.8  # the routers really skip
    # A token whose router margin is below bf16's rounding may flip; compare the sequences with identical decisions.
    same = (ref_gates == low_gates).flatten(2).all(-1).all(0)  # (B,)
    assert (ref_gates == low_gates).float().mean() > 0.95 and bool(same.any())
    assert_close_bf16(low[same], ref[same])


@torch.no_grad()
@pytest.mark.parametrize("spec", [PruneSpec("dense"), PruneSpec("fastv", keep=4, layer=2)], ids=["dense", "fastv"])
def test_vision_path_bf16_matches_fp32(vlm_setup, spec):
    vlm, tokenizer, images, questions = vlm_setup
    ref, _ = vision_path(vlm, tokenizer, images, questions, spec)
    low, _ = vision_path(cast(vlm, torch.bfloat16), tokenizer, images, questions, spec)
    assert_close_bf16(low, ref)


# ------------------------------------------------------------------------------------------ tensors on the model's device


@contextlib.contextmanager
def default_device_meta():
    """Every tensor made without `device=` lands on 'meta' (no data): if one meets the cpu model's tensors the
    op raises, and if one reaches an output its values are missing, so the outputs below would not match."""
    torch.set_default_device("meta")
    try:
        yield
    finally:
        torch.set_default_device(None)


def assert_same_on_cpu(checked, ref):
    for a, b in zip(checked if isinstance(checked, tuple) else (checked,), ref if isinstance(ref, tuple) else (ref,)):
        assert a.device.type == "cpu"
        assert torch.equal(a, b)


@torch.no_grad()
def test_paths_make_tensors_on_the_model_device(model, tok, vlm_setup):
    ids = ids_for(len(tok))
    routers = random_routers(model.config.num_hidden_layers)
    forced = [tok.convert_tokens_to_ids(w) for w in ("drak", "flun", "sly", "pask")] + [tok.eos_token_id] * 2
    vlm, vtok, images, questions = vlm_setup
    visi = PruneSpec("visipruner", visipruner=VisiPrunerConfig(shallow_layers=1, layer_threshold=0.9999,
                                                                token_threshold=0.2))
    runs = {
        "noop": lambda: noop_path(model, ids),
        "streaming": lambda: streaming_path(model, tok, forced),
        "sparse": lambda: sparse_path(model, routers, ids),
        "vision-fastv": lambda: vision_path(vlm, vtok, images, questions, PruneSpec("fastv", keep=4))[0],
        "vision-visipruner": lambda: vision_path(vlm, vtok, images, questions, visi)[0],
    }
    for name, run in runs.items():
        ref = run()
        with default_device_meta():
            checked = run()
        assert_same_on_cpu(checked, ref)
    # the check can fail: a tensor made without device= under it is not on the model's device
    with default_device_meta(), pytest.raises((RuntimeError, NotImplementedError)):
        execute(model, ids, plan=Plan(position_ids=torch.arange(12).expand(2, 12)))


def test_realshape_bench_quick_runs_and_agrees_with_hf(tmp_path, monkeypatch):
    from brisklm.eval.bench import run_benchmark

    monkeypatch.delenv(dev.DTYPE_ENV, raising=False)
    result = run_benchmark("realshape", quick=True, out=tmp_path / "r.json", save_results=False)
    assert result["real_shape"] is False and (tmp_path / "r.json").exists()
    for dtype in ("float32", "bfloat16"):
        prefill = result[dtype]["prefill_b1_len64"]
        assert prefill["executor_s"] > 0 and prefill["hf_s"] > 0
        allowed = (1e-4 if dtype == "float32" else BF16_REL_TOL) * prefill["logit_scale"]  # no-op plan == HF forward
        assert prefill["noop_max_abs_diff"] <= allowed
    decode = result["float32"]["greedy_decode_8_after_64"]
    assert decode["same_tokens_before_first_difference"] == decode["new_tokens"] == 8  # greedy = HF's in fp32
