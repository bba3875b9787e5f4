"""One clock for the run: seconds per optimizer step and training time without validation, read by the progress
bar, the log lines, the run summary and the throughput monitor."""

from __future__ import annotations

import time
from typing import Any

import lightning as L


class StepTimer(L.Callback):
    """Seconds per optimizer step: the time between optimizer steps (data loading included), without the time
    spent in validation and sample grids, and without the run's first step (model warm-up).

    ``seconds_per_step`` (bar, log lines, ETA): averaged over the steps so far, then an exponential moving average
    with weight ``smoothing`` once more than ``1 / smoothing`` steps are timed. ``mean_seconds_per_step`` (the run
    summary): over all timed steps. ``training_time()`` (throughput): seconds since training started, without
    validation."""

    def __init__(self, smoothing: float = 0.1) -> None:
        if not 0 < smoothing <= 1:
            raise ValueError(f"callbacks.step_timer.smoothing must be in (0, 1], got {smoothing}")
        self.smoothing = smoothing
        self.seconds_per_step: float | None = None
        self.timed_seconds, self.timed_steps = 0.0, 0
        self._timed = 0
        self._started: float | None = None
        self._paused_total = 0.0
        self._last: tuple[int, float] | None = None
        self._paused = 0.0
        self._pause_start: float | None = None

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._last = None  # the first step (warm-up) only starts the clock
        self._started, self._paused_total = time.perf_counter(), 0.0

    def on_train_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, outputs: Any, batch: Any,
                           batch_idx: int) -> None:
        step, now = trainer.global_step, time.perf_counter()
        if self._last is not None and step > self._last[0]:
            seconds = (now - self._last[1] - self._paused) / (step - self._last[0])
            self.timed_seconds += seconds * (step - self._last[0])
            self.timed_steps += step - self._last[0]
            self._timed += 1
            weight = max(self.smoothing, 1.0 / self._timed)
            self.seconds_per_step = seconds if self.seconds_per_step is None else \
                (1 - weight) * self.seconds_per_step + weight * seconds
        if self._last is None or step > self._last[0]:
            self._last, self._paused = (step, now), 0.0

    def on_validation_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._pause_start = time.perf_counter()

    def on_validation_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if self._pause_start is not None:
            paused = time.perf_counter() - self._pause_start
            self._paused += paused
            self._paused_total += paused
            self._pause_start = None

    @property
    def mean_seconds_per_step(self) -> float | None:
        return self.timed_seconds / self.timed_steps if self.timed_steps else None

    def training_time(self) -> float:
        """Seconds since training started, validation excluded."""
        if self._started is None:
            return 0.0
        paused = self._paused_total + (time.perf_counter() - self._pause_start if self._pause_start is not None else 0.0)
        return time.perf_counter() - self._started - paused

    def eta(self, trainer: L.Trainer) -> float | None:
        if self.seconds_per_step is None or not trainer.max_steps or trainer.max_steps < 0:
            return None
        return self.seconds_per_step * max(0, trainer.max_steps - trainer.global_step)


def step_timer(trainer: L.Trainer) -> StepTimer | None:
    return next((c for c in trainer.callbacks if isinstance(c, StepTimer)), None)
