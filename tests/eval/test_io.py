"""Reading evaluation sets: mp4 files, frame folders, grid images, shards and generate output folders."""

import io
import json
import os
import re
import tarfile
from pathlib import Path

import numpy as np
import pytest
import torch
import webdataset as wds
from PIL import Image

from gridgen.embedded import ensure_sample_shards
from gridgen.eval.io import list_videos, protocol_frames, read_video_file, write_video_file
from gridgen.layout import GridLayout
from tests.helpers.paths import DEMO_MULTIVIEW


def video(seed: int, t: int = 6, h: int = 16, w: int = 24) -> torch.Tensor:
    return torch.randint(0, 256, (t, 3, h, w), generator=torch.Generator().manual_seed(seed), dtype=torch.uint8)


def save_png(path: Path, image: torch.Tensor) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(image.permute(1, 2, 0).numpy()).save(path)


def png_bytes(image: torch.Tensor) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(image.permute(1, 2, 0).numpy()).save(buffer, format="PNG")
    return buffer.getvalue()


def test_mp4_roundtrip_is_lossless(tmp_path):
    frames = video(0)
    write_video_file(tmp_path / "a.mp4", frames)
    torch.testing.assert_close(read_video_file(tmp_path / "a.mp4"), frames, rtol=0, atol=0)
    (tmp_path / "a.txt").write_text("a red circle moves\n")
    write_video_file(tmp_path / "b.mp4", video(1))
    items = list_videos(tmp_path)
    assert [i.name for i in items] == ["a", "b"] and items[0].caption == "a red circle moves"
    torch.testing.assert_close(items[1].frames(), video(1), rtol=0, atol=0)


def test_frame_folders_in_natural_order(tmp_path):
    frames = video(2, t=12)
    for t in range(12):  # frame10 must come after frame9, not after frame1
        save_png(tmp_path / "clip_b" / f"frame{t}.png", frames[t])
        save_png(tmp_path / "clip_a" / "frames" / f"{t:03d}.png", frames[t])
    items = list_videos(tmp_path)
    assert [i.name for i in items] == ["clip_a", "clip_b"]
    for item in items:
        torch.testing.assert_close(item.frames(), frames, rtol=0, atol=0)


def test_grid_images_untiled_by_layout(tmp_path):
    layout = GridLayout(2, 3, 16, 16)
    frames = video(3, t=6, h=16, w=16)
    save_png(tmp_path / "g0.png", layout.tile(frames))
    with pytest.raises(ValueError, match="eval.layout"):
        list_videos(tmp_path / "g0.png")
    items = list_videos(tmp_path / "g0.png", layout="2x3")
    torch.testing.assert_close(items[0].frames(), frames, rtol=0, atol=0)
    (tmp_path / "g0.json").write_text(json.dumps({"rows": 2, "cols": 3, "prompt": "a cat"}))  # sidecar: no layout needed
    items = list_videos(tmp_path)
    assert len(items) == 1 and items[0].caption == "a cat"
    torch.testing.assert_close(items[0].frames(), frames, rtol=0, atol=0)


def test_shards_in_the_gridgen_data_format(tmp_path):
    layout = GridLayout(2, 2, 16, 16)
    clips = [video(10 + i, t=4, h=16, w=16) for i in range(3)]
    with wds.TarWriter(str(tmp_path / "val-000000.tar")) as sink:
        for i, clip in enumerate(clips):
            meta = {**layout.to_dict(), "kind": "video", "c_content": f"clip {i}", "frame_indices": [0, 1, 2, 3]}
            sink.write({"__key__": f"video-val-{i:06d}", "png": png_bytes(layout.tile(clip)),
                        "json": json.dumps(meta).encode(), "txt": f"A 4-frame sequence. clip {i}".encode()})
    items = list_videos(tmp_path)
    assert [i.name for i in items] == [f"video-val-{i:06d}" for i in range(3)]
    assert [i.caption for i in items] == ["clip 0", "clip 1", "clip 2"]  # c_content, without the layout prefix
    for item, clip in zip(items, clips, strict=True):
        torch.testing.assert_close(item.frames(), clip, rtol=0, atol=0)
    assert len(list_videos(str(tmp_path / "val-{000000..000000}.tar"))) == 3


def shard_videos(shard: Path) -> dict[str, torch.Tensor]:
    """Reference reader: every sample of a shard as frames, untiled by a plain loop over its json's rows/cols."""
    members: dict[str, dict[str, bytes]] = {}
    with tarfile.open(shard) as tar:
        for member in tar.getmembers():
            key, _, ext = member.name.partition(".")
            members.setdefault(key, {})[ext] = tar.extractfile(member).read()
    videos = {}
    for key, files in members.items():
        meta = json.loads(files["json"])
        grid = torch.from_numpy(np.array(Image.open(io.BytesIO(files["png"])).convert("RGB"))).permute(2, 0, 1)
        h, w = meta["cell_height"], meta["cell_width"]
        videos[key] = torch.stack([grid[:, r * h:(r + 1) * h, c * w:(c + 1) * w]
                                   for r in range(meta["rows"]) for c in range(meta["cols"])])
    return videos


