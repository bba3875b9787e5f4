"""Large generations: a grid over ``generate.large`` runs only with ``generate.allow_large=true``.

A 100x100 layout is a legal request that writes 10,000 frame files and runs for minutes, so it must be asked for
explicitly. The refusal states what the run would cost, measured rather than guessed: one denoising step and one
VAE decode of one grid at the requested size, and the export of a few of its frames (PNG, mp4, GIF) into a
temporary folder, scaled to the run (x steps and grids for sampling, x frames and grids for the files).
"""

from __future__ import annotations

import os
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from gridgen.inference.export import grid_frames, save_png, to_uint8, write_frames, write_gif, write_mp4
from gridgen.layout import GridLayout

ALLOW_KEY = "generate.allow_large"
PROBE_FRAMES = 32  # frames exported to measure the per-frame cost of the files
LATENT_BYTES_PER_TOKEN = 64 * 4  # export.latents: float32 (N, 64)


class LargeGenerationError(ValueError):
    """A grid over ``generate.large`` without ``generate.allow_large=true`` (one line, exit code 2)."""


def oversize(layout: GridLayout, limits: Any) -> list[str]:
    """Why one grid of ``layout`` is large (``generate.large``: frames or megapixels per grid), else ``[]``."""
    reasons = []
    if layout.num_cells > int(limits.frames):
        reasons.append(f"{layout.num_cells:,} frames per grid > generate.large.frames={limits.frames}")
    megapixels = layout.height * layout.width / 1e6
    if megapixels > float(limits.megapixels):
        reasons.append(f"{megapixels:.1f} Mpx per grid > generate.large.megapixels={limits.megapixels}")
    return reasons


@dataclass(frozen=True)
class GridCost:
    """Measured cost of one grid: one denoising step, the VAE decode, writing its files, their bytes."""

    step_s: float
    decode_s: float
    export_s: float
    bytes: int
    disk_bytes: int  # bytes rounded up to whole blocks of the output's filesystem, file by file
    block: int
    probed_frames: int

    def seconds(self, steps: int, grids: int) -> float:
        return grids * (self.step_s * steps + self.decode_s + self.export_s)


def _synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def block_size(path: Path) -> int:
    """The block size of the filesystem that holds ``path`` (its nearest existing folder); 4096 where unknown."""
    folder = Path(path).expanduser().absolute()
    while not folder.exists() and folder != folder.parent:
        folder = folder.parent
    try:
        return os.statvfs(folder).f_bsize or 4096
    except (AttributeError, OSError):  # no statvfs (Windows)
        return 4096


def measure_grid_cost(sampler: Any, layout: GridLayout, caption: str, seed: int, guidance: float,
                      export: Any, out: Path, **sample_kwargs: Any) -> GridCost:
    """Sample one step of one grid (``sample_kwargs``: e.g. true CFG, which doubles the step), decode it, and write
    ``PROBE_FRAMES`` of its frames (as ``export`` asks) and its grid PNG into a temporary folder; frame costs are
    scaled to all ``layout.num_cells`` frames. Disk use counts whole blocks of the filesystem of ``out`` (10,000
    small PNGs take more blocks than bytes)."""
    block = block_size(out)

    def on_disk(paths: list[Path]) -> int:
        return sum(-(-p.stat().st_size // block) * block for p in paths)

    text = sampler.encode_text([caption])
    started = time.perf_counter()
    latents = sampler.sample(layout, text, [seed], steps=1, T=1.0, guidance=guidance,
                             **sample_kwargs)  # (1, N, 64): one forward (two with true CFG)
    _synchronize(sampler.device)
    step_s = time.perf_counter() - started
    started = time.perf_counter()
    grid = to_uint8(sampler.decode(latents, layout))[0]  # (H, W, 3)
    _synchronize(sampler.device)
    decode_s = time.perf_counter() - started

    frames = grid_frames(grid, layout)[:PROBE_FRAMES]  # (k, h, w, 3)
    scale = layout.num_cells / len(frames)
    with tempfile.TemporaryDirectory(prefix="gridgen-probe-") as tmp:
        folder = Path(tmp)
        started = time.perf_counter()
        grid_png = save_png(folder / "grid.png", grid)
        grid_s, grid_bytes, grid_disk = time.perf_counter() - started, grid_png.stat().st_size, on_disk([grid_png])
        started = time.perf_counter()
        written = write_frames(folder / "frames", frames) if export.frames else []
        if export.mp4:
            written.append(write_mp4(folder / "frames.mp4", frames, int(export.fps)))
        if export.gif:
            written.append(write_gif(folder / "frames.gif", frames, int(export.fps)))
        frames_s, frames_bytes = time.perf_counter() - started, sum(p.stat().st_size for p in written)
        frames_disk = on_disk(written)
    latent_bytes = layout.num_tokens * LATENT_BYTES_PER_TOKEN if export.latents else 0
    return GridCost(step_s, decode_s, grid_s + frames_s * scale, round(grid_bytes + frames_bytes * scale + latent_bytes),
                    round(grid_disk + frames_disk * scale + latent_bytes), block, len(frames))


def _duration(seconds: float) -> str:
    return f"{seconds:.0f} s" if seconds < 120 else f"{seconds / 60:.0f} min" if seconds < 7200 else \
        f"{seconds / 3600:.1f} h"


def refusal(layout: GridLayout, reasons: list[str], cost: GridCost, steps: int, grids: int) -> LargeGenerationError:
    """The one-line refusal with the measured estimate of time and disk."""
    return LargeGenerationError(
        f"layout {layout.name} at {layout.height}x{layout.width} px is a large generation ({'; '.join(reasons)}): "
        f"{grids} grid{'s' if grids != 1 else ''} would take about {_duration(cost.seconds(steps, grids))} "
        f"(per grid, measured here: {steps} steps x {cost.step_s:.2f} s, decoding {cost.decode_s:.2f} s, writing "
        f"files {cost.export_s:.1f} s) and export {layout.num_cells * grids:,} frames, about "
        f"{cost.bytes * grids / 1e6:,.1f} MB ({cost.disk_bytes * grids / 1e6:,.1f} MB on disk in {cost.block} B "
        f"blocks; measured on {cost.probed_frames} of each grid's {layout.num_cells:,} frames); set {ALLOW_KEY}=true to run it, or choose a smaller layout or grid size"
    )
