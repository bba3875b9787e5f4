"""Fitting frames to cells, tiling and RGBA compositing against plain loops."""

from __future__ import annotations

import numpy as np

from gridgen.data.tiling import composite, fit_to_cell, tile_frames
from gridgen.layout import GridLayout


def test_fit_tile_and_composite_against_loops():
    frame = np.arange(60 * 100 * 3, dtype=np.uint32).reshape(60, 100, 3).astype(np.uint8)
    assert fit_to_cell(frame, 60, 60) is not None and np.array_equal(fit_to_cell(frame, 60, 60), frame[:, 20:80])
    assert fit_to_cell(frame, 32, 48).shape == (32, 48, 3)
    assert fit_to_cell(frame, 60, 100) is frame  # the cell size already: untouched
    layout = GridLayout(2, 3, 16, 32)
    frames = [np.full((16, 32, 3), k, np.uint8) + np.arange(32, dtype=np.uint8)[None, :, None] for k in range(6)]
    grid = tile_frames(frames, layout)
    expected = np.zeros((32, 96, 3), np.uint8)
    for k in range(6):
        r, c = divmod(k, 3)
        expected[r * 16:(r + 1) * 16, c * 32:(c + 1) * 32] = frames[k]
    assert np.array_equal(grid, expected)
    rgba = np.random.default_rng(0).integers(0, 256, (8, 8, 4)).astype(np.uint8)
    exact = (rgba[..., :3] * (rgba[..., 3:] / 255.0) + np.array([10, 200, 255]) * (1 - rgba[..., 3:] / 255.0))
    assert np.array_equal(composite(rgba, (10, 200, 255)), np.rint(exact).astype(np.uint8))
