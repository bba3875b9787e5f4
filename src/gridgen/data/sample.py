"""Procedural sample data: real raw inputs (mp4 clips, RGBA renders) made from a seed, prepared into shards.

Real datasets are large and licensed; tests, smoke runs and ``make train`` need data with the on-disk formats
of real ones, made in seconds. This module writes *raw inputs* like the real datasets' and runs them through
the same prepare path (:func:`gridgen.data.prepare.prepare`) as WebVid and Objaverse:

* ``video``: short H.264 mp4 clips (PyAV) of a coloured circle / square / triangle moving along a straight
  line or a circle on a plain background, listed in a WebVid-style CSV (``videoid, name, page_dir, duration,
  contentUrl`` + the drawing parameters) whose ``name`` is the caption ("a red circle moves from left to
  right on a blue background"). Prepared into 4x4 grids of 16 consecutive frames from a seeded random start.
* ``multiview``: 24 RGBA renders per object (a flat-shaded box / pyramid / prism, transparent background)
  taken by the 24 cameras of paper Table 5 (radius 2, horizontal circle, perspective), with a caption CSV.
  Prepared into 4x6 grids on black, with the cameras in every sample's json.

Sizes, counts and caption templates come from ``data_cards/sample.md``. Everything derives from
``SeedSequence([seed, kind, split, index])``: the same seed gives the same shards, and a sample does not
change when the number of samples does. The raw inputs stay beside the shards under ``raw/``.
"""

from __future__ import annotations

import csv
import json
import logging
import math
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image, ImageDraw

from gridgen.data.cards import load_card
from gridgen.data.prepare import prepare  # the same path as `make prepare`
from gridgen.data.sources.multiview import camera_azimuths, camera_to_world
from gridgen.data.sources.video import write_video

log = logging.getLogger(__name__)

SAMPLE_VERSION = 2  # bump when the generated content changes, so stale caches are not reused
SOURCE = "gridgen-sample"
CARD = "sample"
SUPERSAMPLE = 4  # draw at 4x and box-downsample: cheap anti-aliasing
FIELD_OF_VIEW_DEG = 50.0  # renders: perspective camera of the Table 5 circle
VIDEO_OPTIONS = {"crf": "18", "preset": "ultrafast"}
VOLATILE_KEYS = ("src", "seconds", "clips_per_sec", "frames_per_sec")  # prepare's run record, not the data

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

# Straight paths as (start, end) in unit coordinates of the frame's central square (x right, y down).
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


def _rng(seed: int, kind: str, split: str, index: int) -> np.random.Generator:
    # one independent stream per sample: a sample never depends on how many were generated
    return np.random.default_rng(np.random.SeedSequence([seed, _KIND_CODE[kind], _SPLIT_CODE[split], index]))


# ---- moving-shape clips ---------------------------------------------------------------------------


def _draw_shape(draw: ImageDraw.ImageDraw, shape: str, cx: float, cy: float, r: float, color: tuple) -> None:
    """Draw a filled ``shape`` of radius ``r`` centred at ``(cx, cy)``."""
    if shape == "circle":
        draw.ellipse((cx - r, cy - r, cx + r, cy + r), fill=color)
    elif shape == "square":
        s = r * 0.9  # a square of the same "radius" looks bigger than the circle; shrink it a little
        draw.rectangle((cx - s, cy - s, cx + s, cy + s), fill=color)
    elif shape == "triangle":
        # equilateral, pointing up, centred on its centroid
        points = [(cx + r * math.cos(a), cy - r * math.sin(a)) for a in (math.pi / 2, 7 * math.pi / 6, 11 * math.pi / 6)]
        draw.polygon(points, fill=color)
    else:
        raise ValueError(f"unknown shape {shape!r}; expected one of {SHAPES}")


