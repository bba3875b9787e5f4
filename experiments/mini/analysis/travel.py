"""Do a `make mini` run's shapes move along the strip (RESULTS-6.md)? Per variant, over the grids where the world's
detector finds a shape in every cell: the median distance in px from the first cell's shape centre to the last
cell's (the largest shape the detector recognises in each cell); the same for the real held-out grids of the
build. A clip of the world moves 0.3 or 0.6 frame sides, or returns to its start (circles).

    python experiments/mini/analysis/travel.py [<make mini output folder>, default outputs/mini] [<build folder>]
"""

import sys
from collections.abc import Iterable
from pathlib import Path

import numpy as np
from PIL import Image

from gridgen.embedded.mini_data import clips_layout
from gridgen.embedded.mini_model import DEFAULT_BUILD
from gridgen.embedded.mini_vae import read_grids
from gridgen.eval.shapes import detect
from gridgen.inference.export import grid_frames
from gridgen.runtime import default_cache_dir

LAYOUT = clips_layout()  # the card's clips (4x4 of 64 px cells): the grids make mini generates
out = Path(sys.argv[1] if len(sys.argv) > 1 else "outputs/mini")
build = Path(sys.argv[2]) if len(sys.argv) > 2 else default_cache_dir() / DEFAULT_BUILD


def travel(grid: np.ndarray) -> float | None:
    """First-to-last cell distance of the largest shape's centre, px; None when a cell holds no shape."""
    centres = []
    for frame in grid_frames(np.array(grid), LAYOUT):  # (16, h, w, 3), a writable copy for torch
        blobs = [b for b in detect(np.ascontiguousarray(frame)) if b.shape is not None]
        if not blobs:
            return None
        centres.append((blobs[0].x, blobs[0].y))
    return float(np.hypot(*np.subtract(centres[-1], centres[0])))


def summary(grids: Iterable[np.ndarray]) -> str:
    distances = [travel(grid) for grid in grids]
    tracked = [d for d in distances if d is not None]
    return (f"{len(tracked)} of {len(distances)} grids with a shape in every cell, first-to-last cell distance "
            f"median {np.median(tracked):.1f} px" if tracked else f"0 of {len(distances)} grids tracked")


print(f"real held-out grids ({build.name}): {summary(read_grids(sorted((build / 'data' / 'clips').glob('test-*.tar'))))}")
for variant in sorted(p.name for p in out.iterdir() if p.is_dir()):
    files = sorted(out.glob(f"{variant}/seed*/grids/*.png"))
    if files:
        print(f"{variant}: {summary(np.asarray(Image.open(f).convert('RGB')) for f in files)}")
