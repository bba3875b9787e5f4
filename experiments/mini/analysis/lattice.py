"""Do a `make mini` run's grids keep the 4x4 lattice of a film strip (one shape inside each cell), or scatter shapes
over the whole image like the base's scenes (RESULTS-5.md)? The world's detector reads each whole grid (shape radius
of the cell's frame scale); per variant, and for the real held-out grids of the build: shapes per grid (a film strip
has 16) and the share of shapes whose centre lies nearer than 0.9 shape radii to an inner cell border, i.e. drawn
across two cells (a clip of the world keeps its shape inside the frame: 0 %).

    python experiments/mini/analysis/lattice.py [<make mini output folder>, default outputs/mini] [<build folder>]

A ``gridgen.evaluate`` / ``gridgen.generate`` output folder (``generated/*/grid.png``) is read as one variant.
"""

import sys
from collections.abc import Iterable
from pathlib import Path

import numpy as np
from PIL import Image

from gridgen.embedded.mini_data import clips_layout
from gridgen.embedded.mini_model import DEFAULT_BUILD
from gridgen.embedded.mini_vae import read_grids
from gridgen.embedded.world import MINI_RADIUS
from gridgen.eval.shapes import detect
from gridgen.runtime import default_cache_dir

LAYOUT = clips_layout()  # the card's clips (4x4): the grids make mini generates
out = Path(sys.argv[1] if len(sys.argv) > 1 else "outputs/mini")
build = Path(sys.argv[2]) if len(sys.argv) > 2 else default_cache_dir() / DEFAULT_BUILD


def summary(grids: Iterable[np.ndarray]) -> str:
    count = shapes = across = 0
    for grid in grids:
        side = grid.shape[0] // LAYOUT.rows  # square cells
        radius = MINI_RADIUS * side
        blobs = [b for b in detect(grid, radius=radius) if b.shape is not None]
        inner_x, inner_y = np.arange(1, LAYOUT.cols) * side, np.arange(1, LAYOUT.rows) * side  # inner borders, px
        count, shapes = count + 1, shapes + len(blobs)
        across += sum(min(np.abs(inner_x - b.x).min(), np.abs(inner_y - b.y).min()) < 0.9 * radius for b in blobs)
    return (f"{count} grids, {shapes / max(count, 1):.1f} shapes per grid (a film strip: {LAYOUT.num_cells}), "
            f"{100 * across / max(shapes, 1):.1f} % of them across a cell border")


real = read_grids(sorted((build / "data" / "clips").glob("test-*.tar")))
print(f"real held-out grids ({build.name}): {summary(real)}")
runs = {p.name: sorted(p.glob("seed*/grids/*.png")) for p in sorted(out.iterdir()) if p.is_dir()}
if (out / "generated").is_dir():
    runs = {out.name: sorted((out / "generated").glob("*/grid.png"))}
for variant, files in runs.items():
    if files:
        print(f"{variant}: {summary(np.asarray(Image.open(f).convert('RGB')) for f in files)}")
