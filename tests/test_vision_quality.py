"""Quality on the trained zoo models (shapes-llava, shapes-vica): the image matters, pruning and ViCA keep accuracy."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from brisklm.core.executor import execute
from brisklm.vision.baselines import staged_plan
from brisklm.vision.prune import prune_prefill
from brisklm.vision.vlm import embed_multimodal, visual_mask

from brisklm.tasks import get_task
from brisklm.tasks.base import Example
from brisklm.vision.prune import PruneSpec
from brisklm.vision.study import evaluate_method
from brisklm.vision.vica import vica_layers_of, visual_compute_fraction
from brisklm.vision.visipruner import VisiPrunerConfig
from brisklm.vision.vlm import load_vlm
from brisklm.vision.zoo import TASK_OPTIONS, chance_accuracy, vica_accuracy


@pytest.fixture(scope="module")
def setting():
    task = get_task("shapes_vqa", **TASK_OPTIONS)
    examples = task.examples("test", 256, seed=0)
    loaded = load_vlm("shapes-llava")
    dense = evaluate_method(loaded, examples, PruneSpec("dense"))
    return loaded, examples, dense, chance_accuracy(task.examples("train", 2000, seed=0), examples)


def test_dense_llava_uses_the_image(setting) -> None:
    """Measured (seed 0, 256 questions): dense 0.672 vs image-blind prior 0.523 and 0.500 with a blank (black)
    image; colour 0.682 vs 0.136 blank, spatial 0.697 vs 0.591 blank (counting stays at its prior 0.702)."""
    loaded, examples, dense, chance = setting
    assert dense["accuracy"] >= chance + 0.08, (dense["accuracy"], chance)
    blank = [Example(e.prompt, e.completion, e.answer, {**e.meta, "image": np.zeros_like(e.meta["image"])})
             for e in examples]
    blind = evaluate_method(loaded, blank, PruneSpec("dense"))
    assert blind["accuracy"] <= dense["accuracy"] - 0.08, (blind["accuracy"], dense["accuracy"])
    assert dense["accuracy_attribute"] >= blind["accuracy_attribute"] + 0.35, (dense, blind)
    assert dense["accuracy_spatial"] >= blind["accuracy_spatial"] + 0.04, (dense, blind)


def test_pruning_quality(setting) -> None:
    """VisiPruner's defaults (no shallow stage) keep >= 0.95 of dense; the model fuses the image into the text at
    layer 0, so masking text->vision there (shallow_layers=1, the old default) must fall well below dense:
    measured 1.006 at FLOPs 0.575 (scoring counted) vs 0.375 (below the blank-image 0.500)."""
    loaded, examples, dense, _ = setting
    visi = evaluate_method(loaded, examples, PruneSpec("visipruner"))
    assert visi["flops_ratio"] < 0.8 and visi["fired_fraction"] > 0.3, visi
    shallow = evaluate_method(loaded, examples, PruneSpec("visipruner", visipruner=VisiPrunerConfig(shallow_layers=1)))
    assert shallow["accuracy"] <= 0.8 * dense["accuracy"], (shallow["accuracy"], dense["accuracy"])
    fastv = evaluate_method(loaded, examples, PruneSpec("fastv", keep=8))
    assert fastv["accuracy"] >= 0.95 * dense["accuracy"] and fastv["flops_ratio"] < 0.85, fastv
    assert visi["accuracy"] >= VISI_KEEP * dense["accuracy"], (visi, dense["accuracy"])


@torch.no_grad()
def test_attention_selection_beats_random_and_bottom_k(setting) -> None:
    """Accuracy cannot rank selection rules on this model (dropping every visual token after layer 0 keeps 1.012
    of dense), so this test measures what can: how far the answer distribution moves from dense (KL). Keeping
    the 4 most-attended tokens after layer 1 moves it least (measured KL 0.0007 vs random 0.0014 vs the 4 least
    attended 0.0023, 256 questions)."""
    loaded, examples, _, _ = setting
    model = loaded.model
    batch = loaded.processor([e.meta["image"] for e in examples], [e.prompt for e in examples])
    embeds = embed_multimodal(model, batch.input_ids, batch.pixel_values)
    visual = visual_mask(batch.input_ids, model.config.image_token_id)
    dense = prune_prefill(model, batch, PruneSpec("dense"), embeds=embeds)[0].log_softmax(-1)
    kl = {}
    for score in ("attention", "random", "bottom"):
        plan = staged_plan(model, visual, [(1, 4)], score, position_ids=batch.position_ids)
        logits = execute(model, inputs_embeds=embeds, plan=plan, attention_mask=batch.attention_mask,
                         logits_rows="last").logits[:, -1].log_softmax(-1)
        kl[score] = float((dense.exp() * (dense - logits)).sum(-1).mean())
    assert kl["attention"] < 0.75 * kl["random"] and kl["random"] < kl["bottom"], kl


def test_vica_quality() -> None:
    task = get_task("shapes_vqa", **TASK_OPTIONS)
    examples = task.examples("test", 256, seed=0)
    vica = load_vlm("shapes-vica")
    layers = vica_layers_of(vica.model)
    assert visual_compute_fraction(vica.model, layers) < 0.10
    acc = vica_accuracy(vica.model, vica.processor, examples, layers)["accuracy"]
    dense = evaluate_method(load_vlm("shapes-llava"), examples, PruneSpec("dense"))["accuracy"]
    assert acc >= VICA_KEEP * dense, (acc, dense)


VISI_KEEP = 0.95  # measured 1.006 with the defaults (flops ratio 0.575, scoring counted)
VICA_KEEP = 0.95  # measured 1.00 (0.672 vs 0.672; ViCA had 200 extra fine-tuning steps)
