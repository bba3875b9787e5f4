"""Frames -> one grid image: fit every frame to the cell (resize to cover + centre crop), tile, encode.

The cell geometry is the layout's (:class:`~gridgen.layout.GridLayout`); this module only brings pixels to
that geometry. A frame of ``h x w`` px is scaled by ``s = max(cell_w / w, cell_h / h)`` so that it covers the
cell, then the cell is cut from its centre: the aspect ratio is kept, nothing is letterboxed, and a frame
that already has the cell size passes through untouched (bit exact).
"""

from __future__ import annotations

import io
from collections.abc import Sequence

import numpy as np
import torch
from PIL import Image

from gridgen.layout import GridLayout

NAMED_COLORS: dict[str, tuple[int, int, int]] = {
    "black": (0, 0, 0),
    "white": (255, 255, 255),
    "gray": (128, 128, 128),
    "grey": (128, 128, 128),
}
IMAGE_FORMATS = ("jpg", "png")
RESAMPLE = Image.Resampling.BICUBIC


def parse_color(value: str | Sequence[int]) -> tuple[int, int, int]:
    """``"black"``, ``"#ff8000"`` or ``[255, 128, 0]`` -> ``(255, 128, 0)``."""
    if isinstance(value, str):
        text = value.strip().lower()
        if text in NAMED_COLORS:
            return NAMED_COLORS[text]
        if text.startswith("#") and len(text) == 7:
            try:
                return tuple(int(text[i:i + 2], 16) for i in (1, 3, 5))  # type: ignore[return-value]
            except ValueError:
                pass
    elif len(value) == 3 and all(isinstance(c, int) and 0 <= c <= 255 for c in value):
        return tuple(int(c) for c in value)  # type: ignore[return-value]
    raise ValueError(
        f"background colour must be one of {sorted(NAMED_COLORS)}, '#rrggbb' or [r, g, b] in 0..255, got {value!r}"
    )


def cover_size(height: int, width: int, cell_height: int, cell_width: int) -> tuple[int, int]:
    """The smallest ``(h, w)`` with the frame's aspect that covers a ``cell_height x cell_width`` cell."""
    scale = max(cell_height / height, cell_width / width)
    return max(cell_height, round(height * scale)), max(cell_width, round(width * scale))


def center_crop(frame: np.ndarray, height: int, width: int) -> np.ndarray:
    """The central ``height x width`` window of ``frame (h, w, C)``."""
    h, w = frame.shape[:2]
    top, left = (h - height) // 2, (w - width) // 2
    return frame[top:top + height, left:left + width]


def fit_to_cell(frame: np.ndarray, cell_height: int, cell_width: int) -> np.ndarray:
    """Resize ``frame (h, w, 3)`` uint8 to cover the cell and cut the cell from its centre."""
    h, w = frame.shape[:2]
    if (h, w) == (cell_height, cell_width):
        return frame
    ch, cw = cover_size(h, w, cell_height, cell_width)
    if (ch, cw) != (h, w):
        frame = np.asarray(Image.fromarray(frame).resize((cw, ch), RESAMPLE))
    return center_crop(frame, cell_height, cell_width)


def composite(rgba: np.ndarray, background: tuple[int, int, int]) -> np.ndarray:
    """Straight-alpha RGBA ``(h, w, 4)`` uint8 over an opaque background -> RGB ``(h, w, 3)`` uint8.

    ``out = round((rgb * a + bg * (255 - a)) / 255)``, exact in integers (255 is odd, so there are no ties).
    """
    if rgba.ndim != 3 or rgba.shape[2] != 4:
        raise ValueError(f"expected an (h, w, 4) RGBA image, got shape {rgba.shape}")
    rgb = rgba[..., :3].astype(np.uint32)
    alpha = rgba[..., 3:].astype(np.uint32)
    bg = np.asarray(background, dtype=np.uint32)
    return ((rgb * alpha + bg * (255 - alpha) + 127) // 255).astype(np.uint8)


def to_rgb(image: Image.Image, background: tuple[int, int, int]) -> np.ndarray:
    """Any PIL image -> RGB uint8 array; transparency is composited on ``background``."""
    if image.mode in ("RGBA", "LA", "PA") or (image.mode == "P" and "transparency" in image.info):
        return composite(np.asarray(image.convert("RGBA")), background)
    return np.asarray(image.convert("RGB"))


def tile_frames(frames: Sequence[np.ndarray], layout: GridLayout) -> np.ndarray:
    """``rows*cols`` frames ``(cell_h, cell_w, 3)`` -> grid ``(H, W, 3)`` uint8 in film-strip order."""
    expected = (layout.cell_height, layout.cell_width, 3)
    for k, frame in enumerate(frames):
        if frame.shape != expected:
            raise ValueError(f"frame {k} has shape {frame.shape}, layout {layout.name} cells need {expected}")
    h, w = layout.cell_height, layout.cell_width
    # Channels-last rows are (w*3)-wide lines of bytes, so tiling frames seen as one-channel (h, w*3) images
    # places every pixel where tiling (3, h, w) frames would, and yields the (H, W, 3) grid in one copy.
    stack = torch.from_numpy(np.stack(frames)).reshape(len(frames), 1, h, w * 3)  # (F, 1, h, w*3)
    grid = layout.tile(stack)  # (1, rows*h, cols*w*3)
    return grid.reshape(layout.height, layout.width, 3).numpy()  # (H, W, 3)


def encode_image(grid: np.ndarray, image_format: str = "jpg", quality: int = 95) -> bytes:
    """Encode an RGB grid ``(H, W, 3)`` as JPEG (``quality``, 4:2:0) or lossless PNG.

    JPEG codes 16x16 px blocks (8x8 luma, 4:2:0 chroma) and cells are multiples of 16 px, so no block and no
    subsampled chroma sample straddles two cells: compression never blends neighbouring frames.
    """
    with io.BytesIO() as stream:
        image = Image.fromarray(grid, "RGB")
        if image_format == "jpg":
            image.save(stream, format="JPEG", quality=int(quality), subsampling="4:2:0", optimize=False)
        elif image_format == "png":
            image.save(stream, format="PNG", compress_level=6)
        else:
            raise ValueError(f"prepare.image_format must be one of {IMAGE_FORMATS}, got {image_format!r}")
        return stream.getvalue()
