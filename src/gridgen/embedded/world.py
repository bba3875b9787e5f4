"""The moving-shapes world of the sample data: a coloured circle, square or triangle moving along a straight line or a
circle on a plain background, drawn with PIL at 4x and box-downsampled, with a WebVid-style caption.

Each clip is a function of one ``numpy`` random generator (:func:`moving_shape_clip`), so the sample data
(:mod:`gridgen.embedded.sample_data`) decides which stream each clip draws from.
"""

from __future__ import annotations

import math

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
