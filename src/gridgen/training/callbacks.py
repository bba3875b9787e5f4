"""Callbacks: the alpha ramp of eq. (3), LoRA export at the end of a run, and the run summary."""

from __future__ import annotations

import hashlib
import json
import logging
import math
import resource
import time
from pathlib import Path
from typing import Any

import lightning as L
import torch
from lightning.pytorch.callbacks import ThroughputMonitor
from lightning.pytorch.utilities import rank_zero_only

import gridgen
from gridgen.models.lora import save_lora

log = logging.getLogger(__name__)

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


def config_hash(cfg: Any) -> str:
    return hashlib.sha256(json.dumps(cfg, sort_keys=True, default=str).encode()).hexdigest()[:16]


class LoraExport(L.Callback):
    """Writes ``<dirpath>/pytorch_lora_weights.safetensors`` (diffusers format) when training ends."""

    def __init__(self, dirpath: str, metadata: dict[str, Any] | None = None) -> None:
        self.dirpath = Path(dirpath)
        self.metadata = dict(metadata or {})
        self.path: Path | None = None

    def on_train_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self.path = self.dirpath / "pytorch_lora_weights.safetensors"
        if trainer.is_global_zero:
            meta = {"gridgen_version": gridgen.__version__, "gridgen_step": trainer.global_step, **self.metadata}
            self.path = save_lora(self.dirpath, pl_module.transformer, meta)
            log.info("exported LoRA to %s", self.path)


class RunSummary(L.Callback):
    """Writes ``summary.json`` at the end of fit: final metrics, trainable parameters, mean step time (after
    ``warmup_steps``) and peak memory (CUDA: max allocated; CPU: the process's peak resident set size)."""

    def __init__(self, path: str, warmup_steps: int = 2) -> None:
        self.path = Path(path)
        self.warmup_steps = warmup_steps
        self._start: float | None = None
        self._times: list[float] = []

    def on_train_batch_start(self, trainer: L.Trainer, pl_module: L.LightningModule, batch: Any, batch_idx: int) -> None:
        self._start = time.perf_counter()

    def on_train_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, outputs: Any, batch: Any,
                           batch_idx: int) -> None:
        if self._start is not None:
            self._times.append(time.perf_counter() - self._start)

    @staticmethod
    def peak_memory(device: torch.device) -> tuple[float, str]:
        if device.type == "cuda":
            return torch.cuda.max_memory_allocated(device) / 2**20, "cuda_max_allocated"
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, "cpu_peak_rss"

    @rank_zero_only
    def on_train_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        metrics = {k: float(v) for k, v in trainer.callback_metrics.items() if v.numel() == 1}
        timed = self._times[self.warmup_steps:] or self._times
        memory_mb, memory_kind = self.peak_memory(pl_module.device)
        summary = {
            "global_step": trainer.global_step,
            "trainable_parameters": pl_module.num_trainable,
            "step_time_s": sum(timed) / len(timed) if timed else None,
            "peak_memory_mb": memory_mb,
            "peak_memory_kind": memory_kind,
            "metrics": metrics,
        }
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.path.write_text(json.dumps(summary, indent=2))


def batch_size(batch: dict[str, Any]) -> int:
    return len(batch["caption"]) if "caption" in batch else int(batch["latents"].shape[0])


def batch_tokens(batch: dict[str, Any]) -> int:
    """Image tokens in a batch (one layout per batch): reported as ``train/items_per_sec`` = tokens/s."""
    layout = batch["layout"]
    tokens = (int(layout["rows"]) * int(layout["cell_height"]) // 16) * (int(layout["cols"]) * int(layout["cell_width"]) // 16)
    return batch_size(batch) * tokens


class GridThroughput(ThroughputMonitor):
    """Lightning's ThroughputMonitor counting grid samples and image tokens (samples/s, tokens/s)."""

    def __init__(self, window_size: int = 10) -> None:
        super().__init__(batch_size_fn=batch_size, length_fn=batch_tokens, window_size=window_size)
