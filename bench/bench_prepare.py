#!/usr/bin/env python
"""Prepare throughput: ``gridgen.prepare`` (decode -> fit -> tile -> JPEG -> shard) vs PyAV decoding alone.

    python bench/bench_prepare.py [--videos 8] [--frames 64] [--repeats 3] [--quick] [--no-write]

Input: ``--videos`` H.264 mp4 clips of WebVid's size (596x336 px, 25 fps, ``--frames`` frames each; a moving
textured square on a gradient, so the encoder has real work), written once into a temp folder.

A. PyAV alone: open every clip, decode every frame and convert it to an RGB ndarray
   (``frame.to_ndarray(format="rgb24")``), the least any pipeline does to get pixels. A second row decodes
   without the RGB conversion (the pure decoder).
B. prepare: ``prepare()`` with the generic ``data=video`` config, 4x4 grids of 144x256 cells (WebVid's card),
   stride 1 from frame 0 and ``grids_per_clip = frames / 16``, so every decoded frame lands in a grid, JPEG q95,
   shards written, one process (``prepare.workers=0``), like A.

Frames/s counts source frames that went through (A: decoded; B: put into grids). A and B alternate
(A B, B A, ...) ``--repeats`` times; the ratio is the median of per-repeat ratios B / A. Target: >= 0.7.
The ``prepare`` section of bench/RESULTS.md is replaced (the rest of the file is left alone).
"""

from __future__ import annotations

import argparse
import multiprocessing
import os
import shutil
import tempfile
import time
from pathlib import Path

import av
import harness as h
import numpy as np
import webdataset as wds
from hydra import compose, initialize_config_dir
from omegaconf import OmegaConf

from gridgen.data.shards import part_of
from gridgen.data.sources import write_video
from gridgen.prepare import CONF_DIR, prepare

HEIGHT, WIDTH, FPS = 336, 596, 25
TARGET = 0.7


def make_videos(folder: Path, count: int, frames: int) -> list[Path]:
    rng = np.random.default_rng(0)
    yy, xx = np.mgrid[0:HEIGHT, 0:WIDTH]
    paths = []
    for v in range(count):
        base = ((xx * (v + 1) + yy * 2) % 256).astype(np.uint8)
        texture = rng.integers(0, 256, (80, 80, 3), dtype=np.uint8)
        clip = np.empty((frames, HEIGHT, WIDTH, 3), np.uint8)
        for t in range(frames):
            clip[t] = base[..., None] // np.array([1, 2, 3], np.uint8)
            x, y = 20 + (t * 7) % (WIDTH - 120), 30 + (t * 3) % (HEIGHT - 120)
            clip[t, y:y + 80, x:x + 80] = texture
        path = folder / f"{v:04d}.mp4"
        write_video(path, clip, fps=FPS, options={"preset": "veryfast", "crf": "23"})
        path.with_suffix(".txt").write_text(f"a textured square moves across gradient number {v}")
        paths.append(path)
    return paths


def decode_alone(paths: list[Path], convert: bool) -> tuple[int, float]:
    start, frames = time.perf_counter(), 0
    for path in paths:
        with av.open(str(path)) as container:
            for frame in container.decode(container.streams.video[0]):
                if convert:
                    frame.to_ndarray(format="rgb24")
                frames += 1
    return frames, time.perf_counter() - start


SCENARIOS = {
    # every decoded frame goes into a grid: the worst case for prepare (a conversion + resize per frame)
    "every frame": ["data.sampling.stride=1", "data.sampling.fps=null"],
    # WebVid's card: 16 frames at 8 fps (every 3.125th frame of 25 fps), windows packed from frame 0
    "webvid (8 fps)": ["data.sampling.fps=8"],
}


def prepare_config(src: Path, out: Path, frames: int, scenario: str, *extra: str) -> dict:
    with initialize_config_dir(config_dir=str(CONF_DIR / "prepare"), version_base="1.3"):
        cfg = compose("prepare", overrides=[
            "data=video", f"prepare.src={src}", f"prepare.out={out}", "data.cell_height=144", "data.cell_width=256",
            *SCENARIOS[scenario], "data.sampling.start=0", f"data.sampling.grids_per_clip={frames // 16}",
            "prepare.progress=false", "prepare.workers=0", *extra])
    return OmegaConf.to_container(cfg, resolve=True)