def moving_shape_clip(rng: np.random.Generator, num_frames: int, height: int, width: int
                      ) -> tuple[np.ndarray, dict[str, str]]:
    """One clip: frames ``(T, height, width, 3)`` uint8 and its drawing parameters + caption (``name``).

    The motion stays inside the frame's central square, the part a square cell keeps after centre cropping.
    """
    shape = str(rng.choice(SHAPES))
    background = str(rng.choice(list(BACKGROUND_COLORS)))
    # never draw a shape in the background's colour: it would be invisible
    color = str(rng.choice([c for c in SHAPE_COLORS if c != background]))
    circular = bool(rng.random() < 0.3)
    path = str(rng.choice(CIRCULAR_PATHS)) if circular else str(rng.choice(list(STRAIGHT_PATHS)))

    h, w = height * SUPERSAMPLE, width * SUPERSAMPLE
    side = min(h, w)
    left, top = (w - side) / 2, (h - side) / 2  # the central square
    radius = float(rng.uniform(0.12, 0.2)) * side
    if circular:
        orbit = float(rng.uniform(0.2, 0.28)) * side
        start = float(rng.uniform(0, 2 * math.pi))
        sign = 1.0 if path == "in a clockwise circle" else -1.0  # y points down: +angle turns clockwise on screen
    else:
        (x0, y0), (x1, y1) = STRAIGHT_PATHS[path]

    frames = np.empty((num_frames, height, width, 3), dtype=np.uint8)
    for k in range(num_frames):
        if circular:
            # k / T (not k / (T-1)): one full loop without repeating the first position at the end
            angle = start + sign * 2 * math.pi * k / num_frames
            cx, cy = left + side / 2 + orbit * math.cos(angle), top + side / 2 + orbit * math.sin(angle)
        else:
            t = k / (num_frames - 1)
            # keep the whole shape inside the square: map unit coordinates onto [radius, side - radius]
            cx = left + radius + (x0 + (x1 - x0) * t) * (side - 2 * radius)
            cy = top + radius + (y0 + (y1 - y0) * t) * (side - 2 * radius)
        image = Image.new("RGB", (w, h), BACKGROUND_COLORS[background])
        _draw_shape(ImageDraw.Draw(image), shape, cx, cy, radius, SHAPE_COLORS[color])
        frames[k] = np.asarray(image.reduce(SUPERSAMPLE))
    meta = {"shape": shape, "color": color, "background": background, "path": path,
            "name": f"{_a(color)} {shape} moves {path} on {_a(background)} background"}
    return frames, meta


def write_raw_videos(folder: str | Path, split: str, count: int, seed: int, raw: dict[str, Any]) -> Path:
    """``count`` mp4 clips under ``folder/sample/`` and a WebVid-style ``folder/metadata.csv``; returns the CSV."""
    folder = Path(folder)
    (folder / "sample").mkdir(parents=True, exist_ok=True)
    fps, num_frames = int(raw["video_fps"]), int(raw["video_frames"])
    rows = []
    for index in range(count):
        videoid = f"video-{split}-{index:06d}"
        frames, meta = moving_shape_clip(_rng(seed, "video", split, index), num_frames, int(raw["video_height"]),
                                         int(raw["video_width"]))
        write_video(folder / "sample" / f"{videoid}.mp4", frames, fps=fps, options=VIDEO_OPTIONS)
        rows.append({"videoid": videoid, "name": meta.pop("name"), "page_dir": "sample",
                     "duration": f"PT00H00M{round(num_frames / fps):02d}S",  # WebVid's ISO 8601 format
                     "contentUrl": f"sample/{videoid}.mp4", **meta})
    return _write_csv(folder / "metadata.csv", rows)


# ---- multi-view renders ---------------------------------------------------------------------------


def _object_mesh(kind: str, rng: np.random.Generator) -> tuple[np.ndarray, list[list[int]]]:
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


def write_raw_renders(folder: str | Path, split: str, count: int, seed: int, raw: dict[str, Any],
                      cameras: str = "table5", radius: float = 2.0) -> Path:
    """``count`` objects as ``folder/<uid>/000.png ...`` (RGBA) and ``folder/metadata.csv``; returns the CSV."""
    folder = Path(folder)
    c2ws = [camera_to_world(a, radius) for a in camera_azimuths(int(raw["num_views"]), cameras)]
    rows = []
    for index in range(count):
        uid = f"multiview-{split}-{index:06d}"
        rng = _rng(seed, "multiview", split, index)
        obj, color = str(rng.choice(OBJECTS)), str(rng.choice(list(SHAPE_COLORS)))
        vertices, faces = _object_mesh(obj, rng)
        (folder / uid).mkdir(parents=True, exist_ok=True)
        for k, c2w in enumerate(c2ws):
            view = render_view(vertices, faces, SHAPE_COLORS[color], c2w, int(raw["render_size"]))
            Image.fromarray(view, "RGBA").save(folder / uid / f"{k:03d}.png", compress_level=1)
        rows.append({"uid": uid, "caption": f"{_a(color)} {obj}", "object": obj, "color": color})
    return _write_csv(folder / "metadata.csv", rows)


def _write_csv(path: Path, rows: list[dict[str, Any]]) -> Path:
    with path.open("w", newline="", encoding="utf-8") as handle:
        writer = csv.DictWriter(handle, fieldnames=list(rows[0]) if rows else ["id"])
        writer.writeheader()
        writer.writerows(rows)
    return path


# ---- through prepare ------------------------------------------------------------------------------


