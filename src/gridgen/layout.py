"""Grid layout: where every frame of a sequence lives in the grid image, its latents and its FLUX tokens.

A sequence of ``rows * cols`` frames is tiled row-major, like a film strip: frame ``k`` sits in cell
``(k // cols, k % cols)``. FLUX encodes an image with a VAE that downsamples by 8 and then packs 2x2 latent
patches into one token, so one token covers 16x16 pixels and a cell of ``cell_height x cell_width`` pixels
is ``cell_height/16 x cell_width/16`` tokens. Every other part of gridgen (data tiling, the temporal loss,
inference masks, frame export) asks this module where a cell is.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

import torch

VAE_SCALE_FACTOR = 8  # FLUX VAE: pixels per latent pixel
PATCH_SIZE = 2  # FLUX packs 2x2 latent pixels into one token
PIXELS_PER_TOKEN = VAE_SCALE_FACTOR * PATCH_SIZE  # 16

_LAYOUT_RE = re.compile(r"^\s*(\d+)\s*[xX×]\s*(\d+)\s*$")

LAYOUT_CAPTIONS = {
    "video": "A {frames}-frame sequence arranged in a {rows}x{cols} grid.",
    "multiview": "A {frames}-view sequence arranged in a {rows}x{cols} grid.",
}


@dataclass(frozen=True)
class GridLayout:
    """An ``rows x cols`` grid of cells of ``cell_height x cell_width`` pixels, frames ordered row-major."""

    rows: int
    cols: int
    cell_height: int
    cell_width: int

    def __post_init__(self) -> None:
        for name in ("rows", "cols"):
            value = getattr(self, name)
            if not isinstance(value, int) or value < 1:
                raise ValueError(f"layout {name} must be a positive integer, got {value!r}")
        for name in ("cell_height", "cell_width"):
            value = getattr(self, name)
            if not isinstance(value, int) or value < PIXELS_PER_TOKEN or value % PIXELS_PER_TOKEN:
                raise ValueError(
                    f"layout {self.rows}x{self.cols}: {name} must be a positive multiple of "
                    f"{PIXELS_PER_TOKEN} px (VAE factor {VAE_SCALE_FACTOR} x {PATCH_SIZE}x{PATCH_SIZE} packing), "
                    f"got {value!r}; pick e.g. {max(PIXELS_PER_TOKEN, round(value / PIXELS_PER_TOKEN) * PIXELS_PER_TOKEN) if isinstance(value, int) else 256}"
                )

    # ---- construction ---------------------------------------------------------------------------
    @classmethod
    def parse(cls, spec: str, cell_height: int, cell_width: int | None = None) -> GridLayout:
        """``GridLayout.parse("4x6", 256)`` -> 4 rows, 6 columns of 256x256 px cells."""
        match = _LAYOUT_RE.match(str(spec))
        if not match:
            raise ValueError(f"layout must look like '<rows>x<cols>' (e.g. '4x6'), got {spec!r}")
        return cls(int(match[1]), int(match[2]), int(cell_height), int(cell_width or cell_height))

    @classmethod
    def from_image_size(cls, rows: int, cols: int, height: int, width: int) -> GridLayout:
        """The layout that splits a ``height x width`` grid image into ``rows x cols`` cells."""
        if height % rows or width % cols:
            raise ValueError(
                f"layout {rows}x{cols} needs a grid height divisible by {rows} and width divisible by {cols}, "
                f"got {height}x{width} px; resize the grid to a multiple of "
                f"{rows * PIXELS_PER_TOKEN}x{cols * PIXELS_PER_TOKEN} px"
            )
        return cls(rows, cols, height // rows, width // cols)

    # ---- pixel / latent / token geometry --------------------------------------------------------
    @property
    def name(self) -> str:
        return f"{self.rows}x{self.cols}"

    @property
    def num_cells(self) -> int:
        return self.rows * self.cols

    @property
    def height(self) -> int:
        return self.rows * self.cell_height

    @property
    def width(self) -> int:
        return self.cols * self.cell_width

    @property
    def latent_height(self) -> int:
        return self.height // VAE_SCALE_FACTOR

    @property
    def latent_width(self) -> int:
        return self.width // VAE_SCALE_FACTOR

    @property
    def token_rows(self) -> int:
        return self.height // PIXELS_PER_TOKEN

    @property
    def token_cols(self) -> int:
        return self.width // PIXELS_PER_TOKEN

    @property
    def num_tokens(self) -> int:
        return self.token_rows * self.token_cols

    @property
    def cell_token_rows(self) -> int:
        return self.cell_height // PIXELS_PER_TOKEN

    @property
    def cell_token_cols(self) -> int:
        return self.cell_width // PIXELS_PER_TOKEN

    @property
    def cell_tokens(self) -> int:
        return self.cell_token_rows * self.cell_token_cols

    def cell_of_frame(self, frame: int) -> tuple[int, int]:
        """Row-major film-strip order: frame k -> (k // cols, k % cols)."""
        if not 0 <= frame < self.num_cells:
            raise IndexError(f"frame {frame} outside layout {self.name} ({self.num_cells} cells)")
        return divmod(frame, self.cols)

    def image_ids(self, device: torch.device | str | None = None, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """FLUX image position ids, ``(num_tokens, 3)``: (0, token_row, token_col), row-major like packing."""
        ids = torch.zeros(self.token_rows, self.token_cols, 3, device=device, dtype=dtype)
        ids[..., 1] = torch.arange(self.token_rows, device=device, dtype=dtype)[:, None]
        ids[..., 2] = torch.arange(self.token_cols, device=device, dtype=dtype)[None, :]
        return ids.reshape(self.num_tokens, 3)

    # ---- captions --------------------------------------------------------------------------------
    def caption_prefix(self, kind: str = "video", template: str | None = None) -> str:
        """``c_layout``: "A 24-frame sequence arranged in a 4x6 grid." (paper section 2.2)."""
        if template is None:
            if kind not in LAYOUT_CAPTIONS:
                raise ValueError(f"caption kind must be one of {sorted(LAYOUT_CAPTIONS)}, got {kind!r}")
            template = LAYOUT_CAPTIONS[kind]
        return template.format(frames=self.num_cells, rows=self.rows, cols=self.cols)

    def caption(self, content: str, kind: str = "video", template: str | None = None) -> str:
        """``c' = [c_layout, c_content]``."""
        return f"{self.caption_prefix(kind, template)} {content.strip()}".strip()

    # ---- tensors: frames <-> grid, tokens <-> cells -------------------------------------------------
    def tile(self, frames: torch.Tensor) -> torch.Tensor:
        """Frames ``(..., F, C, h, w)`` with ``F = rows*cols`` -> grid ``(..., C, rows*h, cols*w)``."""
        *lead, num_frames, channels, h, w = frames.shape
        if num_frames != self.num_cells:
            raise ValueError(f"layout {self.name} holds {self.num_cells} frames, got {num_frames}")
        x = frames.reshape(*lead, self.rows, self.cols, channels, h, w)  # (..., rows, cols, C, h, w)
        x = x.movedim(-3, -5)  # (..., C, rows, cols, h, w)
        x = x.transpose(-3, -2)  # (..., C, rows, h, cols, w)
        return x.reshape(*lead, channels, self.rows * h, self.cols * w)

    def untile(self, grid: torch.Tensor) -> torch.Tensor:
        """Grid ``(..., C, H, W)`` -> frames ``(..., rows*cols, C, H/rows, W/cols)`` in film-strip order.

        Works at any resolution that divides evenly (pixels, latents).
        """
        *lead, channels, height, width = grid.shape
        if height % self.rows or width % self.cols:
            raise ValueError(f"layout {self.name} does not divide a {height}x{width} grid")
        h, w = height // self.rows, width // self.cols
        x = grid.reshape(*lead, channels, self.rows, h, self.cols, w)  # (..., C, rows, h, cols, w)
        x = x.transpose(-3, -2)  # (..., C, rows, cols, h, w)
        x = x.movedim(-5, -3)  # (..., rows, cols, C, h, w)
        return x.reshape(*lead, self.num_cells, channels, h, w)

    def tokens_to_cells(self, tokens: torch.Tensor) -> torch.Tensor:
        """Packed tokens ``(B, N, C)`` -> ``(B, rows*cols, cell_tokens, C)``, cells in film-strip order."""
        batch, num_tokens, channels = tokens.shape
        if num_tokens != self.num_tokens:
            raise ValueError(
                f"layout {self.name} with {self.cell_height}x{self.cell_width} px cells has {self.num_tokens} "
                f"tokens, got {num_tokens}; check the layout and cell size of this batch"
            )
        ch, cw = self.cell_token_rows, self.cell_token_cols
        x = tokens.reshape(batch, self.rows, ch, self.cols, cw, channels)  # (B, rows, ch, cols, cw, C)
        x = x.permute(0, 1, 3, 2, 4, 5)  # (B, rows, cols, ch, cw, C)
        return x.reshape(batch, self.num_cells, ch * cw, channels)

    def cells_to_tokens(self, cells: torch.Tensor) -> torch.Tensor:
        """Inverse of :meth:`tokens_to_cells`: ``(B, rows*cols, cell_tokens, C)`` -> ``(B, N, C)``."""
        batch, _, _, channels = cells.shape
        ch, cw = self.cell_token_rows, self.cell_token_cols
        x = cells.reshape(batch, self.rows, self.cols, ch, cw, channels)  # (B, rows, cols, ch, cw, C)
        x = x.permute(0, 1, 3, 2, 4, 5)  # (B, rows, ch, cols, cw, C)
        return x.reshape(batch, self.num_tokens, channels)

    def to_dict(self) -> dict[str, int]:
        return {"rows": self.rows, "cols": self.cols, "cell_height": self.cell_height, "cell_width": self.cell_width}
