"""The alpha ramp of eq. (3): alpha(step), set on the module before every step."""

from __future__ import annotations

import math
from typing import Any

import lightning as L

ALPHA_SHAPES = ("constant", "linear", "cosine")


def alpha_at(step: int, alpha_max: float, delay_steps: int = 0, ramp_steps: int = 0, shape: str = "linear") -> float:
    """alpha(step): 0 for ``delay_steps``, then rises to ``alpha_max`` over ``ramp_steps`` (paper 2.3).

    ``constant`` is ``alpha_max`` from step 0 (the official GRID code's behaviour, for ablations).
    """
    if shape not in ALPHA_SHAPES:
        raise ValueError(f"alpha.shape must be one of {ALPHA_SHAPES}, got {shape!r}")
    if shape == "constant":
        return float(alpha_max)
    if step < delay_steps:
        return 0.0
    if ramp_steps <= 0:
        return float(alpha_max)
    progress = min(1.0, (step - delay_steps) / ramp_steps)
    if shape == "cosine":
        progress = 0.5 * (1.0 - math.cos(math.pi * progress))
    return float(alpha_max) * progress


class AlphaSchedule(L.Callback):
    """Sets ``pl_module.alpha`` from ``trainer.global_step`` before every step.

    Stateless: alpha is a function of the step alone, so a resumed run continues the ramp exactly.
    """

    def __init__(self, alpha_max: float = 0.5, delay_steps: int = 0, ramp_steps: int = 1000,
                 shape: str = "linear") -> None:
        if alpha_max < 0:
            raise ValueError(f"alpha.alpha_max must be >= 0, got {alpha_max}")
        alpha_at(0, alpha_max, delay_steps, ramp_steps, shape)  # validates shape early
        self.alpha_max, self.delay_steps, self.ramp_steps, self.shape = alpha_max, delay_steps, ramp_steps, shape

    def on_train_batch_start(self, trainer: L.Trainer, pl_module: L.LightningModule, batch: Any, batch_idx: int) -> None:
        pl_module.alpha = alpha_at(trainer.global_step, self.alpha_max, self.delay_steps, self.ramp_steps, self.shape)
