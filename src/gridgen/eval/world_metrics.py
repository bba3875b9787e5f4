"""Per-grid metrics of the miniature world (issue 17), from the detector's blobs (:mod:`gridgen.eval.shapes`) and
the prompt, read back with :func:`~gridgen.embedded.world.parse_mini_caption`.

A grid's frames are its cells in film-strip order; the *track* is the centroid of each cell's largest blob (px,
y down), defined only when every cell has a blob. Lengths below are in px of a cell of side ``s`` (the world
draws in frame sides: a slow path is 0.3 s, a fast one 0.6 s, the orbit radius 0.2 s).

- **identity**: every cell holds exactly one blob, of the prompted shape and colour (``cells_right`` counts the
  cells that do).
- **motion** (needs the track). Straight prompts: the least-squares velocity points within ``DIRECTION_TOLERANCE``
  (22.5 deg, half the angle between neighbouring directions) of the prompted direction, and the fitted
  displacement over the clip, ``|v| (F - 1)``, is at least half the slow path. Circles: the signed turn of the track
  around the centre of a circle fitted to it (the sum of the angles between consecutive radius vectors; y down,
  so positive = clockwise) has the prompted sign and covers at least ``MIN_TURN`` (3/4) of a loop, and the mean
  radius is at least half the world's orbit radius (a blob jittering in place does not turn).
- **speed** (straight prompts with a track): the fitted displacement is nearer the prompted speed's path than
  the other speed's.
- **smoothness**: RMS distance (px) of the track from the prompted motion model fitted to it by least squares:
  a constant-velocity line; for circles a constant angular step ``sign * 2 pi / F`` (one turn per clip, as the
  world draws it) with fitted centre, radius and phase.
- **row break**: the mean step across the layout's row breaks (cells 4->5, 8->9, 12->13 of a 4x4 grid, 1-based)
  over the median step within rows; 1.0 = as smooth across rows as within them. Undefined when the median step
  within rows is below half the world's slowest step (a static track has no step to compare with).

Undefined metrics are ``None`` and :func:`summarize` counts them as missing, never as 0.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np

from gridgen.embedded.world import (
    CIRCLES,
    DIRECTIONS,
    MINI_BACKGROUND,
    ORBIT_RADIUS,
    SPEEDS,
    Motion,
    parse_mini_caption,
)
from gridgen.eval.shapes import Blob, detect
from gridgen.layout import GridLayout

DIRECTION_TOLERANCE = 22.5  # degrees
MIN_DISPLACEMENT = 0.5 * min(SPEEDS.values())  # frame sides: half the slow path
MIN_TURN = 0.75  # of a full loop
MIN_ORBIT = 0.5 * ORBIT_RADIUS  # frame sides
WORLD_PROTOCOL = (
    "miniature-world detector (gridgen.eval.shapes) per cell; track = each cell's largest blob; identity: exactly "
    f"one blob of the prompted shape and colour in every cell; motion: least-squares velocity within "
    f"{DIRECTION_TOLERANCE} deg of the prompted direction over >= {MIN_DISPLACEMENT:g} cell sides, circles: turn "
    f"of the prompted sign over >= {MIN_TURN:g} loop at radius >= {MIN_ORBIT:g} sides; speed: nearer the prompted "
    "path length (straight prompts); smoothness: RMS px from the prompted motion fitted by least squares; row "
    "break: mean step across row breaks / median step within rows; 'missing': grids without a blob in every cell "
    "(row break also: tracks that do not move)")


@dataclass
class GridScore:
    """The world metrics of one grid (``None``: undefined for it, see the module docstring)."""

    caption: str
    shape: str
    color: str
    motion: str
    cells: int
    blobs: list[int]  # blobs found per cell, film-strip order
    cells_right: int  # cells with exactly one blob, of the prompted shape and colour
    identity: bool
    track: list[tuple[float, float]] | None  # centroid of each cell's largest blob, px
    motion_correct: bool | None
    speed_correct: bool | None  # None for circles
    smoothness_px: float | None
    row_break: float | None

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def velocity_fit(track: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Least-squares constant velocity: ``v`` (px / frame) and the residuals ``(F, 2)``."""
    k = np.arange(len(track), dtype=np.float64)
    design = np.stack([np.ones_like(k), k], axis=1)  # (F, 2): offset, slope
    coef, *_ = np.linalg.lstsq(design, track, rcond=None)  # (2, 2): rows offset / velocity, columns x / y
    return coef[1], track - design @ coef


