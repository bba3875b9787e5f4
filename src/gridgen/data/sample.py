"""Procedural sample data: small, deterministic WebDataset shards of video and multi-view grids.

Real datasets are large and licensed; tests, smoke runs and `make prepare` need something that has the exact
on-disk format of a real dataset (WebDataset ``.tar`` shards with ``png`` / ``json`` / ``txt`` members) but is
generated in a second from a seed. Two kinds are written, each into its own folder:

* ``video/``: 4x4 grids (16 frames) of a coloured circle / square / triangle moving along a straight line or
  a circle on a plain background ("a red circle moves from left to right on a blue background").
* ``multiview/``: 4x6 grids (24 views) of a flat-shaded box / pyramid / prism on black, seen by a camera that
  circles the object in 15 degree steps, like the 24-camera circle of multi-view datasets.

Frames are drawn with PIL at 4x the cell size and box-downsampled, so edges are anti-aliased and motion is
sub-pixel smooth, then tiled into the grid with :meth:`GridLayout.tile` (row-major, film-strip order).
Everything is derived from ``SeedSequence([seed, kind, split, index])``, so the same seed gives byte-identical
shards (tar mtimes are fixed) and a sample does not change when the number of samples does.
"""

from __future__ import annotations

import io
import json
import logging
import math
import os
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import torch
import webdataset as wds
from PIL import Image, ImageDraw

from gridgen.layout import GridLayout

log = logging.getLogger(__name__)

SAMPLE_VERSION = 1  # bump when the generated content changes, so stale caches are not reused
SOURCE = "gridgen-sample"
VIDEO_LAYOUT = "4x4"
MULTIVIEW_LAYOUT = "4x6"
VIDEO_FPS = 8
VIEW_STEP_DEG = 15.0  # 24 views x 15 degrees = one full circle
CAMERA_ELEVATION_DEG = 25.0
SUPERSAMPLE = 4  # draw at 4x and box-downsample: cheap anti-aliasing
TAR_MTIME = 0.0  # fixed tar member mtime, so equal seeds give byte-identical shards

_KIND_CODE = {"video": 1, "multiview": 2}
_SPLIT_CODE = {"train": 1, "val": 2}

SHAPE_COLORS: dict[str, tuple[int, int, int]] = {
    "red": (220, 40, 40),
    "green": (40, 190, 60),
    "blue": (50, 90, 230),
    "yellow": (240, 220, 40),
    "orange": (245, 140, 30),
    "purple": (150, 60, 200),
    "cyan": (40, 210, 220),
    "white": (245, 245, 245),
}
BACKGROUND_COLORS: dict[str, tuple[int, int, int]] = {
    "black": (10, 10, 10),
    "white": (240, 240, 240),
    "gray": (120, 120, 120),
    "blue": (30, 50, 140),
    "green": (30, 100, 50),
    "brown": (110, 75, 40),
}
SHAPES = ("circle", "square", "triangle")
OBJECTS = ("box", "pyramid", "prism")

# Straight paths as (start, end) in unit cell coordinates (x right, y down), keyed by their caption.
STRAIGHT_PATHS: dict[str, tuple[tuple[float, float], tuple[float, float]]] = {
    "from left to right": ((0.0, 0.5), (1.0, 0.5)),
    "from right to left": ((1.0, 0.5), (0.0, 0.5)),
    "from top to bottom": ((0.5, 0.0), (0.5, 1.0)),
    "from bottom to top": ((0.5, 1.0), (0.5, 0.0)),
    "from the top left to the bottom right": ((0.0, 0.0), (1.0, 1.0)),
    "from the bottom left to the top right": ((0.0, 1.0), (1.0, 0.0)),
}
CIRCULAR_PATHS = ("in a clockwise circle", "in a counterclockwise circle")


def _a(word: str) -> str:
    """``"a red"`` / ``"an orange"``: captions should read like the ones of a real dataset."""
    return f"{'an' if word[0] in 'aeiou' else 'a'} {word}"


# ---- video grids ----------------------------------------------------------------------------------


def _draw_shape(draw: ImageDraw.ImageDraw, shape: str, cx: float, cy: float, r: float, color: tuple) -> None:
    """Draw a filled ``shape`` of radius ``r`` centred at ``(cx, cy)``."""
    if shape == "circle":
        draw.ellipse((cx - r, cy - r, cx + r, cy + r), fill=color)
    elif shape == "square":
        s = r * 0.9  # a square of the same "radius" looks bigger than the circle; shrink it a little
        draw.rectangle((cx - s, cy - s, cx + s, cy + s), fill=color)
    elif shape == "triangle":
        # equilateral, pointing up, centred on its centroid
        points = [
            (cx + r * math.cos(a), cy - r * math.sin(a))
            for a in (math.pi / 2, 7 * math.pi / 6, 11 * math.pi / 6)
        ]
        draw.polygon(points, fill=color)
    else:
        raise ValueError(f"unknown shape {shape!r}; expected one of {SHAPES}")


