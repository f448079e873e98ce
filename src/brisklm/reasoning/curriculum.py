"""Entropy-gated length curriculum: raise the generation length only while the student's token entropy holds up.

Stages are increasing max-new-token caps. After each round the student's mean token entropy on its own
rollouts updates an EMA; the cap moves to the next stage once the EMA is at or above `gate` and has been stable
(|change| < `tolerance`) for `patience` consecutive rounds. Below the gate the cap is held (long horizons with
reverse KL collapse entropy), and `fkl_boost` tells the trainer to add forward-KL weight.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Sequence

from brisklm.errors import BriskError


@dataclass
class EntropyGatedCurriculum:
    """Callable as a length schedule: `curriculum(round, entropy) -> max_new_tokens`."""

    stages: Sequence[int] = (32, 64, 96)
    gate: float = 0.05
    tolerance: float = 0.02
    patience: int = 3
    ema: float = 0.5
    stage: int = 0
    history: list[dict] = field(default_factory=list)
    _value: float | None = None
    _stable: int = 0

    def __post_init__(self) -> None:
        if not self.stages or any(b <= a for a, b in zip(self.stages, self.stages[1:])) or self.stages[0] < 1:
            raise BriskError(f"curriculum stages must be increasing positive lengths, got {list(self.stages)}")
        if not 0.0 < self.ema <= 1.0 or self.patience < 1 or self.tolerance < 0:
            raise BriskError("need 0 < ema <= 1, patience >= 1 and tolerance >= 0")

    @property
    def length(self) -> int:
        """The current generation cap."""
        return int(self.stages[self.stage])

    @property
    def fkl_boost(self) -> bool:
        """True while the entropy EMA is below the gate: the trainer should weight forward KL more."""
        return self._value is not None and self._value < self.gate

    def update(self, entropy: float) -> int:
        """Feed one round's student entropy (NaN = no measurement); returns the cap for the next round."""
        if not math.isnan(entropy):
            previous = self._value
            self._value = entropy if previous is None else self.ema * entropy + (1 - self.ema) * previous
            steady = previous is not None and abs(self._value - previous) < self.tolerance
            self._stable = self._stable + 1 if steady and self._value >= self.gate else 0
            if self._stable >= self.patience and self.stage + 1 < len(self.stages):
                self.stage += 1
                self._stable = 0
        self.history.append({"entropy": entropy, "ema": self._value, "length": self.length})
        return self.length

    def __call__(self, round_index: int, entropy: float) -> int:
        """Length-schedule form used by `distill`: round 0 starts at the first stage."""
        return self.length if round_index == 0 else self.update(entropy)
