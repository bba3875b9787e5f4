"""Do a `make mini` run's shapes move along the strip (RESULTS-6.md)? Per variant, over the grids the world metrics
could track (a shape in every cell): the median distance in px from the first cell's track point to the last
cell's, read from each grid's ``NNNN.json`` (``scores.track``, the centroid of each cell's largest blob,
:mod:`gridgen.eval.world_metrics`); the same for the real held-out grids of the build, tracked by the same rule. A
clip of the world moves 0.3 or 0.6 frame sides, or returns to its start (circles).

    python experiments/mini/analysis/travel.py [<make mini output folder>, default outputs/mini] [<build folder>]
"""

import io
import json
import sys
import tarfile
from collections.abc import Iterable, Iterator
from pathlib import Path

import numpy as np
from PIL import Image

from gridgen.embedded.mini_data import clips_layout
from gridgen.embedded.mini_model import DEFAULT_BUILD
from gridgen.eval.world_metrics import score_grid
from gridgen.runtime import default_cache_dir

LAYOUT = clips_layout()  # the card's clips (4x4 of 64 px cells): the grids make mini generates
out = Path(sys.argv[1] if len(sys.argv) > 1 else "outputs/mini")
build = Path(sys.argv[2]) if len(sys.argv) > 2 else default_cache_dir() / DEFAULT_BUILD


def real_tracks(shards: list[Path]) -> Iterator[list[tuple[float, float]] | None]:
    """The world metrics' track of each real grid in ``shards``, scored with its own caption (``c_content``)."""
    for shard in shards:
        with tarfile.open(shard) as tar:
            files = {m.name: tar.extractfile(m).read() for m in tar if m.isfile()}
        for name in sorted(n for n in files if n.endswith(".png")):
            grid = np.asarray(Image.open(io.BytesIO(files[name])).convert("RGB"))
            caption = json.loads(files[name.removesuffix(".png") + ".json"])["c_content"]
            yield score_grid(grid, LAYOUT, caption).track


def summary(tracks: Iterable[list[tuple[float, float]] | None]) -> str:
    tracks = list(tracks)
    distances = [float(np.hypot(*np.subtract(t[-1], t[0]))) for t in tracks if t]
    return (f"{len(distances)} of {len(tracks)} grids tracked, first-to-last cell distance median "
            f"{np.median(distances):.1f} px" if distances else f"0 of {len(tracks)} grids tracked")


real = real_tracks(sorted((build / "data" / "clips").glob("test-*.tar")))
print(f"real held-out grids ({build.name}): {summary(real)}")
for variant in sorted(p.name for p in out.iterdir() if p.is_dir()):
    records = sorted(out.glob(f"{variant}/seed*/grids/*.json"))
    if records:
        print(f"{variant}: {summary(json.loads(r.read_text())['scores']['track'] for r in records)}")
