"""Do a `make mini` run's shapes move the caption's way (lora_steps_v7.md)? Per variant, over the tracked grids (a
shape in every cell) whose caption moves in a straight line: the cosine between the track's least-squares velocity
(``gridgen.eval.world_metrics.velocity_fit``, as the motion metric fits it) and the caption's direction (1 = along
it, 0 = unrelated), the share within the motion metric's 22.5 degrees (12.5 % by chance), and the median fitted
travel over the clip in px (a slow clip of the world travels 19.2 px, a quick one 38.4 px); mean +- 95 % interval
over seeds, as the report gives its figures.

    python experiments/mini/analysis/direction.py [<make mini output folder>, default outputs/mini]
"""

import json
import math
import sys
from pathlib import Path

import numpy as np

from gridgen.embedded.world import DIRECTIONS, parse_mini_caption
from gridgen.eval.world_metrics import DIRECTION_TOLERANCE, velocity_fit
from gridgen.mini.report import interval

out = Path(sys.argv[1] if len(sys.argv) > 1 else "outputs/mini")


def seed_figures(folder: Path) -> tuple[float, float, float, int] | None:
    """(mean cosine, share within the tolerance, median travel px, grids) of one seed's straight tracked grids."""
    cosines, travels = [], []
    for record in sorted(folder.glob("grids/*.json")):
        meta = json.loads(record.read_text())
        _, _, motion = parse_mini_caption(meta["prompt"])
        if meta["scores"]["track"] is None or motion.circular:
            continue
        track = np.asarray(meta["scores"]["track"], dtype=np.float64)  # (F, 2) px, y down
        velocity, _ = velocity_fit(track)
        direction = np.asarray(DIRECTIONS[motion.family], dtype=np.float64)
        speed = float(np.linalg.norm(velocity))
        cosines.append(float(velocity @ direction) / (np.linalg.norm(direction) * max(speed, 1e-12)))
        travels.append(speed * (len(track) - 1))
    if not cosines:
        return None
    within = float(np.mean(np.asarray(cosines) >= math.cos(math.radians(DIRECTION_TOLERANCE))))
    return float(np.mean(cosines)), within, float(np.median(travels)), len(cosines)


for variant in sorted(p for p in out.iterdir() if p.is_dir()):
    seeds = [f for f in map(seed_figures, sorted(variant.glob("seed*"))) if f is not None]
    if not seeds:
        print(f"{variant.name}: no tracked grid with a straight motion")
        continue
    figures = []
    for k, (name, fmt) in enumerate((("mean cosine", "{:.2f}"), ("within 22.5 deg", "{:.0%}"), ("travel px", "{:.1f}"))):
        values = [s[k] for s in seeds]
        mean, half = interval(values) if len(values) > 1 else (values[0], float("nan"))
        figures.append(f"{name} {fmt.format(mean)} +- {fmt.format(half)}")
    print(f"{variant.name} ({len(seeds)} seeds, {sum(s[3] for s in seeds)} grids): {', '.join(figures)}")
