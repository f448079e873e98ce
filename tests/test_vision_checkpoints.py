"""Vision on a real-convention LLaVA checkpoint: the llava-qwen2 fixture (Qwen2 text model, its own LlavaProcessor,
49 image tokens in the middle of a chat-templated prompt) through the processor path, our executor against HF's own
forward and generate, `vision answer|eval|train` and their one-line errors."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
import torch
from PIL import Image

from brisklm.cli import main
from brisklm.errors import BriskError
from brisklm.vision.evaluate import QAItem, is_correct, normalize, predicted_letter, read_qa, resolve_budgets
from brisklm.vision.processor import CheckpointProcessor
from brisklm.vision.prune import PruneSpec, prune_generate, prune_prefill
from brisklm.vision.vlm import VLMProcessor, load_vlm, prefill_logits

TOKENS = 49  # the fixture's image tokens per image (7 x 7 patches, CLS dropped)


@pytest.fixture(scope="module")
def llava(fixture_checkpoints):
    return fixture_checkpoints("llava-qwen2")


@pytest.fixture(scope="module")
def loaded(llava):
    return load_vlm(str(llava), device="cpu", dtype="float32")


def _images(n: int, seed: int = 0) -> list[np.ndarray]:
    rng = np.random.default_rng(seed)
    return [(rng.random((30 + 3 * i, 40, 3)) * 255).astype(np.uint8) for i in range(n)]


def _png(folder, name: str, seed: int = 0):
    path = folder / name
    Image.fromarray(_images(1, seed)[0]).save(path)
    return path


def test_processor_reads_the_checkpoint(loaded) -> None:
    processor = loaded.processor
    assert isinstance(processor, CheckpointProcessor)
    assert processor.tokens_per_image == TOKENS and processor.image_size == 28
    batch = processor([_images(1)[0], _images(2, 1)], ["What colour is the circle?", "Compare <image> with <image>."])
    image_rows = batch.input_ids == loaded.model.config.image_token_id
    assert image_rows.sum(dim=1).tolist() == [TOKENS, 2 * TOKENS]
    real = batch.attention_mask[0].bool()
    first, last = [int(i) for i in image_rows[0].nonzero()[[0, -1], 0]]
    assert real[:first].sum() > 3 and (batch.input_ids.shape[1] - last) > 3  # the image sits mid-prompt
    assert not bool(batch.attention_mask[0, 0]) and bool(batch.attention_mask[:, -1].all())  # left-padded
    # normalisation with the checkpoint's own mean/std (not [0, 1]): a grey image gives (0.5 - mean) / std
    grey = np.full((28, 28, 3), 128, dtype=np.uint8)
    pixels = processor.pixels(grey)
    image_processor = processor.processor.image_processor
    expected = (128 / 255 - torch.tensor(image_processor.image_mean)) / torch.tensor(image_processor.image_std)
    assert torch.allclose(pixels[:, 0, 0], expected.float(), atol=1e-5)
    framed = CheckpointProcessor(processor.processor, loaded.model.config, system_prompt="Be brief.").frame("Q?")
    assert "Be brief." in framed and "helpful assistant" not in framed and framed.count("<image>") == 1
    # prompt_ids (training) = what the processor call gives (inference)
    assert processor.prompt_ids("What colour is the circle?") == batch.input_ids[0][real].tolist()


def test_executor_logits_equal_hf_llava_forward(loaded) -> None:
    """Our executor = LlavaForConditionalGeneration's own forward (float32), left-padded, one row with 2 images."""
    batch = loaded.processor([_images(1)[0], _images(2, 1)], ["Is there a square?", "Which of <image> and <image> is red?"])
    ours = prefill_logits(loaded.model, batch)
    with torch.no_grad():
        hf = loaded.model(input_ids=batch.input_ids, attention_mask=batch.attention_mask,
                          pixel_values=batch.pixel_values, position_ids=batch.position_ids).logits[:, -1]
    assert (ours - hf).abs().max().item() < 1e-4
    dense, _ = prune_prefill(loaded.model, batch, PruneSpec(method="dense"))
    assert (dense - hf).abs().max().item() < 1e-4
    one = loaded.processor([_images(1)[0]], ["Is there a square?"])  # FastV with a full budget is a no-op
    kept, _ = prune_prefill(loaded.model, one, PruneSpec(method="fastv", keep=TOKENS))
    assert (kept - hf[:1]).abs().max().item() < 1e-4
    pruned, _ = prune_prefill(loaded.model, one, PruneSpec(method="fastv", keep=5))
    assert (pruned - hf[:1]).abs().max().item() > 1e-3  # (and the comparison can fail)