def _video_sample(rng: np.random.Generator, layout: GridLayout) -> tuple[np.ndarray, dict[str, Any]]:
    """One moving-shape clip: frames ``(F, h, w, 3)`` uint8 and its metadata."""
    shape = str(rng.choice(SHAPES))
    background = str(rng.choice(list(BACKGROUND_COLORS)))
    # never draw a shape in the background's colour: it would be invisible
    color = str(rng.choice([c for c in SHAPE_COLORS if c != background]))
    circular = bool(rng.random() < 0.3)
    path = str(rng.choice(CIRCULAR_PATHS)) if circular else str(rng.choice(list(STRAIGHT_PATHS)))

    scale = SUPERSAMPLE
    h, w = layout.cell_height * scale, layout.cell_width * scale
    radius = float(rng.uniform(0.12, 0.2)) * min(h, w)
    num_frames = layout.num_cells
    if circular:
        orbit = float(rng.uniform(0.2, 0.28)) * min(h, w)
        start = float(rng.uniform(0, 2 * math.pi))
        sign = (
            1.0 if path == "in a clockwise circle" else -1.0
        )  # y points down: +angle turns clockwise on screen
    else:
        (x0, y0), (x1, y1) = STRAIGHT_PATHS[path]

    frames = np.empty((num_frames, layout.cell_height, layout.cell_width, 3), dtype=np.uint8)
    for k in range(num_frames):
        if circular:
            # k / F (not k / (F-1)): one full loop without repeating the first position at the end
            angle = start + sign * 2 * math.pi * k / num_frames
            cx, cy = w / 2 + orbit * math.cos(angle), h / 2 + orbit * math.sin(angle)
        else:
            t = k / (num_frames - 1)
            # keep the whole shape inside the cell: map unit coordinates onto [radius, size - radius]
            cx = radius + (x0 + (x1 - x0) * t) * (w - 2 * radius)
            cy = radius + (y0 + (y1 - y0) * t) * (h - 2 * radius)
        image = Image.new("RGB", (w, h), BACKGROUND_COLORS[background])
        _draw_shape(ImageDraw.Draw(image), shape, cx, cy, radius, SHAPE_COLORS[color])
        frames[k] = np.asarray(image.reduce(scale))

    meta = {
        "shape": shape,
        "color": color,
        "background": background,
        "path": path,
        "fps": VIDEO_FPS,
        "c_content": f"{_a(color)} {shape} moves {path} on {_a(background)} background",
    }
    return frames, meta


# ---- multi-view grids -----------------------------------------------------------------------------


def _object_mesh(kind: str, rng: np.random.Generator) -> tuple[np.ndarray, list[list[int]]]:
    """Vertices ``(V, 3)`` (x right, y up, z towards the first camera) and faces wound counter-clockwise
    when seen from outside, so back faces can be culled from the sign of their normal."""
    if kind == "box":
        sx, sy, sz = rng.uniform(0.45, 0.9, size=3)
        v = np.array([[x, y, z] for x in (-sx, sx) for y in (-sy, sy) for z in (-sz, sz)])
        faces = [[0, 1, 3, 2], [4, 6, 7, 5], [0, 4, 5, 1], [2, 3, 7, 6], [0, 2, 6, 4], [1, 5, 7, 3]]
    elif kind == "pyramid":
        b, top = rng.uniform(0.55, 0.85), rng.uniform(0.7, 1.0)
        v = np.array([[-b, -0.6, -b], [b, -0.6, -b], [b, -0.6, b], [-b, -0.6, b], [0.0, top, 0.0]])
        faces = [[0, 1, 2, 3], [3, 2, 4], [2, 1, 4], [1, 0, 4], [0, 3, 4]]
    elif kind == "prism":
        b, hh, d = rng.uniform(0.5, 0.85), rng.uniform(0.5, 0.8), rng.uniform(0.45, 0.85)
        v = np.array([[-b, -hh, -d], [b, -hh, -d], [0.0, hh, -d], [-b, -hh, d], [b, -hh, d], [0.0, hh, d]])
        faces = [[0, 2, 1], [3, 4, 5], [0, 1, 4, 3], [1, 2, 5, 4], [2, 0, 3, 5]]
    else:
        raise ValueError(f"unknown object {kind!r}; expected one of {OBJECTS}")
    center = (v.max(axis=0) + v.min(axis=0)) / 2  # rotate around the object's own centre
    vertices = v - center
    # the generator above lists some faces clockwise; orient every face outwards so culling is uniform
    oriented = []
    for face in faces:
        p = vertices[face]
        normal = np.cross(p[1] - p[0], p[2] - p[0])
        oriented.append(face if normal @ (p.mean(axis=0)) > 0 else face[::-1])
    return vertices, oriented


