"""The miniature world's data (`make mini`): raw clips, frames and scenes written like real datasets' raw inputs and
prepared into shards by :func:`gridgen.data.prepare.prepare`, the path of ``make prepare``.

* ``clips``: 16-frame H.264 mp4 clips of :func:`~gridgen.embedded.world.mini_clip` with a WebVid-style CSV whose
  ``name`` is the caption; prepared into 4x4 grids of 64 px cells (``train``/``val`` of the seen combinations,
  ``test`` of the held-out ones, :func:`~gridgen.embedded.world.mini_combinations`).
* ``frames``: one shape at a random place, 1x1 layout, 64 px, captioned in varied words
  (:func:`~gridgen.embedded.world.mini_frame_caption`: "a red square", "A still image. a red square moves slowly
  up"); ``scenes``: 1-4 shapes of frame scale over a 128 px canvas (:func:`~gridgen.embedded.world.mini_scene`).
  Both without ``c_layout``: the base text-to-image model learns from them and never sees a grid.

Counts and sizes come from ``data_cards/mini.md``; every sample derives from ``SeedSequence([seed, kind, split,
index])``, so the same seed gives the same shards.
"""

from __future__ import annotations

import csv
import json
import logging
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from gridgen.data.cards import load_card
from gridgen.data.prepare import prepare
from gridgen.embedded.world import (
    MINI_COLORS,
    MINI_RADIUS,
    SHAPES,
    draw_shapes,
    mini_caption,
    mini_clip,
    mini_combinations,
    mini_frame_caption,
    mini_scene,
)
from gridgen.layout import GridLayout
from gridgen.video import write_video

log = logging.getLogger(__name__)

CARD = "mini"
KINDS = ("clips", "frames", "scenes")
SPLITS = {"clips": ("train", "val", "test"), "frames": ("train", "val"), "scenes": ("train", "val")}
VIDEO_OPTIONS = {"crf": "10", "preset": "ultrafast"}
VOLATILE_KEYS = ("src", "seconds", "clips_per_sec", "frames_per_sec")  # prepare's run record, not the data
_CODES = {"clips": 1, "frames": 2, "scenes": 3, "train": 1, "val": 2, "test": 3}


def _rng(seed: int, kind: str, split: str, index: int) -> np.random.Generator:
    return np.random.default_rng(np.random.SeedSequence([seed, _CODES[kind], _CODES[split], index]))


