"""Test and benchmark helpers: random-weight checkpoints that follow real models' tokenizer and config conventions."""

from brisklm.testing.checkpoints import FIXTURE_STYLES, VISION_FIXTURE_STYLES, build_checkpoint, train_bpe_tokenizer

__all__ = ["FIXTURE_STYLES", "VISION_FIXTURE_STYLES", "build_checkpoint", "train_bpe_tokenizer"]