def _circle_fit(track: np.ndarray, step: float) -> np.ndarray:
    """Residuals ``(F, 2)`` of ``p_k = c + R (cos(phi + step k), sin(phi + step k))`` fitted by least squares,
    linear in ``(cx, cy, a, b) = (cx, cy, R cos phi, R sin phi)``."""
    angle = step * np.arange(len(track), dtype=np.float64)
    cos, sin, one, zero = np.cos(angle), np.sin(angle), np.ones_like(angle), np.zeros_like(angle)
    design = np.concatenate([np.stack([one, zero, cos, -sin], axis=1),  # x_k = cx + a cos - b sin
                             np.stack([zero, one, sin, cos], axis=1)])  # y_k = cy + a sin + b cos
    target = np.concatenate([track[:, 0], track[:, 1]])  # (2F,)
    coef, *_ = np.linalg.lstsq(design, target, rcond=None)
    return (target - design @ coef).reshape(2, -1).T  # (F, 2)


def _rms(residuals: np.ndarray) -> float:
    return float(np.sqrt(np.mean(np.sum(residuals**2, axis=1))))


def _turn(track: np.ndarray) -> tuple[float, float]:
    """Signed turn (radians, y down: positive = clockwise) of the track around the centre of the circle fitted
    to it, and its mean radius (px). The fit is Kasa's algebraic least squares, ``x^2 + y^2 = 2 cx x + 2 cy y +
    e``: unlike the track's mean, it stays at the centre of an arc that covers only part of a loop."""
    design = np.concatenate([2 * track, np.ones((len(track), 1))], axis=1)  # (F, 3)
    (cx, cy, _), *_ = np.linalg.lstsq(design, np.sum(track**2, axis=1), rcond=None)
    radius = track - np.array([cx, cy])  # (F, 2)
    a, b = radius[:-1], radius[1:]
    cross = a[:, 0] * b[:, 1] - a[:, 1] * b[:, 0]
    dot = np.sum(a * b, axis=1)
    return float(np.sum(np.arctan2(cross, dot))), float(np.mean(np.linalg.norm(radius, axis=1)))


def _motion(track: np.ndarray, motion: Motion, side: float) -> tuple[bool, bool | None, float]:
    """(direction right, speed right or None for circles, smoothness px) of a track ``(F, 2)``."""
    frames = len(track)
    if motion.circular:
        sign = CIRCLES[motion.family]
        turn, radius = _turn(track)
        correct = (np.sign(turn) == sign and abs(turn) >= MIN_TURN * 2 * math.pi and radius >= MIN_ORBIT * side)
        return bool(correct), None, _rms(_circle_fit(track, sign * 2 * math.pi / frames))
    velocity, residuals = velocity_fit(track)
    displacement = float(np.linalg.norm(velocity)) * (frames - 1)
    direction = np.asarray(DIRECTIONS[motion.family])
    cosine = float(velocity @ direction) / max(float(np.linalg.norm(velocity)), 1e-12)
    aligned = cosine >= math.cos(math.radians(DIRECTION_TOLERANCE))
    correct = aligned and displacement >= MIN_DISPLACEMENT * side
    nearest = min(SPEEDS, key=lambda speed: abs(SPEEDS[speed] * side - displacement))
    return bool(correct), nearest == motion.speed, _rms(residuals)


