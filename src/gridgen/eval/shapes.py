"""A detector for the miniature world (:mod:`gridgen.embedded.world`): per cell, the blobs on its black
background with their shape, colour, centroid and area. Plain numpy + ``scipy.ndimage``.

How one cell (uint8 ``(H, W, 3)``) is read:

1. **Foreground**: pixels whose RGB distance to the background exceeds ``FOREGROUND`` (0.4) of the distance of
   the dimmest palette colour to it; 8-connected components (``scipy.ndimage.label``) smaller than ``SPECK``
   (0.25) of the smallest shape's area at this cell size (the triangle's) are specks and dropped.
2. **Colour**: the per-channel median of the blob's most saturated quarter of pixels (``CORE``: H.264 and JPEG
   keep chroma at half resolution, so edge pixels are the colour blended with the background, and a thin
   triangle has few others); the nearest ``MINI_COLORS`` entry, or ``None`` when it is further than half the
   distance between the two closest palette colours (blue and purple, 109), so no colour is ever ambiguous.
3. **Coverage, centroid, area**: each pixel of the blob (grown by one pixel, to take back its faint edge) is
   projected on the line from the background to the blob's colour, ``a = clip(<p - bg, c - bg> / |c - bg|^2,
   0, 1)``; ``area = sum(a)`` px and the centroid is the ``a``-weighted mean of pixel centres (pixel ``j``
   spans ``[j, j + 1)``: the coordinates of the world's centres).
4. **Shape**: template matching against the world's own drawing (``draw_shapes``): for each shape, the
   template of the same area drawn at the centroid; the shape is the one of highest soft Dice
   ``2 sum(min(a, t)) / (sum(a) + sum(t))``, or ``None`` when even that is below ``MIN_DICE`` (0.75), or when that
   template's radius is outside ``SIZES`` (0.5-2) times the world's (``MINI_RADIUS`` of the cell side, or the
   ``radius`` given): a blob filling the cell is no shape of the world. Triangles point up and squares are
   axis-aligned, as the world draws them, so no rotation is searched.

:func:`validate_detector` measures it on real frames through the data pipeline and on noise.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from functools import cache
from itertools import combinations
from pathlib import Path

import numpy as np
from scipy import ndimage

from gridgen.embedded.world import (
    MINI_BACKGROUND,
    MINI_COLORS,
    MINI_RADIUS,
    MOTIONS,
    SHAPES,
    draw_shapes,
    mini_clip,
)
from gridgen.layout import GridLayout

FOREGROUND = 0.4  # of the dimmest palette colour's distance to the background
SPECK = 0.25  # of the smallest shape's area at this cell size
CORE = 75  # percentile of a blob's chroma above which its pixels give its colour
MIN_DICE = 0.75  # a blob that no shape template covers this well has no shape
SIZES = (0.5, 2.0)  # radius of a shape, relative to the world's at this scale
EIGHT_CONNECTED = np.ones((3, 3), dtype=bool)


@dataclass(frozen=True)
class Blob:
    """One connected blob of a cell: ``shape`` / ``color`` are ``None`` where nothing in the world fits."""

    shape: str | None
    color: str | None
    x: float  # centroid, px from the cell's left edge
    y: float  # centroid, px from the cell's top edge
    area: float  # px, coverage-weighted
    dice: float  # soft Dice of the best shape template, 0..1
    color_distance: float  # RGB distance of the blob's colour to the nearest palette colour


@cache
def _palette(background: tuple[int, int, int]) -> tuple[np.ndarray, float, float]:
    """Palette ``(6, 3)``, the foreground threshold and the colour tolerance, for this background."""
    palette = np.asarray(list(MINI_COLORS.values()), dtype=np.float32)  # (6, 3)
    contrast = np.linalg.norm(palette - np.asarray(background, dtype=np.float32), axis=1)
    closest_pair = min(float(np.linalg.norm(a - b)) for a, b in combinations(palette, 2))
    return palette, FOREGROUND * float(contrast.min()), closest_pair / 2


# The template ink: the palette colour with the brightest channel, drawn on pure black, so that
# coverage = that channel / its value (the world's 4x box filter gives multiples of 1/16 of it).
_INK = max(MINI_COLORS, key=lambda c: max(MINI_COLORS[c]))
_INK_CHANNEL = int(np.argmax(MINI_COLORS[_INK]))
_INK_VALUE = float(MINI_COLORS[_INK][_INK_CHANNEL])


def _templates(size: tuple[int, int], placed: list[tuple[str, float, float, float]]) -> np.ndarray:
    """Coverage ``(len(placed), h, w)`` in [0, 1] of world shapes ``(shape, cx, cy, radius)`` px, each in its own
    ``size`` panel (drawn side by side in one image: one PIL call for all of them)."""
    height, width = size
    strip = draw_shapes((height, width * len(placed)),
                        [(shape, _INK, cx + i * width, cy, radius) for i, (shape, cx, cy, radius) in enumerate(placed)],
                        background=(0, 0, 0))
    coverage = strip[..., _INK_CHANNEL].astype(np.float32) / _INK_VALUE  # (h, n * w)
    return coverage.reshape(height, len(placed), width).transpose(1, 0, 2)  # (n, h, w)


@cache
def area_factor(shape: str) -> float:
    """Drawn area / radius^2 of a world shape (pi for the circle, 3.24 for its 0.9-shrunk square, ~1.3 for the
    triangle), measured on the world's own anti-aliased drawing at a 40 px radius."""
    radius = 40.0
    return float(_templates((100, 100), [(shape, 50.0, 50.0, radius)]).sum()) / radius**2


