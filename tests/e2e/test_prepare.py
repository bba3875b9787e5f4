"""`python -m gridgen.prepare` as a user runs it: one-line errors, a killed run resumed, a run that makes no
grid, parts as submitit jobs."""

from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from gridgen.data.prepare import prepare
from gridgen.data.sources import write_video
from gridgen.embedded.world import moving_shape_clip
from tests.helpers.prepare import compose_prepare, sample_set, shard_bytes, write_webvid


def test_cli_one_line_error_and_success(tmp_path):
    proc = subprocess.run([sys.executable, "-m", "gridgen.prepare", "data=webvid", f"prepare.src={tmp_path}/missing",
                           f"prepare.out={tmp_path}/out"], capture_output=True, text=True, cwd=tmp_path)
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines() == [
        f"gridgen.prepare: error: prepare.src '{tmp_path}/missing' does not exist; point it at the raw video data "
        "(a folder, or a WebVid-style CSV for videos)"]
    assert not any(tmp_path.iterdir())  # nothing written, not even Hydra's logs
    src = write_webvid(tmp_path / "raw", n_good=2)
    proc = subprocess.run([sys.executable, "-m", "gridgen.prepare", "data=webvid", f"prepare.src={src}",
                           f"prepare.out={tmp_path}/out", "data.cell_height=32", "data.cell_width=32"],
                          capture_output=True, text=True, cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "samples        2 grids from 6 inputs" in proc.stdout
    assert "skipped=" in proc.stderr and "clips/s" in proc.stderr  # the progress bar: rate and running skips
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out", "raw"]


@pytest.mark.slow
def test_killed_prepare_resumes_without_loss_or_duplicates(tmp_path):
    """SIGKILL mid-run (no cleanup at all), then the same command again: same shards as one clean run."""
    import signal
    import time

    src = write_webvid(tmp_path / "raw", n_good=40, frames=20)
    args = [sys.executable, "-m", "gridgen.prepare", "data=webvid", f"prepare.src={src}", "data.cell_height=64",
            "data.cell_width=64", "data.shards.maxcount=2", "prepare.progress=false"]
    proc = subprocess.Popen([*args, f"prepare.out={tmp_path}/out"], cwd=tmp_path)
    manifest = tmp_path / "out" / "manifest.json"
    deadline = time.time() + 60
    while time.time() < deadline:
        if manifest.is_file() and len(json.loads(manifest.read_text())["splits"]["train"]["shards"]) >= 3:
            break
        time.sleep(0.02)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert not json.loads(manifest.read_text())["splits"]["train"]["complete"], "finished before the kill"
    subprocess.run([*args, f"prepare.out={tmp_path}/out"], cwd=tmp_path, check=True)
    subprocess.run([*args, f"prepare.out={tmp_path}/ref"], cwd=tmp_path, check=True)
    assert shard_bytes(tmp_path / "out") == shard_bytes(tmp_path / "ref")
    done, ref = (json.loads((tmp_path / d / "manifest.json").read_text())["splits"]["train"] for d in ("out", "ref"))
    assert done["counts"] == ref["counts"] and done["counts"]["samples"] == 40 and math.isfinite(done["seconds"])


def write_uncaptioned_clips(folder: Path, count: int = 3) -> Path:
    folder.mkdir(parents=True)
    for i in range(count):
        write_video(folder / f"clip{i}.mp4", moving_shape_clip(np.random.default_rng(i), 16, 32, 32)[0])
    return folder


def test_a_prepare_that_makes_no_grid_exits_2_with_the_fix_and_leaves_nothing(tmp_path):
    raw = write_uncaptioned_clips(tmp_path / "raw")  # data=video has no default caption: every clip is skipped
    args = [sys.executable, "-m", "gridgen.prepare", "data=video", f"prepare.src={raw}", f"prepare.out={tmp_path}/out",
            "data.cell_height=32", "data.cell_width=32", "data.sampling.fps=null", "data.sampling.stride=1",
            "prepare.progress=false"]
    proc = subprocess.run(args, capture_output=True, text=True, cwd=tmp_path)
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert proc.stderr.strip().splitlines()[-1] == (
        f"gridgen.prepare: error: no grid came out of 3 inputs of '{raw}' (skipped: missing_caption=3); most are "
        'missing_caption (e.g. clip0): set data.source.default_caption="<caption>" (used for inputs without one)')
    assert not (tmp_path / "out").exists()  # the failed run left no folder, manifest or lock behind
    # the key the message names is the fix, and nothing from the failed run stands in its way
    entry = prepare(compose_prepare(*(a for a in args[3:] if a.startswith(("data", "prepare"))),
                                    "data.source.default_caption='a shape moves'"))
    assert entry["counts"]["samples"] == 3 and entry["counts"]["skipped"] == {}


@pytest.mark.slow
def test_parts_as_submitit_jobs_from_the_command_line(tmp_path):
    """`-m prepare.part=range(0,3)` through Hydra's submitit launcher (local executor: the SLURM array's engine)."""
    csv_path = write_webvid(tmp_path / "raw", n_good=6)
    common = ["data=webvid", f"prepare.src={csv_path}", "data.cell_height=32", "data.cell_width=32",
              "data.shards.maxcount=2", "prepare.progress=false"]
    subprocess.run([sys.executable, "-m", "gridgen.prepare", *common, f"prepare.out={tmp_path}/one"], check=True,
                   cwd=tmp_path, capture_output=True)
    proc = subprocess.run([sys.executable, "-m", "gridgen.prepare", "-m", "hydra/launcher=submitit_local", *common,
                           f"prepare.out={tmp_path}/parts", "prepare.parts=3", "prepare.part=range(0,3)"],
                          cwd=tmp_path, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert sample_set(tmp_path / "parts") == sample_set(tmp_path / "one")
    assert len(list((tmp_path / "parts" / ".logs" / "train" / ".submitit").glob("*/*_log.out"))) == 3
    assert sorted(p.name for p in tmp_path.iterdir()) == ["one", "parts", "raw"]  # nothing in the working folder