def test_what_prepare_writes_is_a_set(tmp_path):
    """`make prepare`'s output (shards + manifest.json, here the sample data built through it): a folder of one
    split, a brace pattern or one .tar is read as it is; a folder of two splits names a pattern for each."""
    root = ensure_sample_shards(os.environ["GRIDGEN_CACHE"])
    folder = root / "video"  # train-000000..3.tar, val-000000.tar, manifest.json
    assert (folder / "manifest.json").is_file()
    with pytest.raises(ValueError) as refused:
        list_videos(folder)
    message = str(refused.value)
    assert "\n" not in message and "train-{000000..000003}.tar (4 shards)" in message
    suggested = re.search(r"eval.real='([^']+)'", message)[1]
    assert suggested == f"{folder}/val-{{000000..000000}}.tar"
    expected = shard_videos(folder / "val-000000.tar")
    for spec in (suggested, folder / "val-000000.tar"):
        items = list_videos(spec)
        assert [item.name for item in items] == sorted(expected)
        for item in items:
            torch.testing.assert_close(item.frames(), expected[item.name], rtol=0, atol=0)
    train = list_videos(f"{folder}/train-{{000000..000003}}.tar")
    assert len(train) == 64 and train[17].name == "video-train-000017"
    torch.testing.assert_close(train[17].frames(), shard_videos(folder / "train-000001.tar")["video-train-000017"])
    one = tmp_path / "one"  # one split with its manifest.json
    one.mkdir()
    for name in ("manifest.json", "val-000000.tar"):
        (one / name).write_bytes((folder / name).read_bytes())
    assert [item.name for item in list_videos(one)] == sorted(expected)
    with pytest.raises(ValueError, match=r"one shard folder per kind of grid \(multiview, video\); evaluate one"):
        list_videos(root)


class PlantedPayload:
    """Unpickling this creates ``marker`` (what a crafted ``.pyd``/``.pickle`` shard member could do)."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (open, (str(self.marker), "w"))


def test_shard_reader_never_unpickles_members(tmp_path):
    """Only the image, json and txt members are read; .pyd / .pickle members are left alone (no code runs)."""
    import pickle

    marker = tmp_path / "unpickled"
    payload = pickle.dumps(PlantedPayload(marker))
    pickle.loads(payload)  # the payload is live: loading it creates the marker
    assert marker.is_file()
    marker.unlink()
    layout, clip = GridLayout(2, 2, 16, 16), video(3, t=4, h=16, w=16)
    with wds.TarWriter(str(tmp_path / "train-000000.tar"), encoder=False) as sink:  # bytes as given, no encoding
        sink.write({"__key__": "s0", "png": png_bytes(layout.tile(clip)), "json": json.dumps(layout.to_dict()).encode(),
                    "txt": b"a clip", "pyd": payload, "extra.pickle": payload})
    (item,) = list_videos(tmp_path)
    torch.testing.assert_close(item.frames(), clip, rtol=0, atol=0)
    assert item.caption == "a clip" and not marker.exists()


def test_generate_output_folders_with_manifest(tmp_path):
    frames = video(4, t=5)
    sample = tmp_path / "000001"
    for t in range(5):
        save_png(sample / f"frame_{t:02d}.png", frames[t])
    save_png(sample / "grid.png", GridLayout(1, 5, 16, 16).tile(video(5, t=5, h=16, w=16)))  # not a frame
    save_png(sample / "reference.png", frames[0])
    (sample / "manifest.json").write_text(json.dumps({"prompt": "a dog runs", "timing": {"inference_time_s": 2.5}}))
    other = tmp_path / "000002"
    write_video_file(other / "video.mp4", frames)
    (other / "manifest.json").write_text(json.dumps({"prompt": "x", "inference_time_s": 4.0}))
    items = list_videos(tmp_path)
    assert [(i.name, i.caption, i.seconds) for i in items] == [("000001", "a dog runs", 2.5), ("000002", "x", 4.0)]
    torch.testing.assert_close(items[0].frames(), frames, rtol=0, atol=0)  # grid.png and reference.png left out
    torch.testing.assert_close(items[0].reference(), frames[0], rtol=0, atol=0)
    torch.testing.assert_close(items[1].frames(), frames, rtol=0, atol=0)
    assert list_videos(sample)[0].name == "000001"  # one sample folder on its own


def test_rgba_frames_are_composited(tmp_path):
    rgba = np.zeros((8, 8, 4), np.uint8)
    rgba[:4, :, :3], rgba[:4, :, 3] = 100, 255  # top half opaque grey, bottom half transparent
    for t in range(2):
        Image.fromarray(rgba).save(tmp_path / f"v{t}.png")
    white = list_videos(tmp_path)[0].frames()
    black = list_videos(tmp_path, background="black")[0].frames()
    assert white[0, :, :4].unique().tolist() == [100] and white[0, :, 4:].unique().tolist() == [255]
    assert black[0, :, 4:].unique().tolist() == [0]


@pytest.mark.skipif(not DEMO_MULTIVIEW.is_dir(), reason="shared multi-view demo data is absent")
def test_real_multiview_demo_folder_is_one_24_view_sequence():
    items = list_videos(DEMO_MULTIVIEW)
    assert len(items) == 1
    views = items[0].frames()
    assert views.shape == (24, 3, 256, 256)
    assert not torch.equal(views[0], views[6])  # natural order: multi_frame6 is a different view from 0


def test_bad_inputs_are_one_line_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        list_videos(tmp_path / "missing")
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match="holds no videos"):
        list_videos(tmp_path / "empty")
    with pytest.raises(ValueError, match="has 6 frames, the protocol needs 16"):
        protocol_frames(video(0), 16, "clip.mp4")
    (tmp_path / "broken.mp4").write_bytes(b"not a video")
    with pytest.raises(ValueError, match="cannot decode"):
        list_videos(tmp_path / "broken.mp4")[0].frames()