def _render_view(
    vertices: np.ndarray, faces: list[list[int]], color: tuple, azimuth_deg: float, size: tuple[int, int]
) -> Image.Image:
    """Flat-shaded orthographic view from a camera at ``azimuth_deg`` around the vertical axis."""
    h, w = size
    az, el = math.radians(azimuth_deg), math.radians(CAMERA_ELEVATION_DEG)
    # camera orbiting the object == object turning by -azimuth in front of a fixed camera
    rot_y = np.array([[math.cos(az), 0, -math.sin(az)], [0, 1, 0], [math.sin(az), 0, math.cos(az)]])
    rot_x = np.array([[1, 0, 0], [0, math.cos(el), -math.sin(el)], [0, math.sin(el), math.cos(el)]])
    cam = vertices @ (rot_x @ rot_y).T  # camera looks along -z; +z is towards the viewer
    light = np.array([0.4, 0.8, 0.45])  # fixed in world space: faces keep their shade as the camera moves
    light /= np.linalg.norm(light)
    scale = 0.32 * min(h, w)
    image = Image.new("RGB", (w, h), (0, 0, 0))
    draw = ImageDraw.Draw(image)
    visible = []
    for face in faces:
        p = cam[face]
        normal = np.cross(p[1] - p[0], p[2] - p[0])
        if normal[2] <= 1e-9:  # back face: the object is convex, so culling alone resolves occlusion
            continue
        world = vertices[face]
        world_normal = np.cross(world[1] - world[0], world[2] - world[0])
        shade = 0.35 + 0.65 * max(0.0, float(world_normal @ light / np.linalg.norm(world_normal)))
        fill = tuple(int(round(c * shade)) for c in color)
        points = [(w / 2 + scale * x, h / 2 - scale * y) for x, y, _ in p]
        visible.append((float(p[:, 2].mean()), points, fill))
    for _, points, fill in sorted(visible, key=lambda item: item[0]):  # far to near, for safety
        draw.polygon(points, fill=fill)
    return image


def _multiview_sample(rng: np.random.Generator, layout: GridLayout) -> tuple[np.ndarray, dict[str, Any]]:
    """One turntable: views ``(F, h, w, 3)`` uint8 and their metadata."""
    obj = str(rng.choice(OBJECTS))
    color = str(rng.choice(list(SHAPE_COLORS)))
    vertices, faces = _object_mesh(obj, rng)
    start = float(rng.choice([0.0, 45.0, 90.0]))  # vary the first view a little between samples
    azimuths = [(start + VIEW_STEP_DEG * k) % 360.0 for k in range(layout.num_cells)]
    size = (layout.cell_height * SUPERSAMPLE, layout.cell_width * SUPERSAMPLE)
    frames = np.stack(
        [
            np.asarray(_render_view(vertices, faces, SHAPE_COLORS[color], az, size).reduce(SUPERSAMPLE))
            for az in azimuths
        ]
    )
    meta = {
        "object": obj,
        "color": color,
        "background": "black",
        "azimuths_deg": azimuths,
        "elevation_deg": CAMERA_ELEVATION_DEG,
        "c_content": f"{_a(color)} {obj} seen from {layout.num_cells} viewpoints around it",
    }
    return frames, meta


# ---- shards ---------------------------------------------------------------------------------------


def _png_bytes(grid: np.ndarray) -> bytes:
    with io.BytesIO() as stream:
        Image.fromarray(grid, "RGB").save(stream, format="PNG", compress_level=6)
        return stream.getvalue()


def _samples(kind: str, split: str, count: int, layout: GridLayout, seed: int) -> Iterator[dict[str, Any]]:
    """WebDataset sample dicts (``__key__``, ``png``, ``json``, ``txt``) for one kind and split."""
    make = _video_sample if kind == "video" else _multiview_sample
    for index in range(count):
        # one independent stream per sample: a sample never depends on how many were generated
        rng = np.random.default_rng(
            np.random.SeedSequence([seed, _KIND_CODE[kind], _SPLIT_CODE[split], index])
        )
        frames, meta = make(rng, layout)
        grid = layout.tile(torch.from_numpy(frames).permute(0, 3, 1, 2))  # (3, H, W), film-strip order
        c_content = meta.pop("c_content")
        record = {
            **layout.to_dict(),
            "kind": kind,
            "frame_indices": list(range(layout.num_cells)),
            "source": SOURCE,
            "c_layout": layout.caption_prefix(kind),
            "c_content": c_content,
            **meta,
        }
        yield {
            "__key__": f"{kind}-{split}-{index:06d}",
            "png": _png_bytes(grid.permute(1, 2, 0).contiguous().numpy()),
            "json": json.dumps(record, sort_keys=True).encode("utf-8"),
            "txt": layout.caption(c_content, kind).encode("utf-8"),
        }


