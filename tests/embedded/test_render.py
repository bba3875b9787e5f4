"""The mesh rasterizer against a pinhole projection written here."""

from __future__ import annotations

import math

import numpy as np
import pytest

from gridgen.cameras import camera_to_world
from gridgen.embedded.render import FIELD_OF_VIEW_DEG, OBJECTS, object_mesh, render_view

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
