"""Decisions about where a process runs: the ``auto`` device, the W&B mode, the default cache folder."""

from __future__ import annotations

import os
from pathlib import Path

import torch


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
