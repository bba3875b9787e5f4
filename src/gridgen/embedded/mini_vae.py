"""The miniature world's VAE: a small diffusers ``AutoencoderKL`` with FLUX's layout (16 latent channels, spatial
factor 8, no quant convs), trained on single 64 px frames, with the latent shift and scale computed from the data.

FLUX normalises latents as ``(z - shift_factor) * scaling_factor``; here both come from the encoded training
frames (mean and ``1 / std`` over all latent values), as black-forest-labs derived FLUX's own.
"""

from __future__ import annotations

import io
import logging
import math
import tarfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image

from gridgen.embedded.flux_tiny import TINY_VAE_CONFIG

log = logging.getLogger(__name__)

# FLUX's VAE layout (the tiny pipeline's: 4 blocks, factor 8; 16 latent channels; no quant convs), wider, for 64 px
# frames; shift_factor/scaling_factor are set from the data by train_vae.
MINI_VAE_CONFIG: dict[str, Any] = {**TINY_VAE_CONFIG, "block_out_channels": (16, 32, 64, 64), "norm_num_groups": 8,
                                   "sample_size": 64}


def read_grids(shards: list[Path]) -> Iterator[np.ndarray]:
    """The PNG grids in ``shards`` (plain tar members, decoded by PIL), each uint8 ``(H, W, 3)``."""
    for shard in shards:
        with tarfile.open(shard) as tar:
            for member in tar:
                if member.name.endswith(".png"):
                    yield np.asarray(Image.open(io.BytesIO(tar.extractfile(member).read())).convert("RGB"))


def read_cells(shards: list[Path], cell: int) -> np.ndarray:
    """Every ``cell``-px cell of the PNG grids in ``shards``: ``(N, cell, cell, 3)`` uint8. Frames of a 1x1 set are
    cells too."""
    cells = []
    for grid in read_grids(shards):
        rows, cols = grid.shape[0] // cell, grid.shape[1] // cell
        # (rows*cell, cols*cell, 3) -> (rows, cell, cols, cell, 3) -> (rows*cols, cell, cell, 3)
        cells.append(grid.reshape(rows, cell, cols, cell, 3).transpose(0, 2, 1, 3, 4).reshape(-1, cell, cell, 3))
    return np.concatenate(cells)


def to_tensor(cells: np.ndarray) -> torch.Tensor:
    """uint8 ``(N, h, w, 3)`` -> float ``(N, 3, h, w)`` in [-1, 1], the VAE's input range."""
    return torch.from_numpy(cells).permute(0, 3, 1, 2).float() / 127.5 - 1.0


def _reconstructions(vae: Any, cells: np.ndarray, batch: int) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """``(x, recon)`` per batch of ``cells``, both ``(b, 3, h, w)`` in [-1, 1], through the posterior mode."""
    with torch.no_grad():
        for start in range(0, len(cells), batch):
            x = to_tensor(cells[start:start + batch])
            yield x, vae.decode(vae.encode(x).latent_dist.mode()).sample.clamp(-1, 1)


def psnr(vae: Any, cells: np.ndarray, batch: int = 256) -> float:
    """Reconstruction PSNR (dB, images in [0, 1], mean squared error over all pixels) through the posterior mode."""
    errors = [((recon - x) / 2).pow(2).flatten(1).mean(1) for x, recon in _reconstructions(vae, cells, batch)]
    return float(10 * math.log10(1.0 / torch.cat(errors).mean().item()))


def reconstruct(vae: Any, cells: np.ndarray, batch: int = 256) -> np.ndarray:
    """The VAE's reconstructions of uint8 ``cells`` ``(N, h, w, 3)``, as uint8 ``(N, h, w, 3)``."""
    return np.concatenate([((recon + 1) * 127.5).round().to(torch.uint8).permute(0, 2, 3, 1).numpy()
                           for _, recon in _reconstructions(vae, cells, batch)])


def train_vae(train: np.ndarray, held_out: np.ndarray, *, steps: int, batch_size: int = 32, lr: float = 2e-3,
              kl_weight: float = 1e-6, seed: int = 0, progress: Callable[[int, dict[str, float]], None] | None = None
              ) -> tuple[Any, dict[str, float]]:
    """Train ``AutoencoderKL(**MINI_VAE_CONFIG)`` on ``train`` cells (MSE + ``kl_weight`` KL, AdamW, cosine lr) and
    set its ``shift_factor``/``scaling_factor`` from the training latents; returns it and its figures (held-out
    PSNR, shift, scale, seconds)."""
    from diffusers import AutoencoderKL

    torch.manual_seed(seed)
    vae = AutoencoderKL(**MINI_VAE_CONFIG)
    optimizer = torch.optim.AdamW(vae.parameters(), lr=lr, weight_decay=0.0)
    schedule = torch.optim.lr_scheduler.OneCycleLR(optimizer, max_lr=lr, total_steps=steps, pct_start=0.05)
    generator = torch.Generator().manual_seed(seed)
    started = time.perf_counter()
    vae.train()
    for step in range(1, steps + 1):
        index = torch.randint(len(train), (batch_size,), generator=generator)
        x = to_tensor(train[index.numpy()])
        posterior = vae.encode(x).latent_dist
        recon = vae.decode(posterior.sample(generator=generator)).sample
        mse = (recon - x).pow(2).mean()
        kl = posterior.kl().mean() / x[0].numel()
        loss = mse + kl_weight * kl
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(vae.parameters(), 1.0)
        optimizer.step()
        schedule.step()
        if progress is not None:
            progress(step, {"mse": float(mse.detach()), "kl": float(kl.detach())})
    vae.eval()
    with torch.no_grad():  # FLUX's normalisation, from the data: z' = (z - shift) * scale has mean 0, std 1
        latents = torch.cat([vae.encode(to_tensor(train[i:i + 256])).latent_dist.mode()
                             for i in range(0, min(len(train), 4096), 256)])
    shift, scale = float(latents.mean()), float(1.0 / latents.std())
    vae.register_to_config(shift_factor=shift, scaling_factor=scale)
    figures = {"psnr_db": psnr(vae, held_out), "shift_factor": shift, "scaling_factor": scale,
               "seconds": time.perf_counter() - started, "steps": steps, "train_cells": len(train),
               "held_out_cells": len(held_out)}
    return vae, figures
