"""gridgen.eval.shapes: the miniature world's detector on drawn shapes, and its validation at the issue's thresholds."""

import math

import numpy as np
import pytest

from gridgen.embedded.mini_data import cell_size
from gridgen.embedded.world import MINI_BACKGROUND, MINI_COLORS, MINI_RADIUS, SHAPES, draw_shapes, mini_scene
from gridgen.eval.shapes import (
    CHANCE,
    REAL_TARGET,
    DetectorValidation,
    NoiseResult,
    area_factor,
    describe_kept,
    detect,
    kept_identity,
    speck_area,
    validate_detector,
)


@pytest.fixture(scope="module")
def validation() -> DetectorValidation:
    return validate_detector()


def test_validation_meets_the_issue_thresholds(validation):
    """Issue 17: >= 99 % of real frames right (through mp4, prepare's decoder and the JPEG grid); noise at chance
    or below. 324 clips = every shape x colour x motion, 16 frames each."""
    assert validation.frames == 3 * 6 * 18 * 16
    assert validation.rate >= REAL_TARGET, validation.markdown()
    assert CHANCE == pytest.approx(1 / 18)
    side = cell_size("clips")  # the mini card's cells, what `make mini` scores
    assert set(validation.noise) == {f"uniform noise {side}px", f"blurred noise {side}px", f"patches noise {side}px",
                                     "mean real frame"}
    for kind, result in validation.noise.items():
        assert result.images >= 18 and result.right_rate <= CHANCE, (kind, validation.markdown())
    assert validation.passed
    assert validation.centroid_error_px[0] < 0.3, validation.markdown()
    text = validation.markdown()
    assert f"| real frames, every combination | {validation.frames} |" in text and "chance 5.56%" in text


def test_validation_fails_below_either_threshold(validation):
    """``passed`` is the issue's rule, not a formality: one frame short of 99 % or one noise hit above chance fails."""
    frames = 1000
    short = DetectorValidation(frames, math.ceil(REAL_TARGET * frames) - 1, frames, frames, (0.0, 0.0), {}, "")
    assert not short.passed
    exact = DetectorValidation(frames, math.ceil(REAL_TARGET * frames), frames, frames, (0.0, 0.0), {}, "")
    assert exact.passed
    lucky = NoiseResult(images=180, answered=180, right=11)  # 11 / 180 > 1 / 18
    assert not DetectorValidation(frames, frames, frames, frames, (0.0, 0.0), {"noise": lucky}, "").passed
    assert DetectorValidation(frames, frames, frames, frames, (0.0, 0.0),
                              {"noise": NoiseResult(180, 180, 10)}, "").passed


@pytest.mark.parametrize("size", [32, 64, 256])
def test_every_shape_and_colour_drawn_by_the_world_is_found(size):
    """Clean frames of the world at any cell size: the drawn shape and colour, the centre within 0.15 px (of
    the world's coordinates), the area within 1 % of the drawn coverage (a plain sum over the image)."""
    rng = np.random.default_rng(size)
    radius = MINI_RADIUS * size
    for shape in SHAPES:
        for color in MINI_COLORS:
            x, y = rng.uniform(radius + 1, size - radius - 1, size=2)
            cell = draw_shapes((size, size), [(shape, color, x, y, radius)])
            (blob,) = detect(cell)
            assert (blob.shape, blob.color) == (shape, color), (size, shape, color, blob)
            assert math.hypot(blob.x - x, blob.y - y) < 0.15 * max(1, size / 64), (blob, x, y)
            ink = np.subtract(MINI_COLORS[color], MINI_BACKGROUND)
            channel = int(np.argmax(ink))
            coverage = (cell[..., channel].astype(float) - MINI_BACKGROUND[channel]) / ink[channel]
            assert blob.area == pytest.approx(coverage.sum(), rel=0.01)


def test_area_factors_are_the_shapes_geometry():
    """Measured on the world's drawing; the plain formulas: pi r^2, (2 * 0.9 r)^2, 3 sqrt(3) / 4 r^2."""
    assert area_factor("circle") == pytest.approx(math.pi, rel=0.02)
    assert area_factor("square") == pytest.approx((2 * 0.9) ** 2, rel=0.02)
    assert area_factor("triangle") == pytest.approx(3 * math.sqrt(3) / 4, rel=0.03)


def test_several_blobs_come_largest_first():
    cell = draw_shapes((64, 64), [("triangle", "red", 14, 14, 10), ("square", "blue", 45, 45, 12)])
    blobs = detect(cell)
    assert [(b.shape, b.color) for b in blobs] == [("square", "blue"), ("triangle", "red")]
    assert blobs[0].area > blobs[1].area


