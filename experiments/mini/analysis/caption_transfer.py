"""Does the base keep a frame's colour and shape when its caption grows into the grid's (RESULTS-3.md)? The mini
base (a FluxPipeline folder) draws single frames (the mini card's frame size) for every (shape, colour) pair under
three captions: the base's own ("a blue circle"), the grid's content ("a blue circle moves slowly down") and the
whole grid caption (with "A 16-frame sequence arranged in a 4x4 grid. "); the world's detector reads each frame.

    python experiments/mini/analysis/caption_transfer.py [<build folder>, default: the default build] [seeds]
"""

import sys
from pathlib import Path

import numpy as np
import torch
from diffusers import FluxPipeline

from gridgen.embedded.mini_data import cell_size
from gridgen.embedded.mini_model import DEFAULT_BUILD
from gridgen.embedded.world import MINI_COLORS, MOTIONS, SHAPES, mini_caption, with_article
from gridgen.eval.shapes import detect
from gridgen.layout import GridLayout
from gridgen.runtime import default_cache_dir

build = Path(sys.argv[1]) if len(sys.argv) > 1 else default_cache_dir() / DEFAULT_BUILD
seeds = int(sys.argv[2]) if len(sys.argv) > 2 else 4
pipe = FluxPipeline.from_pretrained(build / "base")
pipe.set_progress_bar_config(disable=True)
pairs = [(s, c) for s in SHAPES for c in MINI_COLORS]
motion = MOTIONS[4]  # one straight motion for every pair
styles = {
    "base caption": lambda s, c: f"{with_article(c)} {s}",
    "grid content": lambda s, c: mini_caption(s, c, motion),
    "whole grid caption": lambda s, c: GridLayout.parse("4x4", cell_size("clips")).caption(mini_caption(s, c, motion)),
}
for name, caption in styles.items():
    right = {"shape": 0, "colour": 0, "both": 0}
    for seed in range(seeds):
        side = cell_size("frames")
        images = pipe([caption(s, c) for s, c in pairs], height=side, width=side, num_inference_steps=20,
                      guidance_scale=3.5, true_cfg_scale=4.0, negative_prompt=[""] * len(pairs),
                      max_sequence_length=20, generator=torch.Generator().manual_seed(seed), output_type="np").images
        for (shape, color), image in zip(pairs, images, strict=True):
            blobs = detect((image * 255).round().astype(np.uint8))
            ok_shape = any(b.shape == shape for b in blobs)
            ok_colour = any(b.color == color for b in blobs)
            right["shape"] += ok_shape
            right["colour"] += ok_colour
            right["both"] += any(b.shape == shape and b.color == color for b in blobs)
    n = seeds * len(pairs)
    print(f"{name} (e.g. '{caption(*pairs[1])}'): " + ", ".join(f"{k} right {v / n:.0%}" for k, v in right.items())
          + f" of {n} frames")
