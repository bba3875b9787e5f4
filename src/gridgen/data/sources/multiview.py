"""Multi-view renders (Objaverse / Diffusion4D style): one folder of ``num_views`` RGBA views per object.

Views are ordered by the numbers in their names (``000.png`` ... ``023.png``, or GRID's ``multi_frame{k}.png``),
alpha-composited on ``data.source.background`` (black in the paper) and fitted to the cell; all views form
one grid. Each sample carries the cameras of the views (:func:`camera_circle`).

Cameras (paper appendix A.9, Table 5): 24 cameras on a circle of radius 2 in the horizontal plane of a z-up
world, looking at the origin. Camera ``k`` at azimuth ``theta_k`` has, in OpenCV convention (x right, y down,
z forward), the camera-to-world axes ``X = (cos t, sin t, 0)``, ``Y = (0, 0, -1)``, ``Z = (-sin t, cos t, 0)``
and origin ``(2 sin t, -2 cos t, 0)``. The table's numbers put the cameras at ``theta_k = 360 k / 23``
(``linspace(0, 360, 24)``: 15.65 deg apart, the last view repeating the first), and list them in the
lexicographic order of the file names (0, 1, 10, 11, ..., 19, 2, 20, ...). ``spacing="table5"`` reproduces
those numbers; ``spacing="uniform"`` gives the 15 deg steps (``360 k / 24``) that the paper's text states.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from gridgen.data.sources.base import Clip, FrameSampling, RawItem, SkipInput, check_frame_sizes, list_images
from gridgen.data.sources.frames import FrameFolderSource

CAMERA_CONVENTION = "opencv camera-to-world (x right, y down, z forward), world z up"
CAMERA_SPACINGS = ("table5", "uniform")


def camera_azimuths(num_views: int = 24, spacing: str = "table5") -> list[float]:
    """Azimuths in degrees of the views, in view (orbit) order."""
    if spacing == "table5":
        return [360.0 * k / (num_views - 1) for k in range(num_views)] if num_views > 1 else [0.0]
    if spacing == "uniform":
        return [360.0 * k / num_views for k in range(num_views)]
    raise ValueError(f"data.source.cameras must be one of {CAMERA_SPACINGS} or null, got {spacing!r}")


def camera_to_world(azimuth_deg: float, radius: float = 2.0) -> np.ndarray:
    """The ``(4, 4)`` camera-to-world matrix of the Table 5 camera at ``azimuth_deg`` (columns X, Y, Z, origin)."""
    t = math.radians(azimuth_deg)
    c2w = np.eye(4)
    c2w[:3, 0] = (math.cos(t), math.sin(t), 0.0)  # X: image right
    c2w[:3, 1] = (0.0, 0.0, -1.0)  # Y: image down = world -z
    c2w[:3, 2] = (-math.sin(t), math.cos(t), 0.0)  # Z: viewing direction, towards the origin
    c2w[:3, 3] = (radius * math.sin(t), -radius * math.cos(t), 0.0)
    return c2w


def camera_circle(num_views: int = 24, radius: float = 2.0, spacing: str = "table5") -> dict:
    """The cameras of ``num_views`` views as written into a sample's json."""
    azimuths = camera_azimuths(num_views, spacing)
    return {
        "convention": CAMERA_CONVENTION,
        "spacing": spacing,
        "radius": float(radius),
        "elevation_deg": 0.0,
        "azimuth_deg": [round(a, 6) for a in azimuths],
        "c2w": [np.round(camera_to_world(a, radius), 6).tolist() for a in azimuths],
    }


class MultiViewSource(FrameFolderSource):
    """One object per folder, ``num_views`` RGBA views each, composited on a background, all in one grid."""

    kind = "multiview"

    def __init__(self, src: str | Path, *, num_views: int = 24, cameras: str | None = "table5",
                 radius: float = 2.0, background: str | Sequence[int] = "black", **kwargs) -> None:
        super().__init__(src, background=background, **kwargs)
        if not isinstance(num_views, int) or num_views < 1:
            raise ValueError(f"data.source.num_views must be a positive integer, got {num_views!r}")
        self.num_views = num_views
        self.cameras = camera_circle(num_views, radius, cameras) if cameras else None

    def load(self, item: RawItem, cell_height: int, cell_width: int, frames_per_grid: int,
             sampling: FrameSampling, rng: np.random.Generator) -> list[Clip]:
        folder = Path(item.path)
        if not folder.is_dir():
            raise SkipInput("missing_file", str(folder))
        files = list_images(folder)
        if len(files) != self.num_views:
            raise SkipInput("view_count", f"{folder}: {len(files)} views, expected {self.num_views}")
        odd = check_frame_sizes([(path.name, self.size(path)) for path in files], str(folder), self.resize_mismatched)
        frames = [self.read(path, cell_height, cell_width) for path in files]
        extra = {"cameras": self.cameras} if self.cameras else {}
        return [Clip(frames, list(range(self.num_views)), None, extra, resized_mismatched=odd)]
