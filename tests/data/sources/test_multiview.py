"""Multi-view renders: the shared demo object's 24 views, composited on the background, pixel for pixel."""

from __future__ import annotations

import subprocess

import numpy as np
import pytest
from PIL import Image

from gridgen.cameras import camera_circle
from gridgen.data.prepare import prepare
from tests.helpers.paths import DEMO_MULTIVIEW
from tests.helpers.prepare import compose_prepare, read_samples


@pytest.mark.skipif(not DEMO_MULTIVIEW.is_dir(), reason="../shared/data/grid_demo_multiview is not on this machine")
@pytest.mark.parametrize("background", ["black", "#ffffff"])
def test_demo_multiview_grid_pixel_for_pixel(tmp_path, background):
    cfg = compose_prepare("data=grid_demo_multiview", f"prepare.src={DEMO_MULTIVIEW}", f"prepare.out={tmp_path}",
                          f"data.source.background='{background}'", "prepare.progress=false")
    entry = prepare(cfg)
    assert entry["counts"]["samples"] == 1 and entry["counts"]["skipped"] == {}
    (sample,) = read_samples(tmp_path)
    grid, meta = sample["png"], sample["json"]
    assert grid.shape == (1024, 1536, 3) and (meta["rows"], meta["cols"]) == (4, 6)
    bg = (0, 0, 0) if background == "black" else (255, 255, 255)
    for k in range(24):  # view k (multi_frame{k}.png, numeric order) composited on the background, cell divmod(k, 6)
        rgba = np.asarray(Image.open(DEMO_MULTIVIEW / f"multi_frame{k}.png").convert("RGBA")).astype(np.float64)
        alpha = rgba[..., 3:] / 255.0
        view = np.rint(rgba[..., :3] * alpha + np.array(bg) * (1 - alpha)).astype(np.uint8)
        r, c = divmod(k, 6)
        assert np.array_equal(grid[r * 256:(r + 1) * 256, c * 256:(c + 1) * 256], view), f"view {k}"
    assert meta["cameras"] == camera_circle(24, 2.0, "table5") and meta["frame_indices"] == list(range(24))
    assert sample["txt"].startswith("A 24-frame sequence arranged in a 4x6 grid. Each frame captures a 3D model of "
                                    "a small green plant creature")
    listing = subprocess.run(["tar", "tf", str(tmp_path / "train-000000.tar")], capture_output=True, text=True)
    assert listing.returncode == 0 and sorted(listing.stdout.split()) == [
        "grid_demo_multiview.json", "grid_demo_multiview.png", "grid_demo_multiview.txt"]
