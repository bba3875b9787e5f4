"""Frame folders (TikTok layout): frames in numeric order, default and per-folder captions."""

from __future__ import annotations

import numpy as np
import torch
from PIL import Image

from gridgen.data.cards import load_card
from gridgen.data.prepare import prepare
from gridgen.layout import GridLayout
from tests.helpers.prepare import compose_prepare, read_samples


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