def speck_area(radius: float) -> float:
    """Components below this many px are noise: ``SPECK`` of the smallest world shape of this ``radius`` (px)."""
    return SPECK * min(area_factor(s) for s in SHAPES) * radius**2


def _nearest_color(rgb: np.ndarray, background: tuple[int, int, int]) -> tuple[str | None, float]:
    palette, _, tolerance = _palette(background)
    distances = np.linalg.norm(palette - rgb, axis=1)
    best = int(np.argmin(distances))
    return (list(MINI_COLORS)[best] if distances[best] <= tolerance else None), float(distances[best])


def _best_shape(coverage: np.ndarray, x: float, y: float, area: float, radius: float) -> tuple[str | None, float]:
    """The shape whose world template of the blob's area, drawn at its centroid ``(x, y)`` (window px), best
    matches ``coverage`` (the window holds every template whole); None if it is no good match or not of the
    world's size (``radius`` px)."""
    radii = [math.sqrt(area / area_factor(shape)) for shape in SHAPES]
    templates = _templates(coverage.shape, [(shape, x, y, r) for shape, r in zip(SHAPES, radii, strict=True)])
    overlap = np.minimum(coverage[None], templates).sum(axis=(1, 2))  # (shapes,)
    dice = 2 * overlap / (area + templates.sum(axis=(1, 2)))
    best = int(np.argmax(dice))
    fits = dice[best] >= MIN_DICE and SIZES[0] * radius <= radii[best] <= SIZES[1] * radius
    return (SHAPES[best] if fits else None), float(dice[best])