def _write_csv(path: Path, rows: list[dict[str, Any]]) -> Path:
    with path.open("w", newline="", encoding="utf-8") as handle:
        writer = csv.DictWriter(handle, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    return path


def cell_size(kind: str) -> int:
    """The px side of one cell of ``kind`` (``clips``, ``frames``, ``scenes``) once prepared: the card's."""
    pre = load_card(CARD)["preprocessing"][kind]
    if int(pre["cell_height"]) != int(pre["cell_width"]):
        raise ValueError(f"data_cards/{CARD}.md: {kind} cells must be square, got {pre['cell_height']}x"
                         f"{pre['cell_width']}; set cell_height = cell_width")
    return int(pre["cell_height"])


def clips_layout() -> GridLayout:
    """The layout of the prepared clips (the card's, e.g. 4x4 of 64 px cells): the grids ``make mini`` generates."""
    return GridLayout.parse(str(load_card(CARD)["preprocessing"]["clips"]["layout"]), cell_size("clips"))


def write_raw(folder: Path, kind: str, split: str, count: int, seed: int, raw: dict[str, Any]) -> Path:
    """``count`` raw inputs of ``kind`` under ``folder`` and their ``metadata.csv``; returns the CSV."""
    folder.mkdir(parents=True, exist_ok=True)
    rows: list[dict[str, Any]] = []
    if kind == "clips":
        combos = mini_combinations(split)
        num_frames, size, fps = int(raw["video_frames"]), int(raw["video_size"]), int(raw["video_fps"])
        for index in range(count):
            # every combination equally often; fewer clips than combinations (val) spread over all of them
            pick = index * len(combos) // count if count < len(combos) else index % len(combos)
            shape, color, motion = combos[pick]
            frames, _ = mini_clip(_rng(seed, kind, split, index), shape, color, motion, num_frames, size)
            videoid = f"clip-{split}-{index:06d}"
            write_video(folder / "mini" / f"{videoid}.mp4", frames, fps=fps, options=VIDEO_OPTIONS)
            rows.append({"videoid": videoid, "name": mini_caption(shape, color, motion), "page_dir": "mini",
                         "duration": f"PT00H00M{round(num_frames / fps):02d}S", "contentUrl": f"mini/{videoid}.mp4",
                         "shape": shape, "color": color, "motion": motion.words})
        return _write_csv(folder / "metadata.csv", rows)
    for index in range(count):
        rng = _rng(seed, kind, split, index)
        item = f"{kind}-{split}-{index:06d}"
        if kind == "frames":
            size = int(raw["video_size"])
            shape, color = str(rng.choice(SHAPES)), str(rng.choice(list(MINI_COLORS)))
            radius = MINI_RADIUS * size
            x, y = rng.uniform(radius, size - radius, size=2)
            image, caption = draw_shapes((size, size), [(shape, color, x, y, radius)]), mini_frame_caption(rng, shape,
                                                                                                         color)
        else:
            image, caption, _ = mini_scene(rng, int(raw["scene_size"]), int(raw["video_size"]),
                                           int(raw["scene_max_shapes"]))
        (folder / item).mkdir(exist_ok=True)
        Image.fromarray(image).save(folder / item / "0.png", compress_level=1)
        rows.append({"id": item, "caption": caption})
    return _write_csv(folder / "metadata.csv", rows)


def prepare_config(kind: str, card: dict[str, Any], csv_path: Path, src: Path, out: Path, split: str
                   ) -> dict[str, Any]:
    """The prepare config of one kind and split, as ``make prepare data=video|frames`` would compose it."""
    pre, captions, shards = card["preprocessing"][kind], card["captioning"][kind], card["shards"]
    if kind == "clips":
        source = {"kind": "video", "csv": csv_path.name, "id_column": "videoid", "caption_column": "name",
                  "path_templates": ["{page_dir}/{videoid}.mp4"]}
    else:
        source = {"kind": "frames", "csv": csv_path.name, "id_column": "id", "caption_column": "caption"}
    data = {
        "name": f"mini-{kind}", "key_prefix": "", "layout": pre["layout"], "cell_height": pre["cell_height"],
        "cell_width": pre["cell_width"], "source": source,
        "sampling": dict(pre.get("sampling") or {"stride": 1, "fps": None, "start": 0, "grids_per_clip": 1}),
        "captions": {"layout_template": captions["layout_template"], "content_template": captions["content_template"],
                     "captioner": card["captioning"]["captioner"]},
        "shards": {"format": shards["format"], "quality": shards["quality"], "maxcount": shards["maxcount"],
                   "maxsize": shards["maxsize"]},
    }
    return {"data": data, "prepare": {"src": str(src), "out": str(out), "split": split, "seed": 0, "workers": 0,
                                      "progress": False}}


def write_mini_data(out: str | Path, seed: int = 0, scale: float = 1.0) -> dict[str, Any]:
    """Raw inputs under ``out/raw/`` prepared into ``out/{clips,frames,scenes}/`` shards; returns the manifest.

    ``scale`` multiplies the card's counts (tests use a toy size); nothing may drop out in prepare.
    """
    card = load_card(CARD)
    out = Path(out)
    manifest: dict[str, Any] = {"card": CARD, "seed": seed, "scale": scale, "kinds": {}}
    for kind in KINDS:
        for split in SPLITS[kind]:
            count = max(1, round(int(card["expected"][kind][split]) * scale))
            src = out / "raw" / kind / split
            csv_path = write_raw(src, kind, split, count, seed, card["raw"])
            entry = prepare(prepare_config(kind, card, csv_path, src, out / kind, split))
            if entry["counts"]["samples"] != count:
                raise RuntimeError(f"mini {kind}/{split}: {count} inputs gave {entry['counts']['samples']} samples "
                                   f"(skipped: {entry['counts']['skipped']} {entry['counts']['examples']})")
        kind_manifest = json.loads((out / kind / "manifest.json").read_text())
        for entry in kind_manifest["splits"].values():  # the same bytes however fast it was made
            for key in VOLATILE_KEYS:
                entry.pop(key, None)
        (out / kind / "manifest.json").write_text(json.dumps(kind_manifest, indent=2) + "\n")
        manifest["kinds"][kind] = {split: kind_manifest["splits"][split]["counts"]["samples"] for split in SPLITS[kind]}
    (out / "manifest.json").write_text(json.dumps(manifest, indent=2) + "\n")
    log.info("wrote the miniature world's shards to %s: %s", out, manifest["kinds"])
    return manifest