def _row_break(track: np.ndarray, cols: int, side: float) -> float | None:
    steps = np.linalg.norm(np.diff(track, axis=0), axis=1)  # (F - 1,): step k goes from cell k to cell k + 1
    across = (np.arange(len(steps)) + 1) % cols == 0  # the last cell of a row to the first of the next
    if not across.any() or across.all():
        return None
    within = float(np.median(steps[~across]))
    slowest_step = min(SPEEDS.values()) * side / (len(track) - 1)
    if within < 0.5 * slowest_step:
        return None
    return float(np.mean(steps[across])) / within


def score_cells(cells: np.ndarray, cols: int, caption: str,
                background: tuple[int, int, int] = MINI_BACKGROUND) -> GridScore:
    """The world metrics of a grid's cells ``(F, H, W, 3)`` uint8 (film-strip order, ``cols`` per row), prompted
    with ``caption`` (a :func:`~gridgen.embedded.world.mini_caption`; any other is refused)."""
    shape, color, motion = parse_mini_caption(caption)
    if cells.ndim != 4 or cells.shape[-1] != 3 or len(cells) < 2:
        raise ValueError(f"cells must be (frames >= 2, H, W, 3), got {cells.shape}")
    found: list[list[Blob]] = [detect(cell, background) for cell in cells]
    right = sum(len(blobs) == 1 and (blobs[0].shape, blobs[0].color) == (shape, color) for blobs in found)
    side = float(min(cells.shape[1:3]))
    score = GridScore(caption, shape, color, motion.words, len(cells), [len(b) for b in found], right,
                      right == len(cells), None, None, None, None, None)
    if all(found):
        track = np.array([(blobs[0].x, blobs[0].y) for blobs in found], dtype=np.float64)  # (F, 2)
        score.track = [(float(x), float(y)) for x, y in track]
        score.motion_correct, score.speed_correct, score.smoothness_px = _motion(track, motion, side)
        score.row_break = _row_break(track, cols, side)
    return score


def score_grid(grid: np.ndarray, layout: GridLayout, caption: str,
               background: tuple[int, int, int] = MINI_BACKGROUND) -> GridScore:
    """:func:`score_cells` of a grid image ``(H, W, 3)`` uint8 cut into cells by ``layout``."""
    import torch

    if grid.shape != (layout.height, layout.width, 3):
        raise ValueError(f"grid of shape {grid.shape} does not match layout {layout.name} of "
                         f"{layout.cell_height}x{layout.cell_width} px cells ({layout.height}, {layout.width}, 3)")
    cells = layout.untile(torch.from_numpy(grid.copy()).permute(2, 0, 1))  # (F, 3, h, w); copy: PIL arrays are read-only
    return score_cells(cells.permute(0, 2, 3, 1).numpy(), layout.cols, caption, background)


@dataclass(frozen=True)
class Aggregate:
    """A metric over a set of grids: its mean where defined, how many grids that is, how many lacked it."""

    value: float | None
    n: int
    missing: int


def summarize(scores: list[GridScore]) -> dict[str, Aggregate]:
    """Fractions (identity, motion, speed) and means (identity_cells, smoothness_px, row_break) over the grids;
    a metric undefined for a grid is counted in ``missing``. Speed counts the straight prompts only."""
    def mean(values: list[float | bool | None], applicable: int) -> Aggregate:
        present = [float(v) for v in values if v is not None]
        return Aggregate(float(np.mean(present)) if present else None, len(present), applicable - len(present))

    straight = [s for s in scores if s.motion not in CIRCLES]
    return {
        "identity": mean([s.identity for s in scores], len(scores)),
        "identity_cells": mean([s.cells_right / s.cells for s in scores], len(scores)),
        "motion": mean([s.motion_correct for s in scores], len(scores)),
        "speed": mean([s.speed_correct for s in straight], len(straight)),
        "smoothness_px": mean([s.smoothness_px for s in scores], len(scores)),
        "row_break": mean([s.row_break for s in scores], len(scores)),
    }