def test_generation_loop_equals_hf_generate(loaded) -> None:
    """Greedy answers through brisklm.generate (batched, left-padded) = HF generate on the same inputs."""
    batch = loaded.processor(_images(3), ["What is it?", "Describe the picture in detail please.", "Colour?"])
    eos = list(loaded.processor.text.stop_ids)
    ours, _ = prune_generate(loaded.model, batch, PruneSpec(method="dense"), 6, eos_token_id=eos,
                             pad_token_id=loaded.processor.text.roles.pad_id)
    with torch.no_grad():
        hf = loaded.model.generate(input_ids=batch.input_ids, attention_mask=batch.attention_mask,
                                   pixel_values=batch.pixel_values, max_new_tokens=6, do_sample=False,
                                   eos_token_id=eos, pad_token_id=loaded.processor.text.roles.pad_id)
    hf = hf[:, batch.input_ids.shape[1]:]
    assert ours.tolist() == hf[:, :ours.shape[1]].tolist()


def test_scoring_and_data(tmp_path) -> None:
    assert normalize("  Red. ") == "red" and normalize("a  Blue Car") == "a blue car"
    assert predicted_letter("(B) circle") == "B" and predicted_letter("circle", ["square", "circle"]) == "B"
    choice = QAItem([], "q", "B", choice=True, options=["square", "circle"])
    assert is_correct("B.", choice) and not is_correct("A", choice) and not is_correct("square", choice)
    plain = QAItem([], "q", "red")
    assert is_correct("Red", plain) and not is_correct("blue", plain)
    _png(tmp_path, "a.png")
    lines = [{"image": "a.png", "question": "Which shape?", "answer": "circle", "options": ["square", "circle"]},
             {"image": ["a.png", "a.png"], "question": "Same?", "answer": "yes"}]
    (tmp_path / "qa.jsonl").write_text("\n".join(json.dumps(x) for x in lines) + "\n")
    items = read_qa(tmp_path / "qa.jsonl")
    assert items[0].choice and items[0].answer == "B" and "A. square" in items[0].question
    assert len(items[1].images) == 2 and not items[1].choice
    assert resolve_budgets(["0.25", "12"], TOKENS) == [12, 12]
    with pytest.raises(BriskError, match="larger than the 49 visual tokens"):
        resolve_budgets(["50"], TOKENS)


def test_vision_answer_and_eval_cli(llava, tmp_path, capsys) -> None:
    image = _png(tmp_path, "scene.png")
    assert main(["vision", "answer", "--model", str(llava), "--image", str(image), "--question",
                 "What colour is the circle?", "--method", "fastv", "--budget", "10", "--max-new-tokens", "3"]) == 0
    shown = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert isinstance(shown["answer"], str) and shown["image_tokens"] == TOKENS
    assert shown["visual_tokens_per_layer"][:2] == [TOKENS, TOKENS] and shown["visual_tokens_per_layer"][2] == 10
    assert main(["vision", "prune", "--model", str(llava), "--method", "pdrop", "--keep", "10", "--n", "8"]) == 0
    shown = json.loads(capsys.readouterr().out.strip().splitlines()[-1], parse_constant=pytest.fail)  # no NaN
    assert shown["visual_tokens"] == TOKENS and shown["flops_ratio"] < 1
    two = _png(tmp_path, "other.png", seed=1)
    assert main(["vision", "answer", "--model", str(llava), "--image", str(image), "--image", str(two),
                 "--question", "Compare <image> and <image>.", "--max-new-tokens", "2", "--temperature", "0.7"]) == 0
    assert json.loads(capsys.readouterr().out.strip().splitlines()[-1])["image_tokens"] == 2 * TOKENS
    lines = [{"image": "scene.png", "question": "Which shape?", "answer": "circle", "options": ["square", "circle"]},
             {"image": "other.png", "question": "What colour?", "answer": "red"},
             {"image": ["scene.png", "other.png"], "question": "Is <image> the same as <image>?", "answer": "no"}] * 2
    (tmp_path / "qa.jsonl").write_text("\n".join(json.dumps(x) for x in lines) + "\n")
    out = tmp_path / "eval"
    assert main(["vision", "eval", "--model", str(llava), "--data", str(tmp_path / "qa.jsonl"), "--budgets", "0.25,5",
                 "--max-new-tokens", "2", "--batch-size", "3", "--out", str(out)]) == 0
    results = json.loads((out / "results.json").read_text(), parse_constant=pytest.fail)  # strict JSON
    runs = {r["run"]: r for r in results["runs"]}
    assert set(runs) == {"dense", "fastv@12", "fastv@5", "pdrop@12", "pdrop@5", "visipruner@12", "visipruner@5"}
    assert runs["dense"]["flops_ratio"] == 1.0 and runs["fastv@5"]["flops_ratio"] < runs["fastv@12"]["flops_ratio"] < 1
    assert all(r["prefill_s"] > 0 and 0 <= r["accuracy"] <= 1 for r in runs.values())
    assert runs["pdrop@5"]["analytic_flops_ratio"] < runs["pdrop@12"]["analytic_flops_ratio"] < 1
    assert (out / "accuracy_vs_flops.png").read_bytes()[:4] == b"\x89PNG"