def test_empty_cells_specks_and_foreign_colours():
    size = 32
    assert detect(np.full((size, size, 3), MINI_BACKGROUND, dtype=np.uint8)) == []
    speck = np.full((size, size, 3), MINI_BACKGROUND, dtype=np.uint8)
    side = math.floor(math.sqrt(speck_area(MINI_RADIUS * size)))  # a square speck of fewer pixels than speck_area
    speck[4:4 + side, 4:4 + side - 1] = MINI_COLORS["red"]
    assert detect(speck) == []
    speck[4:4 + side + 1, 4:4 + side + 1] = MINI_COLORS["red"]  # more than speck_area: a blob
    assert len(detect(speck)) == 1
    # a shape in a colour of no palette entry (white, grey): found, shaped, but no colour
    for foreign in ((245, 245, 245), (128, 128, 128)):
        cell = np.full((64, 64, 3), MINI_BACKGROUND, dtype=np.uint8)
        yy, xx = np.mgrid[0:64, 0:64] + 0.5
        cell[(xx - 30) ** 2 + (yy - 33) ** 2 <= 12**2] = foreign
        (blob,) = detect(cell)
        assert blob.color is None and blob.shape == "circle" and blob.color_distance > 54


def test_a_blob_unlike_any_shape_has_no_shape():
    """A thin ring covers no filled template well: found (area, centroid), but shape None."""
    yy, xx = np.mgrid[0:64, 0:64] + 0.5
    ring = np.abs(np.hypot(xx - 32, yy - 32) - 16) < 1.5
    cell = np.full((64, 64, 3), MINI_BACKGROUND, dtype=np.uint8)
    cell[ring] = MINI_COLORS["green"]
    (blob,) = detect(cell)
    assert blob.shape is None and blob.color == "green" and blob.dice < 0.75
    assert (blob.x, blob.y) == pytest.approx((32, 32), abs=0.2)


def test_a_shape_far_from_the_worlds_size_has_no_shape():
    """Half to twice the world's radius is a shape; a square filling the cell or a shape three times too big is
    not (the colour and centroid are still reported)."""
    for scale, expected in ((0.6, "circle"), (1.8, "circle"), (3.0, None)):
        cell = draw_shapes((96, 96), [("circle", "blue", 48, 48, scale * MINI_RADIUS * 96 / 3)])
        (blob,) = detect(cell, radius=MINI_RADIUS * 96 / 3)
        assert blob.shape == expected and blob.color == "blue", (scale, blob)
    full = np.full((32, 32, 3), MINI_COLORS["red"], dtype=np.uint8)
    (blob,) = detect(full)
    assert blob.shape is None and blob.color == "red" and (blob.x, blob.y) == pytest.approx((16, 16))


def test_scenes_of_several_shapes_are_read_at_the_frame_scale():
    """mini_scene (the base model's non-grid compositions): every placed shape, at the frame's radius."""
    rng = np.random.default_rng(3)
    for _ in range(10):
        image, _, placed = mini_scene(rng, canvas=96, frame=32)
        blobs = detect(image, radius=MINI_RADIUS * 32)
        assert sorted((b.shape, b.color) for b in blobs) == sorted((s, c) for s, c, _, _ in placed)
        for *_, x, y in placed:
            assert min(math.hypot(b.x - x, b.y - y) for b in blobs) < 0.2


def test_detect_refuses_what_is_not_an_rgb_cell():
    with pytest.raises(ValueError, match="uint8 \\(H, W, 3\\)"):
        detect(np.zeros((32, 32, 3), dtype=np.float32))
    with pytest.raises(ValueError, match="uint8 \\(H, W, 3\\)"):
        detect(np.zeros((32, 32), dtype=np.uint8))


def test_kept_identity_counts_copies_that_read_as_their_original():
    """Exact copies keep every identity; a copy with the colour swapped, a blank copy and a circle drawn as a square
    do not; originals that are not one shape are left out; per shape and over all, by a plain count."""
    size, radius = 32, MINI_RADIUS * 32

    def frame(shape, color):
        return draw_shapes((size, size), [(shape, color, 16.0, 16.0, radius)])

    originals = np.stack([frame("circle", "red"), frame("circle", "blue"), frame("square", "green"),
                          frame("triangle", "yellow"), np.full((size, size, 3), MINI_BACKGROUND, np.uint8)])
    assert kept_identity(originals, originals) == {"all": 1.0, "cells": 4, "circle": 1.0, "square": 1.0,
                                                   "triangle": 1.0}
    copies = np.stack([frame("square", "red"), frame("circle", "blue"), frame("square", "cyan"),
                       np.full((size, size, 3), MINI_BACKGROUND, np.uint8), frame("circle", "red")])
    kept = kept_identity(originals, copies)
    assert kept == {"all": 0.25, "cells": 4, "circle": 0.5, "square": 0.0, "triangle": 0.0}
    assert describe_kept(kept) == "25.0 % (circle 50 %, square 0 %, triangle 0 %)"
