"""Export of generated grids: the grid PNG, every frame (view) as PNG, an mp4 and a GIF, multi-view cameras, manifest.

Frames are cut from the grid by the layout (film-strip order), never by arithmetic here. Images are
``(H, W, 3)`` uint8 arrays, converted from [-1, 1] tensors exactly as diffusers' ``VaeImageProcessor`` does.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image

from gridgen.files import write_text_atomic
from gridgen.layout import GridLayout
from gridgen.video import H264_OR_MPEG4, first_encoder, write_video

log = logging.getLogger(__name__)


def to_uint8(images: torch.Tensor) -> np.ndarray:
    """``(..., 3, H, W)`` in [-1, 1] -> ``(..., H, W, 3)`` uint8 (diffusers: ``(x / 2 + 0.5).clamp(0, 1)``, ``* 255``, round)."""
    x = (images.detach().float().cpu() / 2 + 0.5).clamp(0, 1)
    return (x.movedim(-3, -1).numpy() * 255).round().astype(np.uint8)


def grid_frames(grid: np.ndarray, layout: GridLayout) -> np.ndarray:
    """Grid image ``(H, W, 3)`` -> frames ``(F, h, w, 3)`` in film-strip order (``GridLayout.untile``)."""
    frames = layout.untile(torch.from_numpy(grid).permute(2, 0, 1))  # (F, 3, h, w)
    return frames.permute(0, 2, 3, 1).numpy()


def save_png(path: Path, image: np.ndarray) -> Path:
    Image.fromarray(image, "RGB").save(path, format="PNG")
    return path


def write_frames(folder: Path, frames: np.ndarray, stem: str = "frame") -> list[Path]:
    folder.mkdir(parents=True, exist_ok=True)
    width = max(3, len(str(len(frames) - 1)))
    return [save_png(folder / f"{stem}_{k:0{width}d}.png", frame) for k, frame in enumerate(frames)]


def write_mp4(path: Path, frames: np.ndarray, fps: int = 8, crf: int = 18) -> Path:
    """Frames ``(F, h, w, 3)`` uint8 -> H.264 mp4 (yuv420p, plays everywhere); MPEG-4 part 2 without libx264."""
    codec = first_encoder(H264_OR_MPEG4)
    if codec is None:
        raise RuntimeError(f"this PyAV/FFmpeg build has none of the encoders {H264_OR_MPEG4}; set export.mp4=false")
    if codec == "libx264":
        return write_video(path, frames, int(fps), codec, options={"crf": str(crf), "preset": "medium"})
    _, height, width, _ = frames.shape
    return write_video(path, frames, int(fps), codec, bit_rate=max(400_000, width * height * int(fps) * 2))


def write_gif(path: Path, frames: np.ndarray, fps: int = 8) -> Path:
    images = [Image.fromarray(f, "RGB") for f in frames]
    duration = 10 * max(1, round(100 / fps))  # GIF frame delays are whole centiseconds
    images[0].save(path, format="GIF", save_all=True, append_images=images[1:], duration=duration,
                   loop=0, optimize=False)
    return path


# ---- one sample and the manifest ------------------------------------------------------------------------
def export_sample(folder: Path, grid: np.ndarray, layout: GridLayout, kind: str = "video", fps: int = 8,
                  frames: bool = True, mp4: bool = True, gif: bool = True,
                  cameras: dict[str, Any] | None = None) -> dict[str, Any]:
    """Write one generated grid; returns the files written, relative to ``folder``'s parent."""
    folder.mkdir(parents=True, exist_ok=True)
    stem = "view" if kind == "multiview" else "frame"
    files: dict[str, Any] = {"grid": save_png(folder / "grid.png", grid)}
    sequence = grid_frames(grid, layout)  # (F, h, w, 3)
    if frames:
        files[f"{stem}s"] = write_frames(folder / f"{stem}s", sequence, stem)
    if mp4:
        files["mp4"] = write_mp4(folder / f"{stem}s.mp4", sequence, fps)
    if gif:
        files["gif"] = write_gif(folder / f"{stem}s.gif", sequence, fps)
    if cameras is not None:
        path = folder / "cameras.json"
        path.write_text(json.dumps(cameras, indent=2))
        files["cameras"] = path
    root = folder.parent

    def rel(value: Any) -> Any:
        return [rel(v) for v in value] if isinstance(value, list) else str(Path(value).relative_to(root))

    return {key: rel(value) for key, value in files.items()}


def write_manifest(path: Path, manifest: dict[str, Any]) -> Path:
    return write_text_atomic(path, json.dumps(manifest, indent=2, default=str))

