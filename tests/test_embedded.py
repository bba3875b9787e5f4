"""The embedded wing's drawing code against plain references: the mesh rasterizer against a pinhole projection written
here, the moving-shape clips against their captions, and the one default cache folder (no model, no shards: < 1 s)."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest

from gridgen.cameras import camera_to_world
from gridgen.embedded import default_cache_dir
from gridgen.embedded.render import FIELD_OF_VIEW_DEG, OBJECTS, object_mesh, render_view
from gridgen.embedded.world import BACKGROUND_COLORS, STRAIGHT_PATHS, moving_shape_clip

SIZE = 64


def projected_box(vertices: np.ndarray, c2w: np.ndarray, size: int) -> tuple[float, float, float, float]:
    """Pixel bounds (x0, y0, x1, y1) of the vertices seen by a pinhole camera of FIELD_OF_VIEW_DEG (OpenCV axes)."""
    focal = (size / 2) / math.tan(math.radians(FIELD_OF_VIEW_DEG) / 2)
    rotation, origin = c2w[:3, :3], c2w[:3, 3]
    points = []
    for p in vertices:
        x, y, z = rotation.T @ (p - origin)  # world -> camera
        assert z > 0, "the object must be in front of the camera"
        points.append((size / 2 + focal * x / z, size / 2 + focal * y / z))
    xs, ys = zip(*points, strict=True)
    return min(xs), min(ys), max(xs), max(ys)


@pytest.mark.parametrize("kind", OBJECTS)
@pytest.mark.parametrize("azimuth", [0.0, 75.0, 200.0])
def test_render_view_silhouette_is_the_projected_convex_hull(kind, azimuth):
    """A convex object's silhouette is the hull of its projected vertices: the rendered alpha covers exactly their
    bounding box (within the 1 px of anti-aliasing), its centre pixel is opaque, and the background is transparent."""
    vertices, faces = object_mesh(kind, np.random.default_rng(3))
    c2w = camera_to_world(azimuth, 2.0)
    view = render_view(vertices, faces, (200, 100, 50), c2w, SIZE)
    assert view.shape == (SIZE, SIZE, 4) and view.dtype == np.uint8
    alpha = view[..., 3]
    rows, cols = np.nonzero(alpha)
    x0, y0, x1, y1 = projected_box(vertices, c2w, SIZE)
    assert abs(cols.min() - math.floor(x0)) <= 1 and abs(cols.max() + 1 - math.ceil(x1)) <= 1, (cols.min(), x0, x1)
    assert abs(rows.min() - math.floor(y0)) <= 1 and abs(rows.max() + 1 - math.ceil(y1)) <= 1, (rows.min(), y0, y1)
    assert alpha[SIZE // 2, SIZE // 2] == 255  # the object is centred on the origin the camera looks at
    assert (view[alpha == 0][:, :3] == 0).all()  # straight alpha: no colour where nothing was drawn
    shades = view[alpha == 255][:, :3].astype(float) / np.array([200, 100, 50])  # 0.35 ambient + 0.65 diffuse
    assert ((shades >= 0.35 - 0.02) & (shades <= 1 + 0.01)).all(), np.unique(shades, axis=0)


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


def test_default_cache_dir_is_gridgen_cache_or_home(monkeypatch, tmp_path):
    monkeypatch.setenv("GRIDGEN_CACHE", str(tmp_path / "c"))
    assert default_cache_dir() == tmp_path / "c"
    monkeypatch.delenv("GRIDGEN_CACHE")
    monkeypatch.setenv("HOME", str(tmp_path))
    assert default_cache_dir() == Path(tmp_path) / ".cache" / "gridgen"
