"""Is the base's circle/square confusion a sampling setting (RESULTS-4.md)? The mini base (a FluxPipeline folder)
draws single frames (the mini card's size) of "a <colour> circle" and "a <colour> square" for every colour, 6
seeds, at 20 and 50 Euler steps and true CFG 1, 4 and 8; the world's detector reads each: right when it finds one
shape, the asked one.

    python experiments/mini/analysis/shape_sampling.py [<build folder>, default: the default build]
"""

import sys
from collections import Counter
from pathlib import Path

import numpy as np
import torch
from diffusers import FluxPipeline

from gridgen.embedded.mini_data import cell_size
from gridgen.embedded.mini_model import DEFAULT_BUILD
from gridgen.embedded.world import MINI_COLORS, with_article
from gridgen.eval.shapes import detect
from gridgen.runtime import default_cache_dir

build = Path(sys.argv[1]) if len(sys.argv) > 1 else default_cache_dir() / DEFAULT_BUILD
pipe = FluxPipeline.from_pretrained(build / "base")
pipe.set_progress_bar_config(disable=True)
pairs = [(shape, color) for shape in ("circle", "square") for color in MINI_COLORS]
side = cell_size("frames")
for steps, cfg in ((20, 4.0), (50, 4.0), (20, 1.0), (20, 8.0)):
    right, asked = Counter(), Counter()
    for seed in range(6):
        images = pipe([f"{with_article(c)} {s}" for s, c in pairs], height=side, width=side, num_inference_steps=steps,
                      guidance_scale=3.5, true_cfg_scale=cfg, negative_prompt=[""] * len(pairs) if cfg > 1 else None,
                      max_sequence_length=20, generator=torch.Generator().manual_seed(seed), output_type="np").images
        for (shape, _), image in zip(pairs, images, strict=True):
            blobs = detect((image * 255).round().astype(np.uint8))
            asked[shape] += 1
            right[shape] += len(blobs) == 1 and blobs[0].shape == shape
    print(f"{steps} steps, true CFG {cfg:g}: " + ", ".join(f"{s} right in {right[s]} of {asked[s]}" for s in asked))
