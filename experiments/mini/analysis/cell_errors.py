"""Where a `make mini` run's cells go wrong (RESULTS-3.md, "The structure is learned, the binding is not"): per
variant, over every seed's generated grids, the share of cells holding exactly one shape and, among those, the
shares with the prompted colour (per colour asked) and shape (per shape asked), read by the world's detector,
and the most frequent wrong colours (prompted -> read).

    python experiments/mini/analysis/cell_errors.py [<make mini output folder>, default outputs/mini]
"""

import collections
import json
import sys
from pathlib import Path

import numpy as np
from PIL import Image

from gridgen.eval.shapes import detect
from gridgen.inference.export import grid_frames
from gridgen.layout import GridLayout

out = Path(sys.argv[1] if len(sys.argv) > 1 else "outputs/mini")
for variant in sorted(p.name for p in out.iterdir() if p.is_dir()):
    count = collections.Counter()
    asked = set()  # the colours prompted in this variant's one-shape cells
    for record in sorted(out.glob(f"{variant}/seed*/grids/*.json")):
        meta = json.loads(record.read_text())
        grid = np.array(Image.open(record.with_suffix(".png")).convert("RGB"))  # writable: torch views it
        for frame in grid_frames(grid, GridLayout.from_image_size(4, 4, *grid.shape[:2])):  # (16, h, w, 3)
            blobs = detect(np.ascontiguousarray(frame))
            count["cells"] += 1
            if len(blobs) == 1:
                count["one"] += 1
                count["colour"] += blobs[0].color == meta["color"]
                asked.add(meta["color"])
                count[meta["color"], "asked"] += 1
                count[meta["color"], "kept"] += blobs[0].color == meta["color"]
                if blobs[0].color != meta["color"]:
                    count["confused", meta["color"], blobs[0].color] += 1
                count["shape"] += blobs[0].shape == meta["shape"]
                count[meta["shape"]] += 1
                count[meta["shape"], "right"] += blobs[0].shape == meta["shape"]
    if count["one"]:
        shapes = ", ".join(f"{s} {count[s, 'right'] / count[s]:.0%}"
                           for s in ("circle", "square", "triangle") if count[s])
        print(f"{variant}: {count['one'] / count['cells']:.1%} of {count['cells']} cells hold one shape; of those "
              f"colour right {count['colour'] / count['one']:.1%}, shape right {count['shape'] / count['one']:.1%} "
              f"({shapes})")
        colours = ", ".join(f"{c} {count[c, 'kept'] / count[c, 'asked']:.0%}"
                            for c in sorted(asked))
        print(f"  colour right per colour asked: {colours}")
        wrong = sorted(((n, k[1], k[2]) for k, n in count.items() if isinstance(k, tuple) and k[0] == "confused"),
                       reverse=True)[:4]
        print("  wrong colours: " + ", ".join(f"{asked} -> {read} {n / count['one']:.1%}" for n, asked, read in wrong))
