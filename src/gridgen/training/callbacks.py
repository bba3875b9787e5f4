"""Callbacks: the alpha ramp of eq. (3), LoRA export, the run summary, throughput/MFU and progress."""

from __future__ import annotations

import hashlib
import json
import logging
import math
import resource
import sys
import time
from pathlib import Path
from typing import Any

import lightning as L
import torch
from lightning.pytorch.callbacks import ProgressBar, ThroughputMonitor
from lightning.pytorch.utilities import rank_zero_only
from peft.utils import get_peft_model_state_dict
from tqdm.auto import tqdm
from tqdm.contrib.logging import logging_redirect_tqdm

import gridgen
from gridgen.models.lora import (
    check_export_formats,
    kohya_inputs,
    kohya_state_dict,
    lora_state_dict,
    save_lora,
)

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
    """Writes ``<dirpath>/pytorch_lora_weights.safetensors`` (diffusers format, plus ``formats`` such as
    ``kohya``) when training ends. Under FSDP2 every rank hands in its shards and rank 0 writes the full LoRA."""

    def __init__(self, dirpath: str, metadata: dict[str, Any] | None = None,
                 formats: list[str] | tuple[str, ...] = ("diffusers",)) -> None:
        self.dirpath = Path(dirpath)
        self.metadata = dict(metadata or {})
        self.formats = check_export_formats(formats)
        if "diffusers" not in self.formats:  # the file gridgen itself (init_lora, generate) and diffusers read
            raise ValueError(f"lora.export_formats={self.formats} must include diffusers, e.g. [diffusers,kohya]")
        self.path: Path | None = None

    def on_fit_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if "kohya" in self.formats and trainer.world_size == 1:  # a LoRA kohya cannot name fails now, not at the end
            kohya_state_dict(lora_state_dict(pl_module.transformer), *kohya_inputs(pl_module.transformer))

    def on_train_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self.path = self.dirpath / "pytorch_lora_weights.safetensors"
        state = full_lora_state_dict(pl_module.transformer)  # a collective under FSDP2: every rank calls it
        if trainer.is_global_zero:
            meta = {"gridgen_version": gridgen.__version__, "gridgen_step": trainer.global_step, **self.metadata}
            self.path = save_lora(self.dirpath, pl_module.transformer, meta, formats=self.formats, state_dict=state)
            log.info("exported LoRA to %s", self.path)


def full_lora_state_dict(transformer: torch.nn.Module) -> dict[str, torch.Tensor]:
    """The LoRA's peft-format tensors, whole: sharded (FSDP2 DTensor) ones are gathered from every rank, so
    every rank must call this together."""
    return {k: (v.full_tensor() if hasattr(v, "full_tensor") else v).detach().cpu().contiguous()
            for k, v in get_peft_model_state_dict(transformer).items()}


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
    """Lightning's ThroughputMonitor counting grid samples and image tokens (samples/s, tokens/s) and, from the
    module's ``flops_per_batch``, TFLOP/s and MFU against ``peak_tflops`` (dense peak per device; ``null``: the
    card's figure from :func:`gridgen.training.flops.peak_flops`, none for unknown cards).

    Lightning's monitor synchronises the GPU after every batch to time it; here batches are only counted per
    step and the clock is read (with one synchronisation) every ``trainer.log_every_n_steps``: throughput is
    cumulative, so the figures are the same without a host sync per step.
    """

    def __init__(self, window_size: int = 2, peak_tflops: float | None = None) -> None:
        super().__init__(batch_size_fn=batch_size, length_fn=batch_tokens, window_size=window_size)
        self.peak_tflops = peak_tflops
        self._pending_flops: dict[Any, int] = {}

    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        super().setup(trainer, pl_module, stage)  # Lightning's own table first (None for cards it lacks)
        if self.peak_tflops is not None:
            peak: float | None = float(self.peak_tflops) * 1e12
        else:
            from gridgen.training.flops import peak_flops

            device = trainer.strategy.root_device
            dtype = torch.bfloat16 if "bf16" in str(trainer.precision) else torch.float32
            if getattr(trainer.strategy, "param_dtype", None):  # FSDP2 computes in its policy's dtype
                dtype = getattr(torch, trainer.strategy.param_dtype)
            peak = peak_flops(torch.cuda.get_device_name(device), dtype) if device.type == "cuda" else None
        if peak:
            self.available_flops = int(peak)
            for throughput in self._throughputs.values():
                throughput.available_flops = self.available_flops

    @torch.inference_mode()
    def _update(self, trainer: L.Trainer, pl_module: L.LightningModule, batch: Any, iter_num: int) -> None:
        stage = trainer.state.stage
        self._samples[stage] += self.batch_size_fn(batch)
        self._lengths[stage] += self.length_fn(batch)
        self._batches[stage] += 1
        # training FLOPs (forward + backward) only: a validation batch is three forwards, not a training step
        flops = getattr(pl_module, "flops_per_batch", None) if stage.value == "train" else None
        if flops is not None:  # Lightning's Throughput takes the FLOPs since its previous update
            self._pending_flops[stage] = self._pending_flops.get(stage, 0) + int(flops)
        if stage.value == "train" and self._batches[stage] > 1 and not trainer._logger_connector.should_update_logs:
            return  # counted; timed at the next logging step (and at the first batch, the window's start)
        if trainer.strategy.root_device.type == "cuda":
            torch.cuda.synchronize()
        self._throughputs[stage].update(
            time=time.perf_counter() - self._t0s[stage], batches=self._batches[stage], samples=self._samples[stage],
            lengths=self._lengths[stage], flops=self._pending_flops.pop(stage, None),
        )


