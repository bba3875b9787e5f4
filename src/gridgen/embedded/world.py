"""The moving-shapes world of the sample data: a coloured circle, square or triangle moving along a straight line or a
circle on a plain background, drawn with PIL at 4x and box-downsampled, with a WebVid-style caption.

Each clip is a function of one ``numpy`` random generator (:func:`moving_shape_clip`), so the sample data
(:mod:`gridgen.embedded.sample_data`) decides which stream each clip draws from.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from functools import cache

import numpy as np
from PIL import Image, ImageDraw

SUPERSAMPLE = 4  # draw at 4x and box-downsample: cheap anti-aliasing

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


def with_article(word: str) -> str:
    """``"a red"`` / ``"an orange"``: captions should read like the ones of a real dataset."""
    return f"{'an' if word[0] in 'aeiou' else 'a'} {word}"


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
            "name": f"{with_article(color)} {shape} moves {path} on {with_article(background)} background"}
    return frames, meta


# ---- the miniature world (`make mini`) --------------------------------------------------------------
#
# One shape of one colour on a black background moves with one of 18 motions: 8 directions x 2 speeds, or a circle
# either way. Positions are in units of the frame's side (x right, y down), so the world draws at any size.
# Every (shape, colour) pair has one motion family held out of training: those combinations form the test split.

MINI_COLORS: dict[str, tuple[int, int, int]] = {name: SHAPE_COLORS[name] for name in
                                                ("red", "green", "blue", "yellow", "purple", "cyan")}
MINI_BACKGROUND: tuple[int, int, int] = BACKGROUND_COLORS["black"]
MINI_RADIUS = 0.18  # shape radius, in frame sides
DIRECTIONS: dict[str, tuple[float, float]] = {  # caption words -> unit vector (x right, y down)
    "to the right": (1.0, 0.0),
    "to the left": (-1.0, 0.0),
    "up": (0.0, -1.0),
    "down": (0.0, 1.0),
    "to the upper right": (math.sqrt(0.5), -math.sqrt(0.5)),
    "to the upper left": (-math.sqrt(0.5), -math.sqrt(0.5)),
    "to the lower right": (math.sqrt(0.5), math.sqrt(0.5)),
    "to the lower left": (-math.sqrt(0.5), math.sqrt(0.5)),
}
SPEEDS: dict[str, float] = {"slowly": 0.3, "quickly": 0.6}  # path length over a whole clip, in frame sides
CIRCLES: dict[str, float] = {"in a clockwise circle": 1.0, "in a counterclockwise circle": -1.0}  # y down: + is clockwise
ORBIT_RADIUS = 0.2  # circular motion: one full turn per clip around a centre near the frame's centre


@dataclass(frozen=True)
class Motion:
    """One of the 18 motions: ``family`` is the direction (or circle) the held-out split is built from."""

    family: str  # a DIRECTIONS key or a CIRCLES key
    speed: str | None  # a SPEEDS key; None for circles

    @property
    def words(self) -> str:
        return self.family if self.speed is None else f"{self.speed} {self.family}"

    @property
    def circular(self) -> bool:
        return self.family in CIRCLES


MOTIONS: tuple[Motion, ...] = tuple(
    [Motion(family, speed) for family in DIRECTIONS for speed in SPEEDS] + [Motion(family, None) for family in CIRCLES])
FAMILIES: tuple[str, ...] = (*DIRECTIONS, *CIRCLES)


def mini_caption(shape: str, color: str, motion: Motion) -> str:
    """``"a red square moves slowly to the right"``, ``"a cyan circle moves in a clockwise circle"``."""
    return f"{with_article(color)} {shape} moves {motion.words}"


class NotAMiniCaption(ValueError):
    """A caption that :func:`mini_caption` cannot have written."""


@cache
def _mini_captions() -> dict[str, tuple[str, str, Motion]]:
    return {mini_caption(s, c, m): (s, c, m) for s in SHAPES for c in MINI_COLORS for m in MOTIONS}


def parse_mini_caption(caption: str) -> tuple[str, str, Motion]:
    """The inverse of :func:`mini_caption`: ``"a red square moves slowly to the right"`` -> ``("square", "red",
    Motion("to the right", "slowly"))``. Case, runs of spaces and a final full stop do not matter."""
    key = " ".join(str(caption).strip().rstrip(".").lower().split())
    if key not in _mini_captions():
        raise NotAMiniCaption(f"caption {caption!r} is not from the miniature world; its captions read "
                              f"'{mini_caption('square', 'red', MOTIONS[0])}' or "
                              f"'{mini_caption('circle', 'cyan', MOTIONS[-2])}' (gridgen.embedded.world.mini_caption)")
    return _mini_captions()[key]


def held_out_family(shape: str, color: str) -> str:
    """The motion family that (shape, colour) never shows in training: each family is held out for 1-2 of the 18
    pairs, and each shape and each colour keeps every family in training with other partners."""
    index = SHAPES.index(shape) * len(MINI_COLORS) + list(MINI_COLORS).index(color)  # pair number 0..17
    return FAMILIES[index % len(FAMILIES)]


def mini_combinations(split: str) -> list[tuple[str, str, Motion]]:
    """``(shape, colour, motion)`` of a split: ``train``/``val`` the seen combinations, ``test`` the held-out ones."""
    if split not in ("train", "val", "test"):
        raise ValueError(f"split must be train, val or test, got {split!r}")
    combos = [(shape, color, motion) for shape in SHAPES for color in MINI_COLORS for motion in MOTIONS]
    held = [(s, c, m) for s, c, m in combos if m.family == held_out_family(s, c)]
    return held if split == "test" else [combo for combo in combos if combo not in held]


# Sentences that may open a single frame's caption (:func:`mini_frame_caption`): none names a grid or a layout.
FRAME_PREFIXES: tuple[str, ...] = (
    "A still image.",
    "Computer graphics.",
    "A simple drawing.",
    "A frame from a short video.",
    "A picture drawn by a program, in flat colours.",
    "One frame of a clip; the camera is still.",
    "A plain black background with a single shape on it.",
    "An illustration for a children's book about shapes and colours.",
    "A small test image, rendered without texture, shading or noise.",
    "The first frame of an animation made for a lesson on geometry.",
)
FRAME_SUFFIX = "on a black background"


def mini_frame_caption(rng: np.random.Generator, shape: str, color: str) -> str:
    """A single frame's caption for the base model, worded like a real dataset's, not one fixed template: "a red
    square", "a red square on a black background" or the caption of a seen clip it could come from ("a red square
    moves slowly up"), half of the time after one of :data:`FRAME_PREFIXES`. A pre-trained text-to-image model has
    read its words in sentences of every length; the base must find shape and colour wherever they stand, as it will
    have to in a grid caption."""
    name = f"{with_article(color)} {shape}"
    seen = [m for s, c, m in mini_combinations("train") if (s, c) == (shape, color)]  # never a held-out caption
    body = [name, f"{name} {FRAME_SUFFIX}", mini_caption(shape, color, seen[int(rng.integers(len(seen)))])]
    caption = body[int(rng.integers(len(body)))]
    if rng.random() < 0.5:
        caption = f"{FRAME_PREFIXES[int(rng.integers(len(FRAME_PREFIXES)))]} {caption}"
    return caption


def trajectory(motion: Motion, rng: np.random.Generator, num_frames: int) -> np.ndarray:
    """Shape centres ``(num_frames, 2)`` (x, y) in frame sides; the whole shape stays inside the frame.

    Straight motions cover ``SPEEDS[speed]`` sides at constant velocity from a random start that keeps the path
    inside; circles make one full turn (step ``2 pi / num_frames``) around a centre jittered by up to 0.05.
    """
    k = np.arange(num_frames, dtype=np.float64)
    lo, hi = MINI_RADIUS, 1.0 - MINI_RADIUS
    if motion.circular:
        centre = 0.5 + rng.uniform(-0.05, 0.05, size=2)
        angle = rng.uniform(0, 2 * math.pi) + CIRCLES[motion.family] * 2 * math.pi * k / num_frames
        return np.stack([centre[0] + ORBIT_RADIUS * np.cos(angle), centre[1] + ORBIT_RADIUS * np.sin(angle)], axis=1)
    step = np.asarray(DIRECTIONS[motion.family]) * SPEEDS[motion.speed] / (num_frames - 1)  # sides per frame
    span = step * (num_frames - 1)
    start = np.array([rng.uniform(lo - min(d, 0.0), hi - max(d, 0.0)) for d in span])
    return start[None, :] + k[:, None] * step[None, :]


def draw_shapes(size: tuple[int, int], shapes: list[tuple[str, str, float, float, float]],
                background: tuple[int, int, int] = MINI_BACKGROUND) -> np.ndarray:
    """One ``(height, width, 3)`` uint8 image of ``(shape, colour, cx, cy, radius)`` in pixels, anti-aliased."""
    height, width = size
    image = Image.new("RGB", (width * SUPERSAMPLE, height * SUPERSAMPLE), background)
    draw = ImageDraw.Draw(image)
    for shape, color, cx, cy, radius in shapes:
        _draw_shape(draw, shape, cx * SUPERSAMPLE, cy * SUPERSAMPLE, radius * SUPERSAMPLE, MINI_COLORS[color])
    return np.asarray(image.reduce(SUPERSAMPLE))


def mini_clip(rng: np.random.Generator, shape: str, color: str, motion: Motion, num_frames: int, size: int
              ) -> tuple[np.ndarray, np.ndarray]:
    """Frames ``(num_frames, size, size, 3)`` uint8 of one combination and its centres ``(num_frames, 2)`` in px."""
    centres = trajectory(motion, rng, num_frames) * size
    frames = np.stack([draw_shapes((size, size), [(shape, color, x, y, MINI_RADIUS * size)]) for x, y in centres])
    return frames, centres


def mini_scene(rng: np.random.Generator, canvas: int, frame: int, max_shapes: int = 4
               ) -> tuple[np.ndarray, str, list[tuple[str, str, float, float]]]:
    """A non-grid composition for the base model: 1..``max_shapes`` shapes of frame scale (radius
    ``MINI_RADIUS * frame`` px) at random, non-overlapping places of a ``canvas``-px square, with a caption that
    names them left to right ("a red square, a blue circle and a green triangle")."""
    radius = MINI_RADIUS * frame
    count = int(rng.integers(1, max_shapes + 1))
    placed: list[tuple[str, str, float, float]] = []
    for _ in range(50 * count):  # rejection sampling; a crowded draw just keeps fewer shapes
        if len(placed) == count:
            break
        x, y = rng.uniform(radius, canvas - radius, size=2)
        if all((x - px) ** 2 + (y - py) ** 2 > (2.2 * radius) ** 2 for _, _, px, py in placed):
            placed.append((str(rng.choice(SHAPES)), str(rng.choice(list(MINI_COLORS))), float(x), float(y)))
    placed.sort(key=lambda item: item[2])
    names = [f"{with_article(color)} {shape}" for shape, color, _, _ in placed]
    caption = names[0] if len(names) == 1 else ", ".join(names[:-1]) + f" and {names[-1]}"
    image = draw_shapes((canvas, canvas), [(s, c, x, y, radius) for s, c, x, y in placed])
    return image, caption, placed