def detect(cell: np.ndarray, background: tuple[int, int, int] = MINI_BACKGROUND, radius: float | None = None
           ) -> list[Blob]:
    """The blobs of one cell, uint8 ``(H, W, 3)``, largest first (see the module docstring). ``radius``: the
    world's shape radius in px here; default ``MINI_RADIUS`` of the cell's side (a frame of the world)."""
    if cell.ndim != 3 or cell.shape[2] != 3 or cell.dtype != np.uint8:
        raise ValueError(f"a cell must be a uint8 (H, W, 3) image, got {cell.dtype} {cell.shape}")
    height, width = cell.shape[:2]
    radius = MINI_RADIUS * min(height, width) if radius is None else float(radius)
    bg = np.asarray(background, dtype=np.float32)
    offset = cell.astype(np.float32) - bg  # (H, W, 3)
    distance = np.linalg.norm(offset, axis=2)  # (H, W)
    _, threshold, _ = _palette(tuple(background))
    labels, count = ndimage.label(distance > threshold, structure=EIGHT_CONNECTED)
    if count == 0:
        return []
    sizes = np.bincount(labels.ravel(), minlength=count + 1)
    min_size = speck_area(radius)
    blobs = []
    for index, box in enumerate(ndimage.find_objects(labels), start=1):
        if sizes[index] < min_size:
            continue
        # the component's box, one pixel wider on each side to take back its faint edge
        top, left = max(box[0].start - 1, 0), max(box[1].start - 1, 0)
        bottom, right = min(box[0].stop + 1, height), min(box[1].stop + 1, width)
        window = labels[top:bottom, left:right]
        mine = window == index
        pixels = cell[top:bottom, left:right][mine].astype(np.float32)  # (n, 3)
        # its colour from its most saturated pixels: codecs blur chroma into the background at the edges
        chroma = np.linalg.norm(pixels - pixels.mean(axis=1, keepdims=True), axis=1)
        rgb = np.median(pixels[chroma >= np.percentile(chroma, CORE)], axis=0)
        color, color_distance = _nearest_color(rgb, tuple(background))
        ink = rgb - bg
        region = ndimage.binary_dilation(mine, EIGHT_CONNECTED) & ((window == 0) | mine)
        coverage = np.clip(offset[top:bottom, left:right] @ ink / max(float(ink @ ink), 1e-6), 0, 1) * region
        area = float(coverage.sum())
        if area < 1.0:  # a colour that explains almost none of its own pixels (noise): weigh them all alike
            coverage, area = mine.astype(np.float32), float(mine.sum())
        x = float(coverage.sum(axis=0) @ (np.arange(left, right) + 0.5)) / area  # pixel j spans [j, j + 1)
        y = float(coverage.sum(axis=1) @ (np.arange(top, bottom) + 0.5)) / area
        # a window around the centroid that holds every shape's template of this area whole (the triangle's,
        # of the smallest area factor, reaches furthest), the blob's coverage pasted in
        reach = math.sqrt(area / min(area_factor(s) for s in SHAPES)) + 1
        w_top, w_left = min(top, math.floor(y - reach)), min(left, math.floor(x - reach))
        w_bottom, w_right = max(bottom, math.ceil(y + reach)), max(right, math.ceil(x + reach))
        padded = np.zeros((w_bottom - w_top, w_right - w_left), dtype=np.float32)
        padded[top - w_top:bottom - w_top, left - w_left:right - w_left] = coverage
        shape, dice = _best_shape(padded, x - w_left, y - w_top, area, radius)
        blobs.append(Blob(shape, color, x, y, area, dice, color_distance))
    return sorted(blobs, key=lambda b: -b.area)


# ---- validation: real frames through the data pipeline, and noise ------------------------------------------
REAL_TARGET = 0.99  # issue 17: >= 99 % of real test frames right (one blob, right shape and colour)
CHANCE = 1 / (len(SHAPES) * len(MINI_COLORS))  # a detector that always names one of the 18 pairs at random


def pipeline_cells(frames: np.ndarray, cell: int, folder: Path, name: str, quality: int = 95) -> np.ndarray:
    """A clip ``(16, h, w, 3)`` uint8 as training sees it ``(16, cell, cell, 3)``: an H.264 mp4 (the data sets'
    writer, x264 defaults), decoded and fitted to the cell by ``prepare``'s own video source, tiled into a 4x4
    grid and stored as a JPEG of ``quality`` (``prepare``'s shard format), read back and untiled."""
    import torch

    from gridgen.data.decoding import read_rgb_channels_last
    from gridgen.data.sources.base import FrameSampling, RawItem
    from gridgen.data.sources.video import VideoSource, write_video
    from gridgen.data.tiling import encode_image, tile_frames

    layout = GridLayout(4, 4, cell, cell)
    path = write_video(folder / f"{name}.mp4", frames, fps=8)
    (clip,) = VideoSource(folder).load(RawItem(name, str(path)), cell, cell, layout.num_cells,
                                       FrameSampling(stride=1, start=0), np.random.default_rng(0))
    grid = read_rgb_channels_last(encode_image(tile_frames(clip.frames, layout), "jpg", quality))  # (H, W, 3)
    cells = layout.untile(torch.from_numpy(grid.copy()).permute(2, 0, 1))  # (16, 3, cell, cell)
    return cells.permute(0, 2, 3, 1).numpy()  # (16, cell, cell, 3)


