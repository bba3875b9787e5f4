"""The multi-view camera circle of the paper (appendix A.9, Table 5) and its one JSON form.

24 cameras on a circle of radius 2 around the origin of a z-up world, looking at the origin. Camera ``k`` at
azimuth ``t`` and elevation ``e`` has, in OpenCV convention (x right, y down, z forward), the camera-to-world
axes and origin

    X = (cos t, sin t, 0)                 Z = -origin / r = (-cos e sin t, cos e cos t, -sin e)
    Y = Z x X = (sin e sin t, -sin e cos t, -cos e)        origin = r (cos e sin t, -cos e cos t, sin e)

so at ``e = 0``: ``Y = (0, 0, -1)``, ``origin = (r sin t, -r cos t, 0)``. The table's numbers put the cameras at
``t_k = 360 k / 23`` (``linspace(0, 360, 24)``: 15.65 deg apart, the last view repeating the first), listed in
the lexicographic order of the file names (0, 1, 10, 11, ..., 19, 2, 20, ...). ``spacing="table5"`` reproduces
those numbers; ``"uniform"`` gives the 15 deg steps (``360 k / 24``) that the paper's text states; a number is a
step in degrees.

One JSON form, :func:`camera_circle`, for the ``cameras`` of a multi-view shard sample (``gridgen-prepare``)
and the ``cameras.json`` beside generated views (``gridgen-generate``)::

    {"convention": "...", "spacing": "table5", "radius": 2.0, "elevation_deg": 0.0,
     "azimuth_deg": [0.0, 15.652174, ...], "c2w": [[[...4 numbers], ...4 rows], ...one per view]}

View ``k`` is frame ``k`` of the grid (film-strip order: cell ``(k // cols, k % cols)``). This is the form shards
already carried; keeping it leaves every shard written before byte for byte what a new one is.
"""

from __future__ import annotations

import math

import numpy as np

CAMERA_CONVENTION = "opencv camera-to-world (x right, y down, z forward), world z up"
CAMERA_SPACINGS = ("table5", "uniform")


def camera_azimuths(num_views: int = 24, spacing: str | float = "table5", start_deg: float = 0.0) -> list[float]:
    """Azimuths in degrees of the views, in view (orbit) order."""
    if num_views < 1:
        raise ValueError(f"a camera circle needs at least one view, got {num_views}")
    if spacing == "table5":
        return [start_deg + 360.0 * k / (num_views - 1) for k in range(num_views)] if num_views > 1 else [start_deg]
    if spacing == "uniform":
        return [start_deg + 360.0 * k / num_views for k in range(num_views)]
    if isinstance(spacing, int | float) and not isinstance(spacing, bool) and math.isfinite(spacing):
        return [start_deg + k * float(spacing) for k in range(num_views)]
    raise ValueError(f"camera spacing must be one of {CAMERA_SPACINGS} or a step in degrees, got {spacing!r}")


def camera_to_world(azimuth_deg: float, radius: float = 2.0, elevation_deg: float = 0.0) -> np.ndarray:
    """The ``(4, 4)`` camera-to-world matrix of the camera at ``azimuth_deg`` (columns X, Y, Z, origin)."""
    t, e = math.radians(azimuth_deg), math.radians(elevation_deg)
    ce, se = math.cos(e), math.sin(e)
    c2w = np.eye(4)
    # "+ 0.0" turns the -0.0 of a product with sin(0) into 0.0, so that the JSON does not print "-0.0"
    c2w[:3, 0] = (math.cos(t), math.sin(t), 0.0)  # X: image right
    c2w[:3, 1] = (se * math.sin(t) + 0.0, -se * math.cos(t) + 0.0, -ce)  # Y: image down (world -z at e = 0)
    c2w[:3, 2] = (-ce * math.sin(t), ce * math.cos(t), -se + 0.0)  # Z: viewing direction, towards the origin
    c2w[:3, 3] = (radius * ce * math.sin(t), -radius * ce * math.cos(t), radius * se)
    return c2w


def camera_circle(num_views: int = 24, radius: float = 2.0, spacing: str | float = "table5",
                  elevation_deg: float = 0.0, start_deg: float = 0.0) -> dict:
    """The cameras of ``num_views`` views in gridgen's camera JSON (module docstring), numbers rounded to 6 places."""
    azimuths = camera_azimuths(num_views, spacing, start_deg)
    return {
        "convention": CAMERA_CONVENTION,
        "spacing": spacing if isinstance(spacing, str) else float(spacing),
        "radius": float(radius),
        "elevation_deg": float(elevation_deg),
        "azimuth_deg": [round(a, 6) for a in azimuths],
        "c2w": [np.round(camera_to_world(a, radius, elevation_deg), 6).tolist() for a in azimuths],
    }