def _timed_part(cfg: dict, queue, barrier) -> None:
    # warm like B1's process (codecs, encoder, imports): one clip into a throw-away folder
    warm = {**cfg, "prepare": {**cfg["prepare"], "out": cfg["prepare"]["out"] + f"-warm{cfg['prepare']['part']}",
                               "parts": 1, "part": None, "limit": 1}}
    prepare(warm)
    shutil.rmtree(warm["prepare"]["out"])
    barrier.wait()  # every part ready: they start together, as array tasks on free nodes do
    start = time.time()
    prepare(cfg)
    queue.put((start, time.time()))


def run_prepare(src: Path, out: Path, frames: int, scenario: str, parts: int = 1) -> tuple[int, float]:
    """Frames prepare decoded (up to the last frame a grid uses, per clip) and the seconds it took (wall clock).
    ``parts`` > 1: that many partitioned runs (``prepare.parts=N prepare.part=i``) at once, one process each, as
    a SLURM array runs them; the last one to finish writes the manifest."""
    shutil.rmtree(out, ignore_errors=True)
    if parts == 1:
        cfg = prepare_config(src, out, frames, scenario)
        start = time.time()
        prepare(cfg)
    else:
        configs = [prepare_config(src, out, frames, scenario, f"prepare.parts={parts}", f"prepare.part={i}")
                   for i in range(parts)]
        # spawned (fork after torch's OpenMP threads can hang a child), timed inside each child after its imports:
        # from the first part's start to the last part's end
        context = multiprocessing.get_context("spawn")
        queue, barrier = context.Queue(), context.Barrier(parts)
        processes = [context.Process(target=_timed_part, args=(cfg, queue, barrier)) for cfg in configs]
        for process in processes:
            process.start()
        spans = [queue.get(timeout=600) for _ in processes]
        for process in processes:
            process.join()
        if any(p.exitcode for p in processes) or not (out / "manifest.json").is_file():
            raise RuntimeError(f"a part failed (exit codes {[p.exitcode for p in processes]})")
        start, end = min(s for s, _ in spans), max(e for _, e in spans)
    seconds = (time.time() if parts == 1 else end) - start
    last: dict[str, int] = {}
    for sample in wds.WebDataset([str(p) for p in sorted(out.glob("*.tar"))], shardshuffle=False).decode():
        meta = sample["json"]
        last[meta["source_id"]] = max(last.get(meta["source_id"], 0), max(meta["frame_indices"]) + 1)
    return sum(last.values()), seconds


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--videos", type=int, default=8)
    parser.add_argument("--frames", type=int, default=96)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--parts", type=int, default=2, help="C: that many partitioned runs at once (one process "
                        "each), against one process")
    parser.add_argument("--part-videos", type=int, default=32, help="C: clips of 48 frames")
    h.add_output_args(parser, "2 videos x 48 frames, 1 repeat (smoke run)")
    args = parser.parse_args()
    if args.quick:
        args.videos, args.frames, args.repeats, args.part_videos = 2, 48, 1, 6
    if args.frames % 16:
        parser.error("--frames must be a multiple of 16 (4x4 grids use every frame)")

    load_before = h.load_average()
    with tempfile.TemporaryDirectory(prefix="bench-prepare-") as tmp:
        src, out = Path(tmp) / "raw", Path(tmp) / "shards"
        src.mkdir()
        paths = make_videos(src, args.videos, args.frames)
        many = Path(tmp) / "many"  # C: enough clips that hashing them into parts gives parts of similar size
        many.mkdir()
        make_videos(many, args.part_videos, 48)
        split = [sum(part_of(p.stem, args.parts) == i for p in many.glob("*.mp4")) for i in range(args.parts)]
        decode_alone(paths[:1], True)  # warm caches and imports
        runs: dict[str, list[tuple[int, float]]] = {"rgb": [], "decode": [], **{k: [] for k in SCENARIOS},
                                                    "parts": [], "parts_single": []}
        for name in SCENARIOS:
            run_prepare(src, out, args.frames, name)  # warm-up
        for r in range(args.repeats):
            order = ["rgb", *SCENARIOS] if r % 2 == 0 else [*reversed(SCENARIOS), "rgb"]
            for name in order:
                runs[name].append(decode_alone(paths, True) if name == "rgb" else
                                  run_prepare(src, out, args.frames, name))
            runs["decode"].append(decode_alone(paths, False))
            for key in (("parts", "parts_single") if r % 2 == 0 else ("parts_single", "parts")):
                runs[key].append(run_prepare(many, out, 48, "webvid (8 fps)", parts=args.parts if key == "parts" else 1))

    fps = {k: [n / t for n, t in v] for k, v in runs.items()}

    def row(label: str, key: str) -> str:
        return [label, f"{h.median(fps[key]):.0f}", ", ".join(f"{v:.0f}" for v in fps[key])]

    def ratio(key: str, base: str = "rgb") -> float:
        return h.median(h.pair_ratios(fps[key], fps[base]))

    main_ratio = ratio("webvid (8 fps)")
    lines = [
        "## Prepare throughput (`bench/bench_prepare.py`)",
        "",
        *h.environment_lines("cpu", ("av",), load_before),
        *(f"- {note}" for note in [h.shared_machine_note(load_before)] if note),
        f"- 1 process each · {args.videos} H.264 clips of {WIDTH}x{HEIGHT} px at {FPS} fps, {args.frames} frames "
        f"each · {args.repeats} repeats, interleaved",
        "",
        "Frames/s = source frames decoded per second (prepare stops decoding a clip after the last frame its grids use).",
        "",
        *h.table(["pipeline", "frames/s (median)", "per repeat"], [
            row("A. PyAV alone: decode + `to_ndarray(rgb24)` every frame", "rgb"),
            row("A'. PyAV alone: decode only (no RGB conversion)", "decode"),
            row("B1. prepare, WebVid setting: 4x4 grids at 8 fps, 144x256 cells, JPEG q95, shards", "webvid (8 fps)"),
            row("B2. prepare, every frame in a grid (stride 1), same cells and encoding", "every frame"),
            row(f"C1. B1 on {args.part_videos} clips of 48 frames, one process", "parts_single"),
            row(f"C2. the same as {args.parts} parts at once (`prepare.parts={args.parts}`, one process each, then "
                f"the merge; clips per part {split})", "parts")], "lrl"),
        "",
        f"**ratio B1 / A = {main_ratio:.2f}** (target >= {TARGET}: {h.verdict(main_ratio, TARGET, True)}) · "
        f"**ratio B2 / A = {ratio('every frame'):.2f}** · B1 / A' = {ratio('webvid (8 fps)', 'decode'):.2f} · "
        f"B2 / A' = {ratio('every frame', 'decode'):.2f}",
        "",
        "prepare converts to RGB only the frames a grid uses, resizing inside FFmpeg's conversion (swscale, area "
        "filter), then tiles (one copy) and encodes one JPEG per 16 frames. With WebVid's setting a grid uses one "
        "decoded frame in ~3; with every frame used (B2) the per-frame resize and the JPEG encoding of full grids "
        "are what it costs over bare decoding. More throughput: `prepare.workers=N` (one process per clip).",
        "",
        f"**ratio C2 / C1 = {ratio('parts', 'parts_single'):.2f}** (speed-up of {args.parts} parts at once over one "
        f"process, wall clock, on {os.cpu_count()} shared cores; the parts write the same samples as one run, "
        f"tests/data/test_prepare.py). Per process, B1 prepares {h.median(args.videos / t for _, t in runs['webvid (8 fps)']):.2f} "
        f"clips/s of {args.frames} frames.",
    ]
    h.finish(args, "prepare", "\n".join(lines))


if __name__ == "__main__":
    main()