NOISE_KINDS = ("uniform", "blurred", "patches")


def noise_images(kind: str, count: int, size: int, rng: np.random.Generator) -> np.ndarray:
    """``(count, size, size, 3)`` uint8 images that hold no world shape: ``uniform`` noise; ``blurred`` noise (a
    Gaussian of sigma = a third of the world's shape radius, each channel stretched to 0..255: coloured blobs of
    shape scale); ``patches``: noise blurred by half the radius and standardised per channel, ``10 + 120 z``
    clipped, so coloured patches of shape size lie on a near-black ground, as the world's shapes do."""
    if kind not in NOISE_KINDS:
        raise ValueError(f"noise kind must be one of {NOISE_KINDS}, got {kind!r}")
    noise = rng.integers(0, 256, size=(count, size, size, 3)).astype(np.float32)
    if kind == "uniform":
        return noise.astype(np.uint8)
    sigma = MINI_RADIUS * size / (3 if kind == "blurred" else 2)
    blurred = ndimage.gaussian_filter(noise, sigma=(0, sigma, sigma, 0))  # (count, size, size, 3)
    if kind == "blurred":
        low, high = blurred.min(axis=(1, 2), keepdims=True), blurred.max(axis=(1, 2), keepdims=True)
        return np.round(255 * (blurred - low) / np.maximum(high - low, 1e-6)).astype(np.uint8)
    mean, std = blurred.mean(axis=(1, 2), keepdims=True), blurred.std(axis=(1, 2), keepdims=True)
    return np.clip(np.round(10 + 120 * (blurred - mean) / np.maximum(std, 1e-6)), 0, 255).astype(np.uint8)


@dataclass
class NoiseResult:
    """Detections on images that hold no world shape, each asked for one (shape, colour) pair in turn."""

    images: int
    answered: int  # exactly one blob, with a shape and a colour
    right: int  # ... and it is the pair asked for

    @property
    def right_rate(self) -> float:
        return self.right / self.images


@dataclass
class DetectorValidation:
    """The detector's figures: real test frames (through the data pipeline) and noise (chance: ``CHANCE``)."""

    frames: int
    right: int  # exactly one blob, of the drawn shape and colour
    shape_right: int  # exactly one blob, of the drawn shape
    color_right: int  # exactly one blob, of the drawn colour
    centroid_error_px: tuple[float, float]  # mean, max distance to the drawn centre (scaled to the cell)
    noise: dict[str, NoiseResult]
    setup: str

    @property
    def rate(self) -> float:
        return self.right / self.frames

    @property
    def passed(self) -> bool:
        return self.rate >= REAL_TARGET and all(n.right_rate <= CHANCE for n in self.noise.values())

    def markdown(self) -> str:
        lines = [f"Detector validation ({self.setup})", "",
                 "| images | N | right (shape and colour) | shape | colour | target |", "|" + " --- |" * 6,
                 f"| real frames, every combination | {self.frames} | {self.rate:.2%} | "
                 f"{self.shape_right / self.frames:.2%} | {self.color_right / self.frames:.2%} | "
                 f">= {REAL_TARGET:.0%} |"]
        for kind, result in self.noise.items():
            answered = result.answered / result.images
            lines.append(f"| {kind} | {result.images} | {result.right_rate:.2%} (answered {answered:.2%}) | - | - | "
                         f"<= chance {CHANCE:.2%} |")
        mean, worst = self.centroid_error_px
        lines += ["", f"Centroid error on real frames: {mean:.3f} px mean, {worst:.3f} px max."]
        return "\n".join(lines)


def _one_right(blobs: list[Blob], shape: str, color: str) -> tuple[bool, bool, bool]:
    """(shape and colour, shape, colour) right, each with exactly one blob found."""
    if len(blobs) != 1:
        return False, False, False
    return blobs[0].shape == shape and blobs[0].color == color, blobs[0].shape == shape, blobs[0].color == color


