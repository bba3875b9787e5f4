"""Where a mini grid's FVD comes from (fvd_parts_v7.md): every video of a set (generated grids, or shards of
real ones) drawn again, written as lossless mp4s with their captions for `gridgen.evaluate eval.fake=<out>`:

- ``detected``: what the world's detector reads in each cell (every blob with a readable shape and colour, at
  its centroid, the world's radius), drawn by the world's own renderer: the grid's content, drawn perfectly;
- ``prompted``: the caption's shape and colour at each cell's largest blob's centroid (nothing in an empty
  cell): only the trajectory left to the grid;
- ``vae``: the grid encoded and decoded whole by a VAE (its latent distribution's mode): what any generated
  grid pays for the VAE (give the build's ``base/vae`` folder).

    python experiments/mini/analysis/redraw.py <grids or shards> <new folder> detected|prompted|vae [<vae>]
"""

import shutil
import sys
from pathlib import Path

import numpy as np
import torch

from gridgen.embedded.world import MINI_RADIUS, draw_shapes, parse_mini_caption
from gridgen.eval.io import list_videos, write_video_file
from gridgen.eval.shapes import detect
from gridgen.layout import GridLayout

MODES = ("detected", "prompted", "vae")
if len(sys.argv) < 4 or sys.argv[3] not in MODES or (sys.argv[3] == "vae") != (len(sys.argv) == 5):
    usage = f"<grids or shards> <new folder> {'|'.join(MODES)} [<vae folder>: vae only]"
    print(f"usage: redraw.py {usage}", file=sys.stderr)
    sys.exit(2)
spec, out, mode = sys.argv[1], Path(sys.argv[2]), sys.argv[3]
if out.exists():
    print(f"{out} exists: give a new folder (a result is never overwritten)", file=sys.stderr)
    sys.exit(2)


def redrawn(frames: torch.Tensor, shape: str, color: str) -> tuple[torch.Tensor, int]:
    """Frames uint8 ``(T, 3, h, w)`` drawn again from the detector's reading; the count of blobs left out."""
    cells, unreadable = [], 0
    for frame in frames:
        cell = np.ascontiguousarray(frame.permute(1, 2, 0).numpy())  # (h, w, 3)
        radius = MINI_RADIUS * min(cell.shape[:2])
        blobs = detect(cell)
        if mode == "detected":
            drawn = [(b.shape, b.color, b.x, b.y, radius) for b in blobs if b.shape and b.color]
            unreadable += len(blobs) - len(drawn)
        else:
            drawn = [(shape, color, blobs[0].x, blobs[0].y, radius)] if blobs else []
        image = draw_shapes(cell.shape[:2], drawn).copy()  # (h, w, 3), writable: torch views it
        cells.append(torch.from_numpy(image).permute(2, 0, 1))  # (3, h, w)
    return torch.stack(cells), unreadable


vae = None
if mode == "vae":
    from diffusers import AutoencoderKL

    vae = AutoencoderKL.from_pretrained(sys.argv[4]).eval()
tmp = out.with_name(out.name + ".partial")
if tmp.exists():  # a killed run's leftover: never a result
    shutil.rmtree(tmp)
tmp.mkdir(parents=True)
videos = unreadable = 0
try:
    with torch.no_grad():
        for item in list_videos(spec, layout="4x4"):
            frames = item.frames()  # (16, 3, h, w) uint8
            if vae is not None:
                layout = GridLayout.parse("4x4", frames.shape[-2], frames.shape[-1])
                grid = layout.tile(frames.float() / 127.5 - 1.0)[None]  # (1, 3, 4h, 4w) in [-1, 1]
                decoded = vae.decode(vae.encode(grid).latent_dist.mode()).sample[0]  # (3, 4h, 4w)
                decoded = ((decoded.clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)
                frames = layout.untile(decoded)  # (16, 3, h, w)
            else:
                if item.caption is None:
                    print(f"{item.source or item.name}: no caption (needed to redraw)", file=sys.stderr)
                    sys.exit(2)
                shape, color, _ = parse_mini_caption(item.caption)
                frames, left_out = redrawn(frames, shape, color)
                unreadable += left_out
            write_video_file(tmp / f"{item.name}.mp4", frames)
            if item.caption is not None:
                (tmp / f"{item.name}.txt").write_text(item.caption + "\n")
            videos += 1
except BaseException:  # a failed run leaves nothing behind
    shutil.rmtree(tmp, ignore_errors=True)
    raise
tmp.rename(out)
print(f"{out}: {videos} videos ({mode}; blobs with an unreadable shape or colour left out: {unreadable})")
