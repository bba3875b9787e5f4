"""How the miniature's text encoders place held-out captions (RESULTS-3.md, "Colour is lost between the base's
captions and the grid captions"), encoded as sampling encodes them (FluxPipeline.encode_prompt): for each of the
34 held-out captions, does its nearest seen caption (cosine) share its colour, shape and motion; and does a ridge
probe fitted on the 290 seen captions read its colour and shape.

    python experiments/mini/analysis/text_encoders.py [<build folder>, default: the default build]
"""

import sys
from pathlib import Path

import torch
from diffusers import FluxPipeline

from gridgen.embedded.mini_data import cell_size
from gridgen.embedded.mini_model import DEFAULT_BUILD
from gridgen.embedded.world import MINI_COLORS, SHAPES, mini_caption, mini_combinations
from gridgen.layout import GridLayout
from gridgen.runtime import default_cache_dir

build = Path(sys.argv[1]) if len(sys.argv) > 1 else default_cache_dir() / DEFAULT_BUILD
pipe = FluxPipeline.from_pretrained(build / "base")  # its text encoders, as sampling uses them
grid = GridLayout.parse("4x4", cell_size("clips"))  # the captions the grid LoRA trains and samples with


@torch.no_grad()
def encode(combos):
    captions = [grid.caption(mini_caption(*c)) for c in combos]
    tokens, pooled, _ = pipe.encode_prompt(captions, captions, max_sequence_length=20)  # (N, 20, 32), (N, 32)
    return {"CLIP pooled": pooled, "T5 tokens": tokens.flatten(1)}  # (N, 20, 32) -> (N, 640)


seen, held = mini_combinations("train"), mini_combinations("test")
seen_x, held_x = encode(seen), encode(held)
for name in seen_x:
    a = torch.nn.functional.normalize(seen_x[name], dim=1)
    b = torch.nn.functional.normalize(held_x[name], dim=1)
    nearest = (b @ a.T).argmax(1).tolist()
    share = {what: sum(seen[j][k] == held[i][k] for i, j in enumerate(nearest)) / len(held)
             for k, what in enumerate(("shape", "colour", "motion"))}
    line = ", ".join(f"{what} {value:.0%}" for what, value in share.items())
    probes = []
    for k, (what, values) in enumerate((("shape", list(SHAPES)), ("colour", list(MINI_COLORS)))):
        x = torch.cat([seen_x[name], torch.ones(len(seen), 1)], 1)
        xs = torch.cat([held_x[name], torch.ones(len(held), 1)], 1)
        y = torch.nn.functional.one_hot(torch.tensor([values.index(c[k]) for c in seen]), len(values)).float()
        w = torch.linalg.solve(x.T @ x + 1e-2 * torch.eye(x.shape[1]), x.T @ y)  # ridge regression to one-hot
        right = (xs @ w).argmax(1).eq(torch.tensor([values.index(c[k]) for c in held])).float().mean()
        probes.append(f"{what} {right:.0%}")
    print(f"{name}: nearest seen caption shares {line}; ridge probe on held-out captions: {', '.join(probes)}")
