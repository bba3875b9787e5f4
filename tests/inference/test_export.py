"""Export of a generated grid: frames, mp4, gif and cameras in film-strip order, the files the README names."""

import json
import re
from pathlib import Path

import av
import numpy as np
from PIL import Image

from gridgen.cameras import camera_circle
from gridgen.inference import export_sample
from gridgen.inference.export import grid_frames
from gridgen.layout import GridLayout
from tests.helpers.paths import ROOT


def test_export_writes_frames_videos_and_cameras(tmp_path):
    layout = GridLayout(2, 3, 32, 48)
    grid = np.random.default_rng(0).integers(0, 256, (layout.height, layout.width, 3), dtype=np.uint8)
    files = export_sample(tmp_path / "s", grid, layout, kind="multiview", fps=6,
                          cameras=camera_circle(6))
    assert np.array_equal(np.asarray(Image.open(tmp_path / files["grid"])), grid)
    assert len(files["views"]) == 6
    for k, name in enumerate(files["views"]):  # film-strip order: view k = cell (k // cols, k % cols)
        row, col = divmod(k, layout.cols)
        cell = grid[row * 32:(row + 1) * 32, col * 48:(col + 1) * 48]
        assert np.array_equal(np.asarray(Image.open(tmp_path / name)), cell)
    with av.open(str(tmp_path / files["mp4"])) as container:
        decoded = [f.to_ndarray(format="rgb24") for f in container.decode(video=0)]
        assert container.streams.video[0].average_rate == 6
    assert len(decoded) == 6 and decoded[0].shape == (32, 48, 3)
    with Image.open(tmp_path / files["gif"]) as gif:
        assert gif.n_frames == 6 and gif.size == (48, 32) and gif.info["duration"] == 170  # 1/6 s in GIF's centiseconds
    assert json.loads((tmp_path / files["cameras"]).read_text()) == camera_circle(6)
    assert np.array_equal(grid_frames(grid, layout)[4], grid[32:64, 48:96])


def test_readme_names_the_files_generate_writes(tmp_path):
    """Every file or folder export_sample writes, for video and multi-view, is named in the README's Output text."""
    readme = (ROOT / "README.md").read_text()
    start = readme.index("Output (`generate.out`")
    output = readme[start:readme.index("\n\n", start)]
    layout = GridLayout(2, 2, 16, 16)
    grid = np.zeros((32, 32, 3), np.uint8)
    for kind in ("video", "multiview"):
        files = export_sample(tmp_path / kind, grid, layout, kind=kind,
                              cameras=camera_circle(layout.num_cells) if kind == "multiview" else None)
        names = {Path(v[0]).parts[1] + "/" if isinstance(v, list) else Path(v).parts[1] for v in files.values()}
        assert names == ({"grid.png", "views/", "views.mp4", "views.gif", "cameras.json"} if kind == "multiview" else
                         {"grid.png", "frames/", "frames.mp4", "frames.gif"})
        missing = sorted(name for name in names if not re.search(rf"[`/]{re.escape(name)}`", output))
        assert not missing, f"README's Output paragraph does not name {missing} ({kind})"
