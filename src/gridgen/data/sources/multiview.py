"""Multi-view renders (Objaverse / Diffusion4D style): one folder of ``num_views`` RGBA views per object.

Views are ordered by the numbers in their names (``000.png`` ... ``023.png``, or GRID's ``multi_frame{k}.png``),
alpha-composited on ``data.source.background`` (black in the paper) and fitted to the cell; all views form
one grid. Each sample carries the cameras of the views: :func:`gridgen.cameras.camera_circle` (paper A.9,
Table 5), in gridgen's camera JSON.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np

from gridgen.cameras import camera_circle
from gridgen.data.sources.base import Clip, FrameSampling, RawItem, SkipInput, check_frame_sizes
from gridgen.data.sources.frames import FrameFolderSource

__all__ = ["MultiViewSource"]


class MultiViewSource(FrameFolderSource):
    """One object per folder, ``num_views`` RGBA views each, composited on a background, all in one grid."""

    kind = "multiview"

    def __init__(self, src: str | Path, *, num_views: int = 24, cameras: str | None = "table5",
                 radius: float = 2.0, background: str | Sequence[int] = "black", **kwargs) -> None:
        super().__init__(src, background=background, **kwargs)
        if not isinstance(num_views, int) or num_views < 1:
            raise ValueError(f"data.source.num_views must be a positive integer, got {num_views!r}")
        self.num_views = num_views
        try:
            self.cameras = camera_circle(num_views, radius, cameras) if cameras else None
        except ValueError as err:
            raise ValueError(f"data.source.cameras={cameras!r}: {err}; or null for no cameras") from None

    def load(self, item: RawItem, cell_height: int, cell_width: int, frames_per_grid: int,
             sampling: FrameSampling, rng: np.random.Generator) -> list[Clip]:
        folder, files = self.images(item)
        if len(files) != self.num_views:
            raise SkipInput("view_count", f"{folder}: {len(files)} views, expected {self.num_views}")
        odd = check_frame_sizes([(path.name, self.size(path)) for path in files], str(folder), self.resize_mismatched)
        frames = [self.read(path, cell_height, cell_width) for path in files]
        extra = {"cameras": self.cameras} if self.cameras else {}
        return [Clip(frames, list(range(self.num_views)), None, extra, resized_mismatched=odd)]
