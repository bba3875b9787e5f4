"""``summary.json`` at the end of fit."""

from __future__ import annotations

import json
import resource
from pathlib import Path

import lightning as L
import torch
from lightning.pytorch.utilities import rank_zero_only

from gridgen.training.callbacks.timing import step_timer


class RunSummary(L.Callback):
    """Writes ``summary.json`` at the end of fit: final metrics, trainable parameters, the mean time per optimizer
    step (the run's :class:`StepTimer`: without the warm-up step and validation) and peak memory (CUDA: max
    allocated; CPU: the process's peak resident set size)."""

    def __init__(self, path: str) -> None:
        self.path = Path(path)

    @staticmethod
    def peak_memory(device: torch.device) -> tuple[float, str]:
        if device.type == "cuda":
            return torch.cuda.max_memory_allocated(device) / 2**20, "cuda_max_allocated"
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, "cpu_peak_rss"

    @rank_zero_only
    def on_train_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        metrics = {k: float(v) for k, v in trainer.callback_metrics.items() if v.numel() == 1}
        memory_mb, memory_kind = self.peak_memory(pl_module.device)
        timer = step_timer(trainer)
        summary = {
            "global_step": trainer.global_step,
            "trainable_parameters": pl_module.num_trainable,
            "step_time_s": timer.mean_seconds_per_step if timer is not None else None,
            "peak_memory_mb": memory_mb,
            "peak_memory_kind": memory_kind,
            "metrics": metrics,
        }
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.path.write_text(json.dumps(summary, indent=2))