def _write_split(
    folder: Path, split: str, samples: Iterator[dict[str, Any]], samples_per_shard: int
) -> list[str]:
    """Write ``{split}-000000.tar ...`` into ``folder``; return the shard file names."""
    pattern = str(folder / f"{split}-%06d.tar")
    # verbose=0: ShardWriter prints every shard name to stdout otherwise; mtime fixed for reproducible bytes
    with wds.ShardWriter(pattern, maxcount=samples_per_shard, verbose=0, mtime=TAR_MTIME) as sink:
        for sample in samples:
            sink.write(sample)
    return sorted(p.name for p in folder.glob(f"{split}-*.tar"))


def write_sample_shards(
    out_dir: str | Path,
    *,
    num_video: int = 64,
    num_multiview: int = 32,
    num_val: int = 4,
    cell_size: int = 32,
    samples_per_shard: int = 16,
    seed: int = 0,
) -> dict[str, Any]:
    """Write ``video/`` and ``multiview/`` WebDataset shards plus ``manifest.json`` files into ``out_dir``.

    Each kind folder holds ``train-000000.tar ...`` (``samples_per_shard`` samples each), ``val-000000.tar ...``
    (``num_val`` samples) and a ``manifest.json`` with its counts; ``out_dir/manifest.json`` combines both and
    is returned. Not atomic by itself: use :func:`ensure_sample_shards` for a crash-safe cached copy.
    """
    if samples_per_shard < 1:
        raise ValueError(f"samples_per_shard must be >= 1, got {samples_per_shard}")
    out = Path(out_dir)
    counts = {"video": num_video, "multiview": num_multiview}
    layouts = {
        "video": GridLayout.parse(VIDEO_LAYOUT, cell_size),
        "multiview": GridLayout.parse(MULTIVIEW_LAYOUT, cell_size),
    }
    manifest: dict[str, Any] = {
        "version": SAMPLE_VERSION,
        "source": SOURCE,
        "seed": seed,
        "cell_size": cell_size,
        "kinds": {},
    }
    for kind, layout in layouts.items():
        folder = out / kind
        folder.mkdir(parents=True, exist_ok=True)
        shards = {
            split: _write_split(folder, split, _samples(kind, split, n, layout, seed), samples_per_shard)
            for split, n in (("train", counts[kind]), ("val", num_val))
        }
        entry = {
            "kind": kind,
            "layout": layout.to_dict(),
            "counts": {"train": counts[kind], "val": num_val},
            "shards": shards,
        }
        # relative shard names only: the manifest is byte-identical wherever the folder lives
        (folder / "manifest.json").write_text(
            json.dumps({"version": SAMPLE_VERSION, "seed": seed, **entry}, indent=2)
        )
        manifest["kinds"][kind] = entry
    (out / "manifest.json").write_text(json.dumps(manifest, indent=2))
    log.info("wrote sample shards to %s: %s", out, {k: v["counts"] for k, v in manifest["kinds"].items()})
    return manifest


def default_cache_root() -> Path:
    """``$GRIDGEN_CACHE`` if set, else ``~/.cache/gridgen``."""
    return Path(os.environ.get("GRIDGEN_CACHE") or Path.home() / ".cache" / "gridgen").expanduser()


def ensure_sample_shards(root: str | Path | None = None, seed: int = 0) -> Path:
    """The cached sample dataset folder ``<root>/sample-v1-seed{seed}``, generated with defaults on first use.

    The data is written to a temporary folder next to the target and renamed into place, so a crash or a
    concurrent run never leaves a half-written dataset behind: the folder exists only once it is complete.
    """
    base = Path(root).expanduser() if root is not None else default_cache_root()
    target = base / f"sample-v{SAMPLE_VERSION}-seed{seed}"
    if (target / "manifest.json").is_file():
        return target
    if target.exists():
        # manifest.json is written last and the folder appears atomically, so this is not ours to trust
        log.warning("%s exists but has no manifest.json (not written by gridgen?); regenerating it", target)
        shutil.rmtree(target)
    base.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.tmp-", dir=base))
    try:
        write_sample_shards(tmp, seed=seed)
        os.rename(tmp, target)  # atomic on one filesystem; fails if another process got there first
    except OSError:
        if (target / "manifest.json").is_file():  # lost a race against an identical writer: use theirs
            log.info("sample shards appeared concurrently at %s; using them", target)
            return target
        raise
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    log.info("generated sample shards at %s", target)
    return target
