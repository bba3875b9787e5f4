"""gridgen.cameras: the paper's Table 5 camera circle (A.9) and its one JSON form."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest

from gridgen.cameras import CAMERA_CONVENTION, camera_azimuths, camera_circle, camera_to_world

TABLE_5 = [  # X vector, Y vector, Z vector, origin; rows 1-24 as printed
    ([1.0, 0.0, 0.0], [-0.0, 0.0, -1.0], [-0.0, 1.0, 0.0], [0.0, -2.0, 0.0]),
    ([0.96, 0.27, -0.0], [0.0, -0.0, -1.0], [-0.27, 0.96, -0.0], [0.54, -1.93, 0.0]),
    ([-0.92, 0.4, -0.0], [0.0, 0.0, -1.0], [-0.4, -0.92, -0.0], [0.8, 1.83, 0.0]),
    ([-0.99, 0.14, -0.0], [0.0, 0.0, -1.0], [-0.14, -0.99, -0.0], [0.27, 1.98, 0.0]),
    ([-0.99, -0.14, 0.0], [-0.0, 0.0, -1.0], [0.14, -0.99, -0.0], [-0.27, 1.98, 0.0]),
    ([-0.92, -0.4, 0.0], [-0.0, 0.0, -1.0], [0.4, -0.92, -0.0], [-0.8, 1.83, 0.0]),
    ([-0.78, -0.63, 0.0], [-0.0, -0.0, -1.0], [0.63, -0.78, 0.0], [-1.26, 1.55, 0.0]),
    ([-0.58, -0.82, -0.0], [0.0, 0.0, -1.0], [0.82, -0.58, 0.0], [-1.63, 1.15, 0.0]),
    ([-0.33, -0.94, -0.0], [0.0, -0.0, -1.0], [0.94, -0.33, 0.0], [-1.88, 0.67, 0.0]),
    ([-0.07, -1.0, -0.0], [0.0, 0.0, -1.0], [1.0, -0.07, 0.0], [-2.0, 0.14, 0.0]),
    ([0.2, -0.98, 0.0], [0.0, -0.0, -1.0], [0.98, 0.2, 0.0], [-1.96, -0.41, 0.0]),
    ([0.46, -0.89, 0.0], [0.0, -0.0, -1.0], [0.89, 0.46, 0.0], [-1.78, -0.92, 0.0]),
    ([0.85, 0.52, 0.0], [-0.0, 0.0, -1.0], [-0.52, 0.85, 0.0], [1.04, -1.71, 0.0]),
    ([0.68, -0.73, -0.0], [-0.0, 0.0, -1.0], [0.73, 0.68, 0.0], [-1.46, -1.37, 0.0]),
    ([0.85, -0.52, -0.0], [0.0, 0.0, -1.0], [0.52, 0.85, 0.0], [-1.04, -1.71, 0.0]),
    ([0.96, -0.27, 0.0], [-0.0, -0.0, -1.0], [0.27, 0.96, -0.0], [-0.54, -1.93, 0.0]),
    ([1.0, -0.0, 0.0], [0.0, 0.0, -1.0], [0.0, 1.0, 0.0], [-0.0, -2.0, 0.0]),
    ([0.68, 0.73, 0.0], [0.0, 0.0, -1.0], [-0.73, 0.68, 0.0], [1.46, -1.37, 0.0]),
    ([0.46, 0.89, -0.0], [-0.0, -0.0, -1.0], [-0.89, 0.46, 0.0], [1.78, -0.92, 0.0]),
    ([0.2, 0.98, -0.0], [-0.0, -0.0, -1.0], [-0.98, 0.2, 0.0], [1.96, -0.41, 0.0]),
    ([-0.07, 1.0, 0.0], [-0.0, 0.0, -1.0], [-1.0, -0.07, 0.0], [2.0, 0.14, 0.0]),
    ([-0.33, 0.94, 0.0], [-0.0, -0.0, -1.0], [-0.94, -0.33, 0.0], [1.88, 0.67, 0.0]),
    ([-0.58, 0.82, 0.0], [-0.0, 0.0, -1.0], [-0.82, -0.58, 0.0], [1.63, 1.15, 0.0]),
    ([-0.78, 0.63, -0.0], [0.0, -0.0, -1.0], [-0.63, -0.78, 0.0], [1.26, 1.55, 0.0]),
]


def test_cameras_reproduce_paper_table5():
    cams = camera_circle(24, 2.0, "table5")
    views = sorted(range(24), key=str)  # the table lists views in file-name order: 0, 1, 10, 11, ..., 19, 2, 20, ...
    for row, view in zip(TABLE_5, views, strict=True):
        c2w = np.array(cams["c2w"][view])
        for column, (name, printed) in enumerate(zip(("x", "y", "z", "origin"), row, strict=True)):
            np.testing.assert_allclose(c2w[:3, column], printed, atol=0.0051, err_msg=f"view {view} {name}")
    for view in range(24):
        c2w = camera_to_world(cams["azimuth_deg"][view], 2.0)
        np.testing.assert_allclose(c2w[:3, :3].T @ c2w[:3, :3], np.eye(3), atol=1e-12)  # orthonormal
        assert np.linalg.det(c2w[:3, :3]) == pytest.approx(1.0)  # right-handed
        np.testing.assert_allclose(c2w[:3, 3] + 2.0 * c2w[:3, 2], 0, atol=1e-12)  # looks at the origin
        np.testing.assert_array_equal(c2w[3], [0, 0, 0, 1])
    assert cams["azimuth_deg"][1] == pytest.approx(360 / 23, abs=1e-6)
    uniform = np.array(camera_circle(24, 2.0, "uniform")["c2w"][1])
    assert not np.allclose(uniform[:3, 3], [0.54, -1.93, 0], atol=0.006)  # 15 deg steps are not the table's


def test_spacing_start_and_elevation():
    assert camera_azimuths(4, "uniform") == [0.0, 90.0, 180.0, 270.0]
    assert camera_azimuths(4, "table5") == [0.0, 120.0, 240.0, 360.0]
    assert camera_azimuths(3, 15.0, start_deg=10.0) == [10.0, 25.0, 40.0]
    assert camera_azimuths(1) == [0.0]
    fifteen = np.array(camera_circle(24, spacing=15.0)["c2w"][1])
    np.testing.assert_allclose(fifteen[:3, 3], [2 * math.sin(math.radians(15)), -2 * math.cos(math.radians(15)), 0],
                               atol=1e-6)
    high = camera_to_world(0.0, 2.0, elevation_deg=30.0)
    assert high[2, 3] == pytest.approx(1.0) and high[2, 1] < 0  # above the plane; y still points down in the image
    np.testing.assert_allclose(high[:3, 3] + 2.0 * high[:3, 2], 0, atol=1e-12)  # still looks at the origin
    np.testing.assert_allclose(high[:3, 1], np.cross(high[:3, 2], high[:3, 0]), atol=1e-12)  # Y = Z x X
    with pytest.raises(ValueError, match="at least one view"):
        camera_azimuths(0)
    with pytest.raises(ValueError, match=r"must be one of \('table5', 'uniform'\) or a step in degrees, got 'spiral'"):
        camera_circle(24, spacing="spiral")


def test_camera_json_form():
    """One form for shard samples and generate's cameras.json: plain JSON, rounded; in the plane, world z parts are
    +0.0 (never printed as -0.0)."""
    cams = camera_circle(24, 1.5, 15.0, elevation_deg=0.0)
    assert list(cams) == ["convention", "spacing", "radius", "elevation_deg", "azimuth_deg", "c2w"]
    assert cams["convention"] == CAMERA_CONVENTION and cams["spacing"] == 15.0 and cams["radius"] == 1.5
    assert len(cams["azimuth_deg"]) == len(cams["c2w"]) == 24 and np.array(cams["c2w"]).shape == (24, 4, 4)
    assert json.loads(json.dumps(cams)) == cams
    flat = np.array(camera_circle(24)["c2w"])
    assert np.all(flat[:, :3, 1] == [0.0, 0.0, -1.0]) and not np.signbit(flat[:, :2, 1]).any()  # Y = (0, 0, -1)
    assert np.all(flat[:, 2, [0, 2, 3]] == 0.0) and not np.signbit(flat[:, 2, [0, 2, 3]]).any()
