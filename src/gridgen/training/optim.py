"""Optimiser and learning-rate schedule of the LoRA parameters (``optim.*`` in ``conf/train.yaml``).

- ``optim.name=adamw``: ``torch.optim.AdamW`` (paper 3.1: AdamW, lr 1e-4).
- ``optim.name=adamw8bit``: bitsandbytes' ``AdamW8bit`` (Dettmers et al. 2022): the two moment buffers are
  stored in 8 bits with block-wise dynamic quantization (blocks of 256 values), 4x smaller than fp32 state.
  bitsandbytes keeps tensors under 4096 elements in fp32 state (``min_8bit_size``), so the saving shows on
  FLUX.1-dev's LoRA (rank 64: 3072 x 64 per matrix), not on the tiny model's.
- ``optim.scheduler``: ``constant`` or ``cosine`` (to ``min_lr_ratio * lr`` at ``trainer.max_steps``), after
  a linear warmup of ``warmup_steps``; stepped every optimiser step.
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from typing import Any

import torch

OPTIMIZERS = ("adamw", "adamw8bit")
SCHEDULERS = ("constant", "cosine")


def build_optimizer(params: Iterable[torch.nn.Parameter], cfg: dict[str, Any]) -> torch.optim.Optimizer:
    """AdamW (fp32 or 8-bit state) over ``params`` from ``optim.{name, lr, betas, weight_decay, eps}``."""
    name = str(cfg.get("name", "adamw")).lower()
    kwargs = {"lr": float(cfg["lr"]), "betas": tuple(float(b) for b in cfg.get("betas", (0.9, 0.999))),
              "weight_decay": float(cfg.get("weight_decay", 1e-4)), "eps": float(cfg.get("eps", 1e-8))}
    if name == "adamw":
        return torch.optim.AdamW(params, **kwargs)
    if name == "adamw8bit":
        try:
            import bitsandbytes as bnb
        except ImportError as e:
            raise ValueError('optim.name=adamw8bit needs bitsandbytes: pip install -e ".[quant]" '
                             "(or use optim.name=adamw)") from e
        return bnb.optim.AdamW8bit(params, **kwargs)
    raise ValueError(f"optim.name must be one of {', '.join(OPTIMIZERS)}, got {name!r}")


def lr_factor(step: int, scheduler: str = "constant", warmup_steps: int = 0, max_steps: int = 0,
              min_lr_ratio: float = 0.0) -> float:
    """Multiplier of the base learning rate at optimiser step ``step``: linear warmup, then constant or
    cosine decay to ``min_lr_ratio``."""
    if warmup_steps and step < warmup_steps:
        return (step + 1) / warmup_steps
    if scheduler == "constant":
        return 1.0
    if scheduler == "cosine":
        progress = min(1.0, (step - warmup_steps) / max(1, max_steps - warmup_steps))
        return min_lr_ratio + (1 - min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * progress))
    raise ValueError(f"optim.scheduler must be constant or cosine, got {scheduler!r}")


def build_scheduler(optimizer: torch.optim.Optimizer, cfg: dict[str, Any],
                    max_steps: int | None) -> torch.optim.lr_scheduler.LambdaLR:
    """``LambdaLR`` over ``lr_factor`` from ``optim.{scheduler, warmup_steps, min_lr_ratio}``."""
    kind = str(cfg.get("scheduler", "constant"))
    if kind not in SCHEDULERS:
        raise ValueError(f"optim.scheduler must be constant or cosine, got {kind!r}")
    total = int(max_steps or 0)
    if kind == "cosine" and total <= 0:
        raise ValueError("optim.scheduler=cosine needs trainer.max_steps > 0")
    warmup, min_ratio = int(cfg.get("warmup_steps", 0)), float(cfg.get("min_lr_ratio", 0.0))
    return torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda step: lr_factor(step, kind, warmup, total, min_ratio))
