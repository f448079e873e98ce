"""lm-eval-harness interop, offline: a local YAML task over a JSONL the test writes, evaluated with model `brisk`
on a dense real-convention fixture (against lm-eval's own HF model) and on a SkipGPT folder (really skipping)."""

import json
import os

import pytest
import torch

lm_eval = pytest.importorskip("lm_eval")

from brisklm.pruning import harness, load_skipgpt, save_skipgpt  # noqa: E402
from brisklm.pruning.gating import masked_forward  # noqa: E402
from brisklm.pruning.routers import RouterSet  # noqa: E402
from brisklm.zoo.store import load  # noqa: E402

os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("HF_HUB_OFFLINE", "1")

DOCS = [
    {"question": "The quick brown fox jumps over the", "choices": ["lazy dog", "red circle"], "label": 0},
    {"question": "Seven plus eight is", "choices": ["fifteen", "twenty-seven"], "label": 0},
    {"question": "She opened the door and smiled at the", "choices": ["visitors", "budget"], "label": 0},
]
TASK = """task: brisk_local_mc
dataset_path: json
dataset_kwargs:
  data_files:
    test: {data}
test_split: test
output_type: multiple_choice
doc_to_text: "{{{{question}}}}"
doc_to_choice: "{{{{choices}}}}"
doc_to_target: "{{{{label}}}}"
metric_list:
  - metric: acc
"""


def write_task(folder, data_path):
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "brisk_local_mc.yaml").write_text(TASK.format(data=data_path))
    return folder


@pytest.fixture(scope="module")
def task_dir(tmp_path_factory):
    root = tmp_path_factory.mktemp("lm-eval-task")
    data = root / "data.jsonl"
    data.write_text("\n".join(json.dumps(d) for d in DOCS) + "\n")
    return write_task(root / "tasks", data)


def evaluate(model, model_args, task_dir):
    from lm_eval.tasks import TaskManager

    out = lm_eval.simple_evaluate(model=model, model_args=model_args, tasks=["brisk_local_mc"], device="cpu",
                                  task_manager=TaskManager(include_path=str(task_dir), include_defaults=False),
                                  log_samples=True)
    logliks = [[float(r[0][0]) for r in s["resps"]] for s in out["samples"]["brisk_local_mc"]]
    return out["results"]["brisk_local_mc"]["acc,none"], logliks


def test_dense_checkpoint_matches_lm_evals_own_hf_model(fixture_checkpoints, task_dir):
    path = fixture_checkpoints("qwen2")  # no BOS: both models score the raw text
    acc, ours = evaluate("brisk", f"pretrained={path}", task_dir)
    hf_acc, theirs = evaluate("hf", f"pretrained={path},dtype=float32", task_dir)
    assert 0.0 <= acc <= 1.0 and acc == hf_acc
    assert len(ours) == len(DOCS) and all(len(x) == 2 for x in ours)
    for a, b in zip(ours, theirs):
        assert a == pytest.approx(b, abs=1e-3)


def test_skipgpt_checkpoint_is_scored_with_real_skipping(fixture_checkpoints, task_dir, tmp_path):
    loaded = load(str(fixture_checkpoints("phi3")))
    torch.manual_seed(0)
    routers = RouterSet(loaded.model.config.num_hidden_layers, loaded.model.config.hidden_size)
    with torch.no_grad():
        for router in list(routers.attn) + list(routers.mlp):
            router.out.weight.normal_(0, 3.0)
            router.out.bias.zero_()
    folder = save_skipgpt(tmp_path / "skip", loaded.model, loaded.tokenizer, routers, {})
    _, routed = evaluate("brisk", f"pretrained={folder},skipgpt=1,kv_policy=full", task_dir)
    _, dense = evaluate("brisk", f"pretrained={folder}", task_dir)
    assert any(abs(a - b) > 1e-3 for r, d in zip(routed, dense) for a, b in zip(r, d))  # the routers changed it
    # Reference: the gate-multiplied model scores the first choice of the first document the same.
    lm = harness.BriskLM(pretrained=str(folder), skipgpt=1)
    ctx, cont = lm._encode_pair(DOCS[0]["question"], " " + DOCS[0]["choices"][0])
    ids = torch.tensor([lm.prefix + ctx + cont])
    logits, _ = masked_forward(load_skipgpt(folder).model, routers, ids)
    logprobs = torch.log_softmax(logits[0, -len(cont) - 1:-1], -1)
    expected = float(logprobs.gather(1, torch.tensor(cont)[:, None]).sum())
    assert routed[0][0] == pytest.approx(expected, abs=1e-3)


def test_generate_until_and_rolling(fixture_checkpoints):
    from lm_eval.api.instance import Instance

    lm = harness.BriskLM(pretrained=str(fixture_checkpoints("llama3")))
    gen = Instance("generate_until", {}, ("The quick brown fox", {"until": ["\n"], "max_gen_toks": 5}), 0)
    (text,) = lm.generate_until([gen])
    assert isinstance(text, str) and "\n" not in text
    roll = Instance("loglikelihood_rolling", {}, ("The quick brown fox jumps over the lazy dog.",), 0)
    (total,) = lm.loglikelihood_rolling([roll])
    ids = lm.prefix + lm.text.encode("The quick brown fox jumps over the lazy dog.")
    logprobs = torch.log_softmax(lm._logits(ids[:-1]), -1)
    assert total == pytest.approx(float(logprobs.gather(1, torch.tensor(ids[1:])[:, None]).sum()), abs=1e-3)


def test_missing_task_file_is_one_line(task_dir, tmp_path, fixture_checkpoints, capsys):
    tasks = write_task(tmp_path / "tasks", tmp_path / "missing.jsonl")
    status = harness.main(["--model", "brisk", "--model_args", f"pretrained={fixture_checkpoints('qwen2')}",
                           "--tasks", "brisk_local_mc", "--include_path", str(tasks), "--device", "cpu"])
    err = capsys.readouterr().err.strip().splitlines()
    assert status == 2 and err[-1].startswith("brisk: error: ") and "missing.jsonl, which does not exist" in err[-1]
    assert not any("Traceback" in line for line in err)