def _prepare_config(kind: str, card: dict[str, Any], cell_size: int, samples_per_shard: int, csv_path: Path,
                    src: Path, out: Path, split: str) -> dict[str, Any]:
    """The prepare config of one kind and split: the card's settings, the sample's own source columns."""
    pre, captions, shards = card["preprocessing"][kind], card["captioning"][kind], card["shards"]
    if kind == "video":
        source = {"kind": "video", "csv": csv_path.name, "id_column": "videoid", "caption_column": "name",
                  "path_templates": ["{page_dir}/{videoid}.mp4"]}
    else:
        source = {"kind": "multiview", "csv": csv_path.name, "id_column": "uid", "caption_column": "caption",
                  "num_views": int(card["raw"]["num_views"]), "background": pre["background"],
                  "cameras": pre["cameras"], "radius": float(pre["camera_radius"])}
    data = {
        "name": SOURCE, "key_prefix": "", "layout": pre["layout"], "cell_height": cell_size, "cell_width": cell_size,
        "source": source, "sampling": dict(pre.get("sampling") or {}),
        "captions": {"layout_template": captions["layout_template"], "content_template": captions["content_template"],
                     "captioner": card["captioning"]["captioner"]},
        "shards": {"format": shards["format"], "quality": shards["quality"], "maxcount": samples_per_shard,
                   "maxsize": shards["maxsize"]},
    }
    return {"data": data, "prepare": {"src": str(src), "out": str(out), "split": split, "seed": 0, "workers": 0,
                                      "progress": False}}


def write_sample_shards(
    out_dir: str | Path,
    *,
    num_video: int | None = None,
    num_multiview: int | None = None,
    num_val: int | None = None,
    cell_size: int | None = None,
    samples_per_shard: int | None = None,
    seed: int = 0,
) -> dict[str, Any]:
    """Write raw inputs under ``out_dir/raw/`` and prepare them into ``video/`` and ``multiview/`` shards.

    Each kind folder holds ``train-000000.tar ...`` (``samples_per_shard`` samples each), ``val-000000.tar ...``
    (``num_val`` samples) and prepare's ``manifest.json`` (counts per split, shard names, skipped inputs);
    ``out_dir/manifest.json`` combines both kinds and is returned. Unset sizes come from
    ``data_cards/sample.md``. Not atomic by itself: use :func:`ensure_sample_shards` for a crash-safe cached copy.
    """
    card = load_card(CARD)
    expected, raw = card["expected"], card["raw"]
    num_video = expected["video"]["train"] if num_video is None else num_video
    num_multiview = expected["multiview"]["train"] if num_multiview is None else num_multiview
    num_val = expected["video"]["val"] if num_val is None else num_val
    cell_size = int(card["preprocessing"]["video"]["cell_height"] if cell_size is None else cell_size)
    samples_per_shard = int(card["shards"]["maxcount"] if samples_per_shard is None else samples_per_shard)
    if samples_per_shard < 1:
        raise ValueError(f"samples_per_shard must be >= 1, got {samples_per_shard}")
    out = Path(out_dir)
    manifest: dict[str, Any] = {"version": SAMPLE_VERSION, "source": SOURCE, "seed": seed, "cell_size": cell_size,
                                "kinds": {}}
    counts = {"video": num_video, "multiview": num_multiview}
    for kind in ("video", "multiview"):
        folder = out / kind
        for split, count in (("train", counts[kind]), ("val", num_val)):
            src = out / "raw" / kind / split
            src.mkdir(parents=True, exist_ok=True)
            if kind == "video":
                csv_path = write_raw_videos(src, split, count, seed, raw)
            else:
                pre = card["preprocessing"]["multiview"]
                csv_path = write_raw_renders(src, split, count, seed, raw, pre["cameras"], float(pre["camera_radius"]))
            entry = prepare(_prepare_config(kind, card, cell_size, samples_per_shard, csv_path, src, folder, split))
            if entry["counts"]["samples"] != count:  # the sample data is made to be usable: nothing may drop out
                raise RuntimeError(f"sample {kind}/{split}: {count} inputs gave {entry['counts']['samples']} grids "
                                   f"(skipped: {entry['counts']['skipped']} {entry['counts']['examples']})")
        kind_manifest = json.loads((folder / "manifest.json").read_text())
        kind_manifest.update({"version": SAMPLE_VERSION, "seed": seed})
        for entry in kind_manifest["splits"].values():  # the same bytes wherever and however fast it was made
            for key in VOLATILE_KEYS:
                entry.pop(key, None)
        (folder / "manifest.json").write_text(json.dumps(kind_manifest, indent=2) + "\n")
        manifest["kinds"][kind] = {key: kind_manifest[key] for key in ("kind", "layout", "counts", "shards")}
    (out / "manifest.json").write_text(json.dumps(manifest, indent=2) + "\n")
    log.info("wrote sample shards to %s: %s", out, {k: v["counts"] for k, v in manifest["kinds"].items()})
    return manifest


def default_cache_root() -> Path:
    """``$GRIDGEN_CACHE`` if set, else ``~/.cache/gridgen``."""
    return Path(os.environ.get("GRIDGEN_CACHE") or Path.home() / ".cache" / "gridgen").expanduser()


def ensure_sample_shards(root: str | Path | None = None, seed: int = 0) -> Path:
    """The cached sample dataset folder ``<root>/sample-v2-seed{seed}``, generated with defaults on first use.

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