def kept_identity(originals: np.ndarray, copies: np.ndarray) -> dict[str, float]:
    """How often a copy (e.g. a VAE's reconstruction) of a one-shape cell still reads as the same shape and colour:
    uint8 ``(N, H, W, 3)`` each, paired by index; cells where the original itself is not one blob are left out.
    Returns the fraction over all and per shape (``all``, ``circle``, ...), and ``cells`` counted."""
    kept: dict[str, list[bool]] = {}
    for original, copy in zip(originals, copies, strict=True):
        blobs = detect(original)
        if len(blobs) != 1 or blobs[0].shape is None or blobs[0].color is None:
            continue
        kept.setdefault(blobs[0].shape, []).append(_one_right(detect(copy), blobs[0].shape, blobs[0].color)[0])
    every = [k for values in kept.values() for k in values]
    return {"all": sum(every) / max(len(every), 1), "cells": len(every),
            **{shape: sum(values) / len(values) for shape, values in sorted(kept.items())}}


def describe_kept(kept: dict[str, float]) -> str:
    """:func:`kept_identity`'s figures as text: ``92.1 % (circle 79 %, square 98 %, triangle 100 %)``."""
    shapes = ", ".join(f"{k} {100 * v:.0f} %" for k, v in kept.items() if k not in ("all", "cells"))
    return f"{100 * kept['all']:.1f} % ({shapes})"


def validate_detector(frame_size: int | None = None, cell: int | None = None, seed: int = 0, noise_count: int = 324
                      ) -> DetectorValidation:
    """Run the detector on one clip of every shape x colour x motion (324 clips, 16 frames each) drawn at
    ``frame_size`` px and brought to ``cell`` px through the data pipeline (:func:`pipeline_cells`), and on
    ``noise_count`` images of each :func:`noise_images` kind plus the mean real frame, each noise image asked for
    the 18 (shape, colour) pairs in turn. The mp4s live in a temporary folder. Sizes default to the mini card's
    (its raw clips and their prepared cells: what ``make mini`` scores)."""
    import tempfile

    from gridgen.data.cards import load_card
    from gridgen.embedded.mini_data import CARD, cell_size

    frame_size = int(load_card(CARD)["raw"]["video_size"]) if frame_size is None else frame_size
    cell = cell_size("clips") if cell is None else cell

    rng = np.random.default_rng(seed)
    right = shape_right = color_right = frames = 0
    errors, mean_frame = [], np.zeros((cell, cell, 3), dtype=np.float64)
    with tempfile.TemporaryDirectory() as tmp:
        for index, (shape, color, motion) in enumerate(
                (s, c, m) for s in SHAPES for c in MINI_COLORS for m in MOTIONS):
            clip, centres = mini_clip(rng, shape, color, motion, 16, frame_size)
            cells = pipeline_cells(clip, cell, Path(tmp), f"clip{index:03d}")
            for frame, (cx, cy) in zip(cells, centres * cell / frame_size, strict=True):
                blobs = detect(frame)
                both, good_shape, good_color = _one_right(blobs, shape, color)
                right, shape_right, color_right = right + both, shape_right + good_shape, color_right + good_color
                frames += 1
                mean_frame += frame
                if blobs:
                    errors.append(math.hypot(blobs[0].x - cx, blobs[0].y - cy))
    pairs = [(s, c) for s in SHAPES for c in MINI_COLORS]
    noise = {}
    sets = {f"{kind} noise {cell}px": noise_images(kind, noise_count, cell, rng) for kind in NOISE_KINDS}
    sets["mean real frame"] = np.repeat(np.round(mean_frame / frames).astype(np.uint8)[None], len(pairs), axis=0)
    for kind, images in sets.items():
        answered = hits = 0
        for index, image in enumerate(images):
            blobs = detect(image)
            one = len(blobs) == 1 and blobs[0].shape is not None and blobs[0].color is not None
            answered += one
            hits += _one_right(blobs, *pairs[index % len(pairs)])[0]
        noise[kind] = NoiseResult(len(images), answered, hits)
    setup = (f"mini_clip at {frame_size} px -> H.264 mp4 -> prepare's decoder to {cell} px cells -> 4x4 JPEG grid "
             f"(quality 95); seed {seed}")
    return DetectorValidation(frames, right, shape_right, color_right,
                              (float(np.mean(errors)), float(np.max(errors))), noise, setup)
