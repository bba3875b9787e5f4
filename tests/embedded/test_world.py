"""The moving-shape clips move as their captions say."""

from __future__ import annotations

import math

import numpy as np
import pytest

from gridgen.embedded.world import (
    BACKGROUND_COLORS,
    CIRCLES,
    DIRECTIONS,
    FAMILIES,
    FRAME_PREFIXES,
    FRAME_SUFFIX,
    MINI_COLORS,
    MINI_RADIUS,
    MOTIONS,
    SHAPES,
    SPEEDS,
    STRAIGHT_PATHS,
    held_out_family,
    mini_caption,
    mini_clip,
    mini_combinations,
    mini_frame_caption,
    mini_scene,
    moving_shape_clip,
    trajectory,
)


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


# ---- the miniature world ----------------------------------------------------------------------------------



def test_the_test_split_holds_out_whole_combinations_and_training_keeps_every_word():
    train, test = mini_combinations("train"), mini_combinations("test")
    assert len(MOTIONS) == 18 and len(train) + len(test) == len(SHAPES) * len(MINI_COLORS) * len(MOTIONS)
    assert not {(s, c, m.family) for s, c, m in train} & {(s, c, m.family) for s, c, m in test}
    assert mini_combinations("val") == train
    # every (shape, family), (colour, family) and (shape, colour) pair is still seen in training
    assert {(s, m.family) for s, _, m in train} == {(s, f) for s in SHAPES for f in FAMILIES}
    assert {(c, m.family) for _, c, m in train} == {(c, f) for c in MINI_COLORS for f in FAMILIES}
    assert {(s, c) for s, c, _ in train} == {(s, c) for s in SHAPES for c in MINI_COLORS}
    # one family per (shape, colour) pair; each family is held out for one or two pairs
    counts = {f: sum(held_out_family(s, c) == f for s in SHAPES for c in MINI_COLORS) for f in FAMILIES}
    assert set(counts.values()) <= {1, 2}
    with pytest.raises(ValueError, match="split must be"):
        mini_combinations("dev")


@pytest.mark.parametrize("motion", MOTIONS, ids=lambda m: m.words)
def test_trajectories_follow_their_caption_and_stay_inside(motion):
    rng = np.random.default_rng(3)
    for _ in range(20):
        path = trajectory(motion, rng, 16)  # (16, 2) in frame sides
        assert path.min() >= MINI_RADIUS - 1e-9 and path.max() <= 1 - MINI_RADIUS + 1e-9
        steps = np.diff(path, axis=0)
        if motion.circular:
            centre = path.mean(axis=0)
            radii = np.linalg.norm(path - centre, axis=1)
            np.testing.assert_allclose(radii, radii[0], rtol=1e-6)
            rel = path - centre
            cross = rel[:-1, 0] * rel[1:, 1] - rel[:-1, 1] * rel[1:, 0]  # y down: > 0 turns clockwise on screen
            assert np.sign(cross).tolist() == [CIRCLES[motion.family]] * 15
        else:
            np.testing.assert_allclose(steps, np.broadcast_to(steps[0], steps.shape), atol=1e-12)  # constant velocity
            np.testing.assert_allclose(path[-1] - path[0], np.asarray(DIRECTIONS[motion.family]) * SPEEDS[motion.speed],
                                       atol=1e-12)


def test_clips_draw_one_shape_of_the_caption_colour_where_the_trajectory_says():
    shape, color, motion = "square", "blue", MOTIONS[0]
    frames, centres = mini_clip(np.random.default_rng(0), shape, color, motion, 16, 64)
    assert frames.shape == (16, 64, 64, 3) and frames.dtype == np.uint8
    for frame, (x, y) in zip(frames, centres, strict=True):
        mask = np.abs(frame.astype(int) - np.asarray(MINI_COLORS[color])).sum(-1) < 30
        ys, xs = np.nonzero(mask)
        assert abs(xs.mean() + 0.5 - x) < 0.6 and abs(ys.mean() + 0.5 - y) < 0.6  # pixel centres
    assert mini_caption(shape, color, motion) == "a blue square moves slowly to the right"


def test_scenes_name_their_shapes_left_to_right_without_overlap():
    for seed in range(10):
        image, caption, placed = mini_scene(np.random.default_rng(seed), 128, 32)
        assert image.shape == (128, 128, 3)
        assert [x for _, _, x, _ in placed] == sorted(x for _, _, x, _ in placed)
        assert caption.count(" a ") + caption.startswith(("a ", "an ")) == len(placed)
        for i, (_, _, x1, y1) in enumerate(placed):
            for _, _, x2, y2 in placed[i + 1:]:
                assert math.hypot(x1 - x2, y1 - y2) > 2 * MINI_RADIUS * 32



def test_frame_captions_vary_their_words_but_never_name_a_grid_or_a_held_out_combination():
    """The base's single frames are captioned in several wordings (a real text-to-image set is not one template), each
    naming the frame's shape and colour; a motion named is one the pair shows in training, and no wording speaks of a
    grid (the base never sees one)."""
    rng = np.random.default_rng(0)
    held_out = {mini_caption(s, c, m) for s, c, m in mini_combinations("test")}
    seen = {mini_caption(s, c, m) for s, c, m in mini_combinations("train")}
    for shape in SHAPES:
        for color in MINI_COLORS:
            name = f"{'an' if color[0] in 'aeiou' else 'a'} {color} {shape}"
            captions = [mini_frame_caption(rng, shape, color) for _ in range(200)]
            prefixed = [c for c in captions if not c.startswith(name)]
            assert 60 < len(prefixed) < 140  # about half open with a sentence
            for caption in captions:
                assert "grid" not in caption.lower()
                prefix = next((p for p in FRAME_PREFIXES if caption.startswith(p + " ")), "")
                body = caption[len(prefix):].strip()
                assert body.startswith(name)
                if " moves " in body:
                    assert body in seen and body not in held_out
                else:
                    assert body in (name, f"{name} {FRAME_SUFFIX}")
            assert len(set(captions)) > 20
