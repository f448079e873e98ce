"""Two CPU processes (gloo) train through the Trainer path: different batches per rank, synced weights, a reloadable
checkpoint. Launched with `accelerate launch --cpu` and with `torchrun`, from the venv beside sys.executable."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch

SCRIPT = r'''
"""One rank: train_lm (20 steps) on a tiny translation model, then one StepDriver step on rank-specific data."""
import json, sys
from pathlib import Path

import torch
import torch.distributed as dist

from brisklm.reasoning.rollout import StepDriver
from brisklm.tasks import get_task
from brisklm.tasks.tokenizer import build_word_tokenizer
from brisklm.zoo.architecture import new_model, tiny_llama_config
from brisklm.zoo.textlm import PadCollator, TrainOptions, encode_example, train_lm

out = Path(sys.argv[1])
task = get_task("translation")
tok = build_word_tokenizer(task.vocabulary())
examples = task.examples("train", 200, seed=0)
features = [dict(encode_example(tok, e), index=i) for i, e in enumerate(examples)]
config = tiny_llama_config(len(tok), "tiny", pad_token_id=tok.pad_token_id, bos_token_id=tok.bos_token_id,
                           eos_token_id=tok.eos_token_id, hidden_size=32, num_hidden_layers=1,
                           num_attention_heads=2, num_key_value_heads=1, intermediate_size=64)
model = new_model(config, 0)
seen = []
pad = PadCollator(tok.pad_token_id)

def collate(batch):
    seen.append([f["index"] for f in batch])
    return pad(batch)

stats = train_lm(model, tok, features, TrainOptions(steps=20, batch_size=4, log_every=10), str(out / "trainer"),
                 collator=collate)
rank, world = dist.get_rank(), dist.get_world_size()
checksum = lambda m: float(sum(p.detach().double().sum() for p in m.parameters()))
after_lm = checksum(model)
if rank == 0:
    model.save_pretrained(out / "ckpt")
    tok.save_pretrained(out / "ckpt")
driver = StepDriver(model, tok, learning_rate=1e-2, total_steps=1)
loss = driver.step(features[rank * 8:(rank + 1) * 8])  # different data per rank: only the all-reduce keeps them equal
(out / f"rank{rank}.json").write_text(json.dumps({
    "rank": rank, "world": world, "backend": str(dist.get_backend_config()), "batches": seen, "train_loss": stats["train_loss"],
    "checksum_lm": after_lm, "checksum_driver": checksum(driver.model), "driver_loss": loss}))
'''


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _launch(launcher: str, script: Path, out: Path, tmp_path: Path) -> subprocess.CompletedProcess:
    bin_dir = Path(sys.executable).parent
    port = str(_free_port())
    if launcher == "accelerate":
        # --multi_gpu picks accelerate's torch.distributed launcher; with no GPU each rank runs on the CPU (gloo).
        # (--cpu alone starts one process unless mpirun is configured.)
        cmd = [str(bin_dir / "accelerate"), "launch", "--multi_gpu", "--num_processes", "2", "--num_machines", "1",
               "--mixed_precision", "no", "--dynamo_backend", "no", "--main_process_port", port]
    else:
        cmd = [str(bin_dir / "torchrun"), "--nnodes", "1", "--nproc_per_node", "2", "--master_addr", "127.0.0.1",
               "--master_port", port]
    if not Path(cmd[0]).exists():
        pytest.fail(f"{cmd[0]} is missing: install the package into the venv that runs the tests")
    env = dict(os.environ, OMP_NUM_THREADS="1", HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1",
               HF_HOME=str(tmp_path / "hf"), CUDA_VISIBLE_DEVICES="")  # no user accelerate config, no GPU
    return subprocess.run([*cmd, str(script), str(out)], env=env, capture_output=True, text=True, timeout=180)


@pytest.mark.parametrize("launcher", ["accelerate", "torchrun"])
def test_two_cpu_processes_train_reload(launcher, tmp_path):
    script, out = tmp_path / "train_two.py", tmp_path / "out"
    script.write_text(SCRIPT)
    out.mkdir()
    run = _launch(launcher, script, out, tmp_path)
    assert run.returncode == 0, run.stderr[-3000:]
    ranks = [json.loads((out / f"rank{r}.json").read_text()) for r in (0, 1)]
    assert [r["world"] for r in ranks] == [2, 2] and all("gloo" in r["backend"] for r in ranks)

    # each rank collated its 20 batches of 4 (accelerate's loader fetches one ahead), no example went to both ranks
    seen = [{i for batch in r["batches"] for i in batch} for r in ranks]
    assert all(len(r["batches"]) in (20, 21) and all(len(b) == 4 for b in r["batches"]) for r in ranks)
    assert seen[0] and seen[1] and not seen[0] & seen[1], seen

    # DDP kept the replicas equal: after Trainer.train, and after the driver stepped on different data per rank
    assert ranks[0]["checksum_lm"] == pytest.approx(ranks[1]["checksum_lm"], abs=1e-9)
    assert ranks[0]["checksum_driver"] == pytest.approx(ranks[1]["checksum_driver"], abs=1e-9)
    assert ranks[0]["checksum_driver"] != pytest.approx(ranks[0]["checksum_lm"], abs=1e-6)  # the step moved them
    assert ranks[0]["driver_loss"] != pytest.approx(ranks[1]["driver_loss"])  # the ranks really had different data

    from brisklm.zoo.store import load

    loaded = load(str(out / "ckpt"))
    checksum = float(sum(p.detach().double().sum() for p in loaded.model.parameters()))
    assert checksum == pytest.approx(ranks[0]["checksum_lm"], abs=1e-6)
    ids = torch.tensor([[loaded.tokenizer.bos_token_id, 5, 6, loaded.tokenizer.sep_token_id]])
    with torch.no_grad():
        logits = loaded.model(input_ids=ids).logits
    assert logits.shape == (1, 4, len(loaded.tokenizer)) and torch.isfinite(logits).all()