class StepTimer(L.Callback):
    """Seconds per optimizer step: the one figure that the progress bar, the log lines and their ETA show.

    The time between optimizer steps (data loading included), without the time spent in validation and sample
    grids, and without the run's first step (model warm-up); averaged over the steps so far, then an exponential
    moving average with weight ``smoothing`` once more than ``1 / smoothing`` steps are timed."""

    def __init__(self, smoothing: float = 0.1) -> None:
        if not 0 < smoothing <= 1:
            raise ValueError(f"callbacks.step_timer.smoothing must be in (0, 1], got {smoothing}")
        self.smoothing = smoothing
        self.seconds_per_step: float | None = None
        self._timed = 0
        self._last: tuple[int, float] | None = None
        self._paused = 0.0
        self._pause_start: float | None = None

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._last = None  # the first step (warm-up) only starts the clock

    def on_train_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, outputs: Any, batch: Any,
                           batch_idx: int) -> None:
        step, now = trainer.global_step, time.perf_counter()
        if self._last is not None and step > self._last[0]:
            seconds = (now - self._last[1] - self._paused) / (step - self._last[0])
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
            self._paused += time.perf_counter() - self._pause_start
            self._pause_start = None

    def eta(self, trainer: L.Trainer) -> float | None:
        if self.seconds_per_step is None or not trainer.max_steps or trainer.max_steps < 0:
            return None
        return self.seconds_per_step * max(0, trainer.max_steps - trainer.global_step)


def step_timer(trainer: L.Trainer) -> StepTimer | None:
    return next((c for c in trainer.callbacks if isinstance(c, StepTimer)), None)


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
    s/step, ETA), for log files and SLURM outputs where a progress bar is unreadable; after the first step of a
    long run on CPU, one line with the measured time of that step and the expected duration."""

    def __init__(self, every_n_steps: int = 10, cpu_notice_after_s: float = 120.0) -> None:
        self.every_n_steps = max(1, int(every_n_steps))
        self.cpu_notice_after_s = cpu_notice_after_s
        self._start_step: int | None = None
        self._first: float | None = None
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
        if self._first is not None and step == self._start_step + 1:
            first = time.perf_counter() - self._first
            if pl_module.device.type == "cpu" and first * max(0, (total or 0) - step) > self.cpu_notice_after_s:
                log.warning("step 1 took %.1f s on CPU: the %d steps of this run will take about %s "
                            "(a GPU: strategy=gpu; fewer steps: trainer.max_steps=N)", first, total or 0,
                            format_duration(first * (total or 0)))
        if step % self.every_n_steps or step <= self._start_step:
            return
        figures = "  ".join(f"{k} {v}" for k, v in progress_figures(trainer).items())
        log.info("step %d/%s  %s", step, total if total and total > 0 else "?", figures)
