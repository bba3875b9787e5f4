"""The mesh rasterizer of the sample data's multi-view renders: a flat-shaded convex object (box, pyramid, prism) seen
by a perspective camera, RGBA with a transparent background, in plain numpy + PIL (no GL).
"""

from __future__ import annotations

import math

import numpy as np
from PIL import Image, ImageDraw

from gridgen.embedded.world import SUPERSAMPLE

FIELD_OF_VIEW_DEG = 50.0  # renders: perspective camera of the Table 5 circle
OBJECTS = ("box", "pyramid", "prism")


def object_mesh(kind: str, rng: np.random.Generator) -> tuple[np.ndarray, list[list[int]]]:
    """Vertices ``(V, 3)`` in the z-up world of Table 5, centred on the origin and turned by a random yaw,
    and faces wound counter-clockwise seen from outside (outward normals)."""
    if kind == "box":
        sx, sy, sz = rng.uniform(0.25, 0.5, size=3)
        v = np.array([[x, y, z] for x in (-sx, sx) for y in (-sy, sy) for z in (-sz, sz)])
        faces = [[0, 1, 3, 2], [4, 6, 7, 5], [0, 4, 5, 1], [2, 3, 7, 6], [0, 2, 6, 4], [1, 5, 7, 3]]
    elif kind == "pyramid":
        b, top = rng.uniform(0.3, 0.45), rng.uniform(0.35, 0.5)
        v = np.array([[-b, -b, -0.35], [b, -b, -0.35], [b, b, -0.35], [-b, b, -0.35], [0.0, 0.0, top]])
        faces = [[0, 1, 2, 3], [3, 2, 4], [2, 1, 4], [1, 0, 4], [0, 3, 4]]
    elif kind == "prism":
        b, hh, d = rng.uniform(0.3, 0.45), rng.uniform(0.3, 0.45), rng.uniform(0.25, 0.45)
        v = np.array([[-b, -d, -hh], [b, -d, -hh], [0.0, -d, hh], [-b, d, -hh], [b, d, -hh], [0.0, d, hh]])
        faces = [[0, 2, 1], [3, 4, 5], [0, 1, 4, 3], [1, 2, 5, 4], [2, 0, 3, 5]]
    else:
        raise ValueError(f"unknown object {kind!r}; expected one of {OBJECTS}")
    yaw = float(rng.uniform(0, 2 * math.pi))
    turn = np.array([[math.cos(yaw), -math.sin(yaw), 0], [math.sin(yaw), math.cos(yaw), 0], [0, 0, 1]])
    vertices = (v - (v.max(axis=0) + v.min(axis=0)) / 2) @ turn.T
    oriented = []
    for face in faces:  # orient every face outwards so that visibility is one sign test
        p = vertices[face]
        normal = np.cross(p[1] - p[0], p[2] - p[0])
        oriented.append(face if normal @ p.mean(axis=0) > 0 else face[::-1])
    return vertices, oriented


def render_view(vertices: np.ndarray, faces: list[list[int]], color: tuple, c2w: np.ndarray, size: int) -> np.ndarray:
    """Flat-shaded perspective render by the camera ``c2w`` (OpenCV axes), RGBA ``(size, size, 4)`` uint8
    with a transparent background and straight (not premultiplied) colour."""
    s = size * SUPERSAMPLE
    focal = (s / 2) / math.tan(math.radians(FIELD_OF_VIEW_DEG) / 2)
    rotation, origin = c2w[:3, :3], c2w[:3, 3]
    cam = (vertices - origin) @ rotation  # world -> camera: R^T (p - o), rows are points
    light = np.array([0.45, -0.6, 0.65])  # fixed in the world: faces keep their shade as the camera moves
    light /= np.linalg.norm(light)
    rgb = Image.new("RGB", (s, s), (0, 0, 0))
    mask = Image.new("L", (s, s), 0)
    draw_rgb, draw_mask = ImageDraw.Draw(rgb), ImageDraw.Draw(mask)
    visible = []
    for face in faces:
        world = vertices[face]
        normal = np.cross(world[1] - world[0], world[2] - world[0])
        if normal @ (origin - world.mean(axis=0)) <= 1e-9:  # back face; the objects are convex
            continue
        shade = 0.35 + 0.65 * max(0.0, float(normal @ light / np.linalg.norm(normal)))
        points = [(s / 2 + focal * x / z, s / 2 + focal * y / z) for x, y, z in cam[face]]
        visible.append((-float(cam[face][:, 2].mean()), points, tuple(int(round(c * shade)) for c in color)))
    for _, points, fill in sorted(visible, key=lambda item: item[0]):  # far to near
        draw_rgb.polygon(points, fill=fill)
        draw_mask.polygon(points, fill=255)
    premultiplied = np.asarray(rgb.reduce(SUPERSAMPLE), dtype=np.float64)  # edges blend with black
    alpha = np.asarray(mask.reduce(SUPERSAMPLE), dtype=np.float64)
    straight = np.where(alpha[..., None] > 0, premultiplied * 255.0 / np.maximum(alpha[..., None], 1), 0)
    return np.dstack([np.clip(np.rint(straight), 0, 255), alpha]).astype(np.uint8)
