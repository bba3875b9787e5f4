"""Throughput and MFU: samples/s, image tokens/s, TFLOP/s and MFU against the card's peak."""

from __future__ import annotations

from typing import Any

import lightning as L
import torch
from lightning.fabric.utilities.throughput import Throughput, get_available_flops
from lightning.pytorch.utilities import rank_zero_only

from gridgen.training.callbacks.timing import step_timer


def batch_size(batch: dict[str, Any]) -> int:
    return len(batch["caption"]) if "caption" in batch else int(batch["latents"].shape[0])


def batch_tokens(batch: dict[str, Any]) -> int:
    """Image tokens in a batch (one layout per batch): reported as ``train/items_per_sec`` = tokens/s."""
    layout = batch["layout"]
    tokens = (int(layout["rows"]) * int(layout["cell_height"]) // 16) * (int(layout["cols"]) * int(layout["cell_width"]) // 16)
    return batch_size(batch) * tokens


class GridThroughput(L.Callback):
    """Grid samples/s, image tokens/s and, from the module's ``flops_per_batch``, TFLOP/s and MFU against
    ``peak_tflops`` (dense peak per device; ``null``: the card's figure from
    :func:`gridgen.training.flops.peak_flops`, else Lightning's table), through Lightning's ``Throughput``.

    Batches are counted every step; the clock is the run's :class:`StepTimer` (training time without
    validation), read with one synchronisation every ``trainer.log_every_n_steps``: throughput is cumulative, so
    the figures are the same without a host sync per step. Logged as ``train/device/samples_per_sec``, ...
    ``window_size``: timed points per figure."""

    def __init__(self, window_size: int = 2, peak_tflops: float | None = None) -> None:
        self.window_size, self.peak_tflops = window_size, peak_tflops
        self.throughput: Throughput | None = None
        self._batches = self._samples = self._tokens = self._flops = 0
        self._timed_step = -1

    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        if step_timer(trainer) is None:
            raise ValueError("callbacks.throughput reads the run's clock: keep callbacks.step_timer in the config")
        device = trainer.strategy.root_device
        dtype = torch.bfloat16 if "bf16" in str(trainer.precision) else torch.float32
        if getattr(trainer.strategy, "param_dtype", None):  # FSDP2 computes in its policy's dtype
            dtype = getattr(torch, trainer.strategy.param_dtype)
        if self.peak_tflops is not None:
            peak: float | None = float(self.peak_tflops) * 1e12
        elif device.type == "cuda":
            from gridgen.training.flops import peak_flops

            peak = peak_flops(torch.cuda.get_device_name(device), dtype) or get_available_flops(device, dtype)
        else:
            peak = get_available_flops(device, dtype)
        self.throughput = Throughput(available_flops=peak, world_size=trainer.world_size, window_size=self.window_size)

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._batches = self._samples = self._tokens = self._flops = 0

    @rank_zero_only
    @torch.inference_mode()
    def on_train_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, outputs: Any, batch: Any,
                           batch_idx: int) -> None:
        self._batches += 1
        self._samples += batch_size(batch)
        self._tokens += batch_tokens(batch)
        flops = getattr(pl_module, "flops_per_batch", None)
        if flops is not None:  # Lightning's Throughput takes the FLOPs since its previous update
            self._flops += int(flops)
        step = trainer.global_step
        if self._batches > 1 and (step % trainer.log_every_n_steps or step == self._timed_step):
            return  # counted; timed at the next logging step (and at the first batch, the window's start)
        self._timed_step = step
        if trainer.strategy.root_device.type == "cuda":
            torch.cuda.synchronize()
        self.throughput.update(time=step_timer(trainer).training_time(), batches=self._batches,
                               samples=self._samples, lengths=self._tokens, flops=self._flops or None)
        self._flops = 0
        metrics = {f"train/{key}": value for key, value in self.throughput.compute().items()}
        if metrics:
            for logger in trainer.loggers:
                logger.log_metrics(metrics, step=step)
