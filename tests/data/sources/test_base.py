"""What every source shares: frame sampling windows, frames of another size refused or resized and counted,
files a source ignores counted."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from gridgen.data.prepare import prepare
from gridgen.data.sources import FrameSampling, write_video
from gridgen.embedded.world import moving_shape_clip
from tests.helpers.prepare import compose_prepare, read_samples


def test_frame_sampling_windows():
    rng = np.random.default_rng(0)
    assert FrameSampling(stride=2, start=3).windows(40, 4, None, rng) == ([[3, 5, 7, 9]], None)
    # 30 fps -> 10 fps is a step of 3; two windows of 10 frames packed from frame 0
    windows, fps = FrameSampling(fps=10, start=0, grids_per_clip=2).windows(30, 4, 30.0, rng)
    assert windows == [[0, 3, 6, 9], [10, 13, 16, 19]] and fps == pytest.approx(10.0)
    assert FrameSampling(fps=60, start=0).windows(8, 4, 25.0, rng)[0] == [[0, 1, 2, 3]]  # never repeats frames
    assert FrameSampling(stride=1).windows(3, 4, None, rng) == ([], None)  # too short
    for seed in range(20):  # random starts: inside the clip, non-overlapping, in order
        windows, _ = FrameSampling(stride=2, grids_per_clip=3).windows(30, 4, None, np.random.default_rng(seed))
        assert len(windows) == 3
        flat = [i for w in windows for i in w]
        assert all(w[1] - w[0] == 2 for w in windows) and flat == sorted(flat) and 0 <= flat[0] and flat[-1] < 30
        assert all(a[-1] < b[0] for a, b in zip(windows, windows[1:], strict=False))
    draws = {tuple(FrameSampling().windows(40, 4, None, np.random.default_rng(s))[0][0]) for s in range(10)}
    assert len(draws) > 3  # the start is random
    with pytest.raises(ValueError, match="stride or data.sampling.fps, not both"):
        FrameSampling(stride=2, fps=8)


def write_renders(folder: Path, odd_view: int | None = None) -> None:
    """Two objects of 4 RGBA views at 64x64 px; in ``obj1`` view ``odd_view`` is 100x80 (w x h) instead."""
    for obj in ("obj0", "obj1"):
        (folder / obj).mkdir(parents=True)
        for k in range(4):
            size = (80, 100) if obj == "obj1" and k == odd_view else (64, 64)  # (h, w)
            view = np.full((*size, 4), 40 * (k + 1), np.uint8)
            view[..., 3] = 255  # opaque: the cell keeps the view's grey level
            Image.fromarray(view, "RGBA").save(folder / obj / f"{k:03d}.png")


def renders_cfg(src: Path, out: Path, *extra: str):
    return compose_prepare("data=objaverse", f"prepare.src={src}", f"prepare.out={out}", "data.source.num_views=4",
                           "data.layout=2x2", "data.cell_height=32", "data.cell_width=32", "prepare.progress=false",
                           "data.source.default_caption='a block'", *extra)


def test_a_view_of_another_size_is_refused_or_resized_and_counted(tmp_path):
    write_renders(tmp_path / "raw", odd_view=2)
    entry = prepare(renders_cfg(tmp_path / "raw", tmp_path / "out"))
    counts = entry["counts"]
    assert counts["samples"] == 1 and counts["skipped"] == {"size_mismatch": 1} and counts["adjusted"] == {}
    (example,) = counts["examples"]["size_mismatch"]
    assert "obj1: 002.png is 100x80 px, the other frames 64x64 px" in example
    assert [s["__key__"] for s in read_samples(tmp_path / "out")] == ["objaverse-obj0"]

    entry = prepare(renders_cfg(tmp_path / "raw", tmp_path / "resized", "prepare.resize_mismatched=true"))
    counts = entry["counts"]
    assert counts["samples"] == 2 and counts["skipped"] == {} and counts["adjusted"] == {"resized_mismatched": 1}
    assert entry["config"]["resize_mismatched"] is True  # other shards than without it: resume must not mix them
    grid = read_samples(tmp_path / "resized")[1]["jpg"]
    odd_cell = grid[32:64, 0:32].astype(float)  # view 2 in film-strip order: row 1, column 0
    assert abs(odd_cell.mean() - 120) < 3  # the 100x80 view fitted (cover + centre crop), its colour kept
    manifest = json.loads((tmp_path / "resized" / "manifest.json").read_text())
    assert manifest["splits"]["train"]["counts"]["adjusted"] == {"resized_mismatched": 1}


def test_files_a_source_ignores_are_counted(tmp_path):
    write_renders(tmp_path / "raw")
    (tmp_path / "raw" / "obj0" / "notes.md").write_text("render settings")
    Image.fromarray(np.zeros((64, 64, 3), np.uint8)).save(tmp_path / "raw" / "obj1" / "depth.tiff")
    (tmp_path / "raw" / "obj1" / "caption.txt").write_text("a grey block")  # a caption file: used, not ignored
    entry = prepare(renders_cfg(tmp_path / "raw", tmp_path / "out"))
    assert entry["counts"]["samples"] == 2 and entry["counts"]["skipped"] == {}
    assert entry["ignored_files"] == {"count": 2, "by_extension": {".md": 1, ".tiff": 1},
                                      "examples": ["obj0/notes.md", "obj1/depth.tiff"]}
    # a folder of videos: anything that is neither a video nor its sidecar caption
    clips = tmp_path / "clips"
    clips.mkdir()
    frames, _ = moving_shape_clip(np.random.default_rng(0), 16, 32, 32)
    write_video(clips / "a.mp4", frames)
    (clips / "a.txt").write_text("a shape moves")
    (clips / "b.mkv.part").write_bytes(b"partial download")
    entry = prepare(compose_prepare("data=video", f"prepare.src={clips}", f"prepare.out={tmp_path / 'vout'}",
                                    "data.cell_height=32", "data.cell_width=32", "data.sampling.fps=null",
                                    "data.sampling.stride=1", "prepare.progress=false"))
    assert entry["counts"]["samples"] == 1
    assert entry["ignored_files"] == {"count": 1, "by_extension": {".part": 1}, "examples": ["b.mkv.part"]}
