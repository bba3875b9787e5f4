"""Decisions about where a process runs: the ``auto`` device, glibc's malloc on the CPU, the W&B mode, the default
cache folder."""

from __future__ import annotations

import ctypes
import logging
import os
import sys
from pathlib import Path
from typing import Any

import torch

log = logging.getLogger(__name__)

MALLOC_MMAP_THRESHOLD = 64 << 20
# the same glibc settings for a child process, through its environment (see tune_malloc)
MALLOC_ENV = {"MALLOC_MMAP_THRESHOLD_": str(MALLOC_MMAP_THRESHOLD), "MALLOC_TRIM_THRESHOLD_": str(1 << 30)}


def resolve_device(name: str | None, setting: str, local_rank: int | None = None) -> torch.device:
    """The device a ``<setting>=<name>`` asks for.

    ``auto`` (or empty) is CUDA when a CUDA device is visible, else the CPU; ``local_rank`` picks this process's
    GPU (``cuda:<local_rank>``) where several processes share a node. A CUDA device that is not there is refused
    with one line naming ``setting``, rather than failing later inside a model.
    """
    if name in (None, "", "auto"):
        if not torch.cuda.is_available():
            return torch.device("cpu")
        return torch.device("cuda" if local_rank is None else f"cuda:{local_rank}")
    try:
        device = torch.device(str(name))
    except RuntimeError as err:
        raise ValueError(f"{setting}={name} is not a device; use {setting}=auto, cpu or cuda") from err
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"{setting}={name} but no CUDA device is available; use {setting}=cpu")
    return device


def wandb_offline() -> bool:
    """W&B runs offline unless an API key is set or ``WANDB_MODE=online`` asks for it (clusters are often offline;
    ``wandb sync`` uploads later)."""
    return not (os.environ.get("WANDB_API_KEY") or os.environ.get("WANDB_MODE") == "online")


def default_cache_dir() -> Path:
    """``$GRIDGEN_CACHE`` if set, else ``~/.cache/gridgen``: the embedded model and the sample data (the same rule
    as ``paths.cache_dir`` in ``conf/paths/default.yaml``)."""
    return Path(os.environ.get("GRIDGEN_CACHE") or "~/.cache/gridgen").expanduser()


def libc() -> Any | None:
    """glibc, or None where there is none (macOS, Windows, musl)."""
    if sys.platform != "linux":
        return None
    try:
        return ctypes.CDLL("libc.so.6")
    except OSError:
        return None


def tune_malloc() -> bool:
    """Fix glibc's mmap threshold (64 MiB) and never auto-trim; True where it was set.

    By default glibc serves large blocks with mmap and raises the threshold only as such blocks are freed, and
    hands the top of the heap back to the kernel whenever it is free: a CPU training or sampling step then maps,
    faults in and unmaps its activations again and again. On the 2-core VM this was measured at ~13 s per step for
    the first 3 steps of a process; later steps of the miniature's LoRA recipe: 1.19x in ``bench/bench_train.py``'s
    bare loop (section 6), 1.045x in an eager ``gridgen.train`` run and none compiled (experiments/mini/
    step_time_v8.md, where the LoRAs trained either way are bit-identical). Memory freed stays with the process
    (its peak, not its current need, is what it holds). ``MALLOC_ENV`` does the same for a child process.
    """
    lib = libc()
    if lib is None:
        return False
    m_trim_threshold, m_mmap_threshold = -1, -3
    return bool(lib.mallopt(m_mmap_threshold, MALLOC_MMAP_THRESHOLD)) and bool(lib.mallopt(m_trim_threshold, 1 << 30))


def tune_cpu_process(device: torch.device | str) -> bool:
    """:func:`tune_malloc` for a process that computes on the CPU, unless the environment sets glibc's thresholds
    itself (``MALLOC_MMAP_THRESHOLD_``, ``MALLOC_TRIM_THRESHOLD_``: the user's choice stands). True where tuned."""
    if torch.device(device).type != "cpu" or any(key in os.environ for key in MALLOC_ENV):
        return False
    tuned = tune_malloc()
    if tuned:
        log.debug("glibc malloc tuned for CPU compute (mmap threshold %d MiB, no auto-trim)", MALLOC_MMAP_THRESHOLD >> 20)
    return tuned
