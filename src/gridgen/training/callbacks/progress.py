"""What the console shows while a run trains: one bar and a log line every N steps, with the same figures."""

from __future__ import annotations

import logging
import sys
import time
from typing import Any

import lightning as L
from lightning.pytorch.callbacks import ProgressBar
from lightning.pytorch.utilities import rank_zero_only
from tqdm.auto import tqdm
from tqdm.contrib.logging import logging_redirect_tqdm

from gridgen.training.callbacks.timing import step_timer

log = logging.getLogger(__name__)


def progress_figures(trainer: L.Trainer) -> dict[str, str]:
    """What a glance at a run should show: both loss terms and alpha (their weighted sum rises as alpha ramps,
    which reads as divergence), seconds per step and the ETA from the run's :class:`StepTimer`."""
    metrics = trainer.callback_metrics
    figures = {}
    for key, label in (("train/loss_base", "L_base"), ("train/loss_flow", "L_flow"), ("train/alpha", "alpha")):
        if (value := metrics.get(key)) is not None:
            figures[label] = f"{float(value):.4g}"
    if (timer := step_timer(trainer)) is not None and timer.seconds_per_step is not None:
        figures["s/step"] = f"{timer.seconds_per_step:.3g}"
        if (eta := timer.eta(trainer)) is not None:
            figures["eta"] = format_duration(eta)
    return figures


class GridProgressBar(ProgressBar):
    """One bar over the whole run in optimizer steps (``step 12/40``) with L_base, L_flow, alpha, seconds per
    step and the ETA; log lines are written above it. Validation shows no bar of its own (its losses go to the
    loggers, its sample grids to a log line). The loss terms (GPU values) are read every ``refresh_rate`` steps."""

    def __init__(self, refresh_rate: int = 1) -> None:
        super().__init__()
        self.refresh_rate = max(1, int(refresh_rate))
        self._enabled = True
        self.bar: tqdm | None = None
        self._redirect: Any = None

    def disable(self) -> None:
        self._enabled = False

    def enable(self) -> None:
        self._enabled = True

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if not (self._enabled and trainer.is_global_zero):
            return
        total = trainer.max_steps if trainer.max_steps and trainer.max_steps > 0 else None
        # a resumed run starts where it was; tqdm's own rate would mix in validation pauses, so none is shown
        self.bar = tqdm(total=total, initial=trainer.global_step, dynamic_ncols=True, file=sys.stdout,
                        bar_format="step {n_fmt}/{total_fmt} |{bar}| {desc}")  # desc: the figures
        self._redirect = logging_redirect_tqdm(tqdm_class=tqdm)  # log lines above the bar, not inside it
        self._redirect.__enter__()

    def on_train_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, outputs: Any, batch: Any,
                           batch_idx: int) -> None:
        if self.bar is None or trainer.global_step == self.bar.n:
            return
        self.bar.n = trainer.global_step
        if trainer.global_step % self.refresh_rate == 0 or trainer.global_step == trainer.max_steps:
            self.bar.set_description_str("  ".join(f"{k} {v}" for k, v in progress_figures(trainer).items()),
                                         refresh=False)
            self.bar.refresh()

    def _close(self) -> None:
        if self._redirect is not None:
            self._redirect.__exit__(None, None, None)
            self._redirect = None
        if self.bar is not None:
            self.bar.close()
            self.bar = None

    def on_train_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._close()

    def on_exception(self, trainer: L.Trainer, pl_module: L.LightningModule, exception: BaseException) -> None:
        self._close()


def format_duration(seconds: float) -> str:
    """``1:02:03`` / ``2:03`` for durations shown to people."""
    seconds = int(round(seconds))
    hours, rest = divmod(seconds, 3600)
    return f"{hours}:{rest // 60:02d}:{rest % 60:02d}" if hours else f"{rest // 60}:{rest % 60:02d}"


class ProgressLog(L.Callback):
    """A log line every ``every_n_steps`` optimizer steps (the bar's figures: step/total, L_base, L_flow, alpha,
    s/step, ETA), for log files and SLURM outputs where a progress bar is unreadable; after the ``NOTICE_STEP``-th
    step of a long run on CPU, one line with the time a step takes (the run's :class:`StepTimer`, which leaves the
    first step out) and the expected duration. The first step carries one-time costs (``model.compile``'s
    compilation, the allocator's warm-up): 6 s against 0.25 s a step in a compiled 1200-step `experiment=mini` run,
    which the first step alone would have made 2 hours instead of 5 min."""

    NOTICE_STEP = 3

    def __init__(self, every_n_steps: int = 10, cpu_notice_after_s: float = 120.0) -> None:
        self.every_n_steps = max(1, int(every_n_steps))
        self.cpu_notice_after_s = cpu_notice_after_s
        self._start_step: int | None = None
        self._first: float | None = None  # when the run's first batch started
        self._logged_step = -1  # with gradient accumulation several batches end on the same optimizer step

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._start_step = trainer.global_step

    def on_train_batch_start(self, trainer: L.Trainer, pl_module: L.LightningModule, batch: Any, batch_idx: int) -> None:
        if self._first is None:
            self._first = time.perf_counter()

    @rank_zero_only
    def on_train_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, outputs: Any, batch: Any,
                           batch_idx: int) -> None:
        step, total = trainer.global_step, trainer.max_steps
        if step == self._logged_step or self._start_step is None:
            return
        self._logged_step = step
        timer = step_timer(trainer)  # the run's one clock: its seconds per step leave the first step out
        if (self._first is not None and timer is not None and step == self._start_step + self.NOTICE_STEP
                and (per_step := timer.seconds_per_step) is not None and pl_module.device.type == "cpu"):
            done = time.perf_counter() - self._first
            expected = done + per_step * max(0, (total or 0) - step)
            if expected > self.cpu_notice_after_s:
                log.warning("a step takes %.2f s on CPU (the first %d steps, with one-time costs, %.1f s): the %d "
                            "steps of this run will take about %s (a GPU: strategy=gpu; fewer steps: "
                            "trainer.max_steps=N)", per_step, step, done, total or 0, format_duration(expected))
        if step % self.every_n_steps or step <= self._start_step:
            return
        figures = "  ".join(f"{k} {v}" for k, v in progress_figures(trainer).items())
        log.info("step %d/%s  %s", step, total if total and total > 0 else "?", figures)
