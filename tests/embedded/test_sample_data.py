"""The embedded sample shards: readable by plain tarfile and webdataset, frames that move, the same bytes from
the same seed, built once and atomically in the default cache folder."""

from __future__ import annotations

import json
import tarfile
from pathlib import Path

import numpy as np
import pytest
import torch
import webdataset as wds

from gridgen.data import count_samples
from gridgen.embedded import default_cache_dir, ensure_sample_shards, write_sample_shards
from gridgen.embedded import sample_data as sample_mod
from gridgen.embedded.world import BACKGROUND_COLORS
from gridgen.layout import GridLayout

SIZES = {"video": (128, 128), "multiview": (128, 192)}  # (H, W): 4x4 and 4x6 cells of 32 px


def _tar_keys(path: Path) -> list[str]:
    with tarfile.open(path) as tar:
        return sorted({m.name.split(".", 1)[0] for m in tar.getmembers() if m.isreg()})


@pytest.mark.parametrize("kind", ["video", "multiview"])
def test_shards_readable_and_match_manifest(shards, kind):
    root, manifest = shards
    entry = manifest["kinds"][kind]
    assert json.loads((root / kind / "manifest.json").read_text())["counts"] == entry["counts"]
    layout = GridLayout(**entry["layout"])
    for split in ("train", "val"):
        paths = sorted((root / kind).glob(f"{split}-*.tar"))
        assert [p.name for p in paths] == entry["shards"][split]
        # plain tarfile: every sample has exactly png / json / txt
        with tarfile.open(paths[0]) as tar:
            names = [m.name for m in tar.getmembers()]
        assert {n.split(".", 1)[1] for n in names} == {"png", "json", "txt"}
        assert sum(len(_tar_keys(p)) for p in paths) == entry["counts"][split]
        assert count_samples(str(p) for p in paths) == entry["counts"][split]

        # plain webdataset, no gridgen code involved
        dataset = wds.WebDataset([str(p) for p in paths], shardshuffle=False).decode("rgb8")
        samples = list(dataset)
        assert len(samples) == entry["counts"][split]
        for s in samples:
            assert s["png"].shape == (*SIZES[kind], 3) and s["png"].dtype == np.uint8
            meta = s["json"]
            assert (meta["rows"], meta["cols"], meta["cell_height"], meta["cell_width"]) == (
                layout.rows,
                layout.cols,
                32,
                32,
            )
            assert meta["kind"] == kind and meta["source"] == "gridgen-sample"
            assert meta["source_id"] == s["__key__"]
            first = meta["frame_indices"][0]  # video: 16 consecutive frames of a 20-frame mp4, seeded start
            assert meta["frame_indices"] == list(range(first, first + layout.num_cells))
            assert (0 <= first <= 4) if kind == "video" else first == 0
            assert ("fps" in meta) == (kind == "video") and ("cameras" in meta) == (kind == "multiview")
            # c_layout: "A 16-frame sequence ..." (video) and paper Table 4's "A 24-frame sequence ..." (multi-view)
            assert meta["c_layout"] == layout.caption_prefix("video")
            if kind == "multiview":
                subject = f"{meta['metadata']['color']} {meta['metadata']['object']}"
                assert meta["c_content"].startswith("Each frame captures a 3D model of ")
                assert f" {subject} from a different angle, rotating 360 degrees." in meta["c_content"]
            assert s["txt"] == f"{meta['c_layout']} {meta['c_content']}"


def test_untile_recovers_moving_frames(shards):
    root, _ = shards
    for kind in ("video", "multiview"):
        dataset = wds.WebDataset(str(root / kind / "val-000000.tar"), shardshuffle=False).decode("torchrgb8")
        for s in dataset:
            layout = GridLayout(**{k: s["json"][k] for k in ("rows", "cols", "cell_height", "cell_width")})
            frames = layout.untile(s["png"])  # (F, 3, 32, 32)
            assert frames.shape == (layout.num_cells, 3, 32, 32)
            assert torch.equal(layout.tile(frames), s["png"])
            # consecutive frames differ: the shape moves / the camera turns
            assert all(not torch.equal(frames[k], frames[k + 1]) for k in range(layout.num_cells - 1))
            if kind == "video":
                # the shape (pixels unlike the background) is in every frame and its centroid travels
                background = torch.tensor(BACKGROUND_COLORS[s["json"]["metadata"]["background"]])
                mask = (frames.int() - background[None, :, None, None]).abs().sum(1) > 30
                area = mask.sum((1, 2)).float()
                assert (area > 0).all()
                ys, xs = torch.meshgrid(torch.arange(32.0), torch.arange(32.0), indexing="ij")
                centroid = torch.stack([(mask * xs).sum((1, 2)), (mask * ys).sum((1, 2))], 1) / area[:, None]
                assert (centroid[1:] - centroid[:-1]).norm(dim=1).sum() > 10  # pixels travelled


def test_same_seed_same_bytes_other_seed_differs(tmp_path):
    tiny = dict(num_video=3, num_multiview=2, num_val=1, samples_per_shard=2)

    def snapshot(folder: Path) -> dict[str, bytes]:
        return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}

    write_sample_shards(tmp_path / "a", seed=0, **tiny)
    write_sample_shards(tmp_path / "b", seed=0, **tiny)
    write_sample_shards(tmp_path / "c", seed=1, **tiny)
    a, b, c = snapshot(tmp_path / "a"), snapshot(tmp_path / "b"), snapshot(tmp_path / "c")
    assert a == b
    assert a.keys() == c.keys()
    assert a["video/train-000000.tar"] != c["video/train-000000.tar"]
    assert a["multiview/train-000000.tar"] != c["multiview/train-000000.tar"]


def test_ensure_sample_shards_caches_and_is_atomic(tmp_path, monkeypatch):
    # a crash half way leaves nothing behind, not even the temp folder
    def crash(out_dir, **kw):
        (Path(out_dir) / "video").mkdir(parents=True)
        (Path(out_dir) / "video" / "train-000000.tar").write_bytes(b"half")
        raise KeyboardInterrupt

    monkeypatch.setattr(sample_mod, "write_sample_shards", crash)
    with pytest.raises(KeyboardInterrupt):
        ensure_sample_shards(tmp_path, seed=0)
    assert list(tmp_path.iterdir()) == []
    monkeypatch.undo()

    monkeypatch.setenv("GRIDGEN_CACHE", str(tmp_path))
    path = ensure_sample_shards(seed=0)  # default root from $GRIDGEN_CACHE, default sizes
    assert path == tmp_path / "sample-v2-seed0"
    assert [p.name for p in tmp_path.iterdir()] == ["sample-v2-seed0"]  # no temp folder left
    counts = {k: v["counts"] for k, v in json.loads((path / "manifest.json").read_text())["kinds"].items()}
    assert counts == {"video": {"train": 64, "val": 4}, "multiview": {"train": 32, "val": 4}}
    assert len(list((path / "video").glob("train-*.tar"))) == 4
    stamp = (path / "manifest.json").stat().st_mtime_ns
    assert ensure_sample_shards(tmp_path, seed=0) == path  # cached: not rewritten
    assert (path / "manifest.json").stat().st_mtime_ns == stamp


def test_default_cache_dir_is_gridgen_cache_or_home(monkeypatch, tmp_path):
    monkeypatch.setenv("GRIDGEN_CACHE", str(tmp_path / "c"))
    assert default_cache_dir() == tmp_path / "c"
    monkeypatch.delenv("GRIDGEN_CACHE")
    monkeypatch.setenv("HOME", str(tmp_path))
    assert default_cache_dir() == Path(tmp_path) / ".cache" / "gridgen"
