"""Quality on the trained zoo models (shapes-llava, shapes-vica): the image matters, pruning and ViCA keep accuracy."""

from __future__ import annotations

import pytest

from brisklm.tasks import get_task
from brisklm.vision.prune import PruneSpec
from brisklm.vision.study import evaluate_method
from brisklm.vision.vica import vica_layers_of, visual_compute_fraction
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
    """Measured (seed 0, 256 questions): dense 0.555 vs image-blind prior 0.523; the model reads the image for
    the attribute family (0.288 vs 0.106 when every visual token is removed after layer 0)."""
    loaded, examples, dense, chance = setting
    assert dense["accuracy"] > chance, (dense["accuracy"], chance)
    blind = evaluate_method(loaded, examples, PruneSpec("fastv", keep=0, layer=1))
    assert blind["accuracy"] < dense["accuracy"], (blind["accuracy"], dense["accuracy"])
    assert dense["accuracy_attribute"] >= blind["accuracy_attribute"] + 0.10, (dense, blind)


def test_pruning_quality(setting) -> None:
    loaded, examples, dense, _ = setting
    visi = evaluate_method(loaded, examples, PruneSpec("visipruner"))
    assert visi["flops_ratio"] < 0.9 and visi["fired_fraction"] > 0.3, visi
    fastv = evaluate_method(loaded, examples, PruneSpec("fastv", keep=8))
    assert fastv["accuracy"] >= 0.95 * dense["accuracy"] and fastv["flops_ratio"] < 0.85, fastv
    assert visi["accuracy"] >= VISI_KEEP * dense["accuracy"], (visi, dense["accuracy"])


def test_vica_quality() -> None:
    task = get_task("shapes_vqa", **TASK_OPTIONS)
    examples = task.examples("test", 256, seed=0)
    vica = load_vlm("shapes-vica")
    layers = vica_layers_of(vica.model)
    assert visual_compute_fraction(vica.model, layers) < 0.10
    acc = vica_accuracy(vica.model, vica.processor, examples, layers)["accuracy"]
    dense = evaluate_method(load_vlm("shapes-llava"), examples, PruneSpec("dense"))["accuracy"]
    assert acc >= VICA_KEEP * dense, (acc, dense)


VISI_KEEP = 0.9  # measured 0.95 (default thresholds)
VICA_KEEP = 0.95  # measured 1.10 (ViCA had 200 extra fine-tuning steps)
