"""The moving-shape clips move as their captions say."""

from __future__ import annotations

import math

import numpy as np
import pytest

from gridgen.embedded.world import BACKGROUND_COLORS, STRAIGHT_PATHS, moving_shape_clip


@pytest.mark.parametrize("seed", range(12))
def test_moving_shape_clip_moves_as_its_caption_says(seed):
    """The shape's pixel centroid (pixels unlike the background) travels along the caption's straight path, or
    stays on a circle around the frame centre for a circular one."""
    frames, meta = moving_shape_clip(np.random.default_rng(seed), 8, 48, 64)
    assert frames.shape == (8, 48, 64, 3) and meta["name"].startswith(("a ", "an "))
    assert meta["color"] in meta["name"] and meta["shape"] in meta["name"] and meta["path"] in meta["name"]
    background = np.array(BACKGROUND_COLORS[meta["background"]])
    centroids = []
    for frame in frames:
        ys, xs = np.nonzero(np.abs(frame.astype(int) - background).sum(axis=-1) > 60)
        assert len(xs) > 20, "the shape must be visible in every frame"
        centroids.append((xs.mean(), ys.mean()))
    track = np.array(centroids)  # (T, 2): x right, y down
    if meta["path"] in STRAIGHT_PATHS:
        (sx, sy), (ex, ey) = STRAIGHT_PATHS[meta["path"]]
        direction = np.array([ex - sx, ey - sy]) / math.hypot(ex - sx, ey - sy)
        steps = np.diff(track, axis=0) @ direction
        assert (steps > 0).all(), (meta["path"], steps)
        sideways = (track - track[0]) @ np.array([-direction[1], direction[0]])
        assert np.abs(sideways).max() < 1.5, (meta["path"], sideways)
    else:
        radii = np.hypot(track[:, 0] - 32, track[:, 1] - 24)
        assert radii.min() > 5 and radii.max() - radii.min() < 2.5, radii