def test_vision_train_vica_on_the_fixture(llava, tmp_path, capsys) -> None:
    out = tmp_path / "vica"
    assert main(["vision", "train", "--arch", "vica", "--base", str(llava), "--steps", "2", "--out", str(out),
                 "--n-calib", "32", "--n-test", "32"]) == 0
    shown = json.loads([x for x in capsys.readouterr().out.splitlines() if x.startswith("{")][-1])
    assert len(shown["vica_layers"]) == 2 and (out / "processor_config.json").exists()
    _png(tmp_path, "s.png")
    (tmp_path / "qa.jsonl").write_text(json.dumps({"image": "s.png", "question": "Colour?", "answer": "red"}) + "\n")
    assert main(["vision", "eval", "--model", str(out), "--data", str(tmp_path / "qa.jsonl"), "--methods", "vica",
                 "--max-new-tokens", "2", "--out", str(tmp_path / "eval")]) == 0
    runs = json.loads((tmp_path / "eval" / "results.json").read_text())["runs"]
    assert [r["run"] for r in runs] == ["dense", "vica"] and runs[1]["flops_ratio"] < 1
    assert runs[1]["analytic_flops_ratio"] is None  # (ViCA has no pruning record)
    assert main(["vision", "answer", "--model", str(out), "--image", str(tmp_path / "s.png"), "--question", "Colour?",
                 "--max-new-tokens", "2"]) == 0
    assert json.loads(capsys.readouterr().out.strip().splitlines()[-1])["arch"] == "vica"


def _error(argv, capsys) -> str:
    assert main(argv) == 2
    err = capsys.readouterr().err.strip()
    last = err.splitlines()[-1]  # (HF's weight-loading bar may come first)
    assert last.startswith("brisk: error: ") and "Traceback" not in err, err
    return last


def test_bad_input_is_one_line(llava, tmp_path, capsys) -> None:
    image = _png(tmp_path, "ok.png")
    broken = tmp_path / "broken.png"
    broken.write_bytes(b"not an image at all")
    answer = ["vision", "answer", "--model", str(llava), "--max-new-tokens", "1"]
    assert "cannot open" in _error([*answer, "--image", str(broken), "--question", "What?"], capsys)
    assert "no <image> token" in _error([*answer, "--image", str(image), "--question", "What?",
                                         "--no-chat-template"], capsys)
    assert "2 image(s)" in _error([*answer, "--image", str(image), "--image", str(image), "--question",
                                   "What is <image>?"], capsys)
    assert "larger than the 49 visual tokens" in _error([*answer, "--image", str(image), "--question", "What?",
                                                         "--method", "fastv", "--keep", "60"], capsys)
    lines = [json.dumps({"image": "ok.png", "question": "q", "answer": "a"}), "{not json"]
    (tmp_path / "qa.jsonl").write_text("\n".join(lines) + "\n")
    assert "line 2" in _error(["vision", "eval", "--model", str(llava), "--data", str(tmp_path / "qa.jsonl")], capsys)
    (tmp_path / "qa.jsonl").write_text(json.dumps({"image": "missing.png", "question": "q", "answer": "a"}) + "\n")
    assert "line 1" in _error(["vision", "eval", "--model", str(llava), "--data", str(tmp_path / "qa.jsonl")], capsys)
    (tmp_path / "qa.jsonl").write_text(json.dumps({"image": "ok.png", "question": "q", "answer": "a"}) + "\n")
    assert "larger than the 49" in _error(["vision", "eval", "--model", str(llava), "--data",
                                           str(tmp_path / "qa.jsonl"), "--budgets", "80"], capsys)
    # an image processor alone (older folders) is paired with the tokenizer: the same inputs as the full processor
    bare = tmp_path / "bare"
    shutil.copytree(llava, bare)
    full = load_vlm(str(llava), device="cpu").processor
    (bare / "processor_config.json").unlink()
    full.processor.image_processor.save_pretrained(bare)
    paired = load_vlm(str(bare), device="cpu").processor
    assert isinstance(paired, CheckpointProcessor) and paired.tokens_per_image == TOKENS
    rows = ([_images(1)[0]], ["What is it?"])
    assert torch.equal(paired(*rows).input_ids, full(*rows).input_ids)
    assert torch.equal(paired(*rows).pixel_values, full(*rows).pixel_values)
    # no processor: the zoo's word format still works while the config gives the image size ...
    for name in ("preprocessor_config.json", "chat_template.jinja"):
        (bare / name).unlink(missing_ok=True)
    fallback = load_vlm(str(bare), device="cpu")
    assert isinstance(fallback.processor, VLMProcessor) and fallback.processor.tokens_per_image == TOKENS
    # ... and is refused in one line when it does not
    config = json.loads((bare / "config.json").read_text())
    del config["vision_config"]["image_size"]
    (bare / "config.json").write_text(json.dumps(config))
    assert "image_size" in _error(["vision", "answer", "--model", str(bare), "--image", str(image),
                                   "--question", "What?"], capsys)


def test_zoo_fixture_writes_a_llava_checkpoint(tmp_path, capsys) -> None:
    out = tmp_path / "llava"
    assert main(["zoo", "fixture", "--style", "llava-qwen2", "--out", str(out)]) == 0
    assert (out / "processor_config.json").exists() and (out / "chat_template.jinja").exists()
    capsys.readouterr()
    assert main(["inspect", "--model", str(out), "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["commands"]["vision answer"] is None and report["commands"]["vision eval"] is None
