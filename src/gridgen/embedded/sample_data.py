"""Procedural sample data: real raw inputs (mp4 clips, RGBA renders) made from a seed, prepared into shards.

Real datasets are large and licensed; tests, smoke runs and ``make train`` need data with the on-disk formats
of real ones, made in seconds. This module writes *raw inputs* like the real datasets' and runs them through
the same prepare path (:func:`gridgen.data.prepare.prepare`) as WebVid and Objaverse:

* ``video``: short H.264 mp4 clips (PyAV) of the moving-shapes world (:mod:`gridgen.embedded.world`): a
  coloured circle / square / triangle moving along a straight line or a circle on a plain background, listed in a WebVid-style CSV (``videoid, name, page_dir, duration,
  contentUrl`` + the drawing parameters) whose ``name`` is the caption ("a red circle moves from left to
  right on a blue background"). Prepared into 4x4 grids of 16 consecutive frames from a seeded random start.
* ``multiview``: 24 RGBA renders per object (a flat-shaded box / pyramid / prism, transparent background, by
  :mod:`gridgen.embedded.render`) taken by the 24 cameras of paper Table 5 (radius 2, horizontal circle, perspective), with a caption CSV.
  Prepared into 4x6 grids on black, with the cameras in every sample's json.

Sizes, counts and caption templates come from ``data_cards/sample.md``. Everything derives from
``SeedSequence([seed, kind, split, index])``: the same seed gives the same shards, and a sample does not
change when the number of samples does. The raw inputs stay beside the shards under ``raw/``.
"""

from __future__ import annotations

import csv
import json
import logging
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from gridgen.cameras import camera_azimuths, camera_to_world
from gridgen.data.cards import load_card
from gridgen.data.prepare import prepare  # the same path as `make prepare`
from gridgen.data.sources.video import write_video
from gridgen.embedded.render import OBJECTS, object_mesh, render_view
from gridgen.embedded.world import SHAPE_COLORS, moving_shape_clip, with_article
from gridgen.runtime import default_cache_dir

log = logging.getLogger(__name__)

SAMPLE_VERSION = 2  # bump when the generated content changes, so stale caches are not reused
SOURCE = "gridgen-sample"
CARD = "sample"
VIDEO_OPTIONS = {"crf": "18", "preset": "ultrafast"}
VOLATILE_KEYS = ("src", "seconds", "clips_per_sec", "frames_per_sec")  # prepare's run record, not the data

_KIND_CODE = {"video": 1, "multiview": 2}
_SPLIT_CODE = {"train": 1, "val": 2}


def _rng(seed: int, kind: str, split: str, index: int) -> np.random.Generator:
    # one independent stream per sample: a sample never depends on how many were generated
    return np.random.default_rng(np.random.SeedSequence([seed, _KIND_CODE[kind], _SPLIT_CODE[split], index]))


# ---- moving-shape clips ---------------------------------------------------------------------------


def write_raw_videos(folder: str | Path, split: str, count: int, seed: int, raw: dict[str, Any]) -> Path:
    """``count`` mp4 clips under ``folder/sample/`` and a WebVid-style ``folder/metadata.csv``; returns the CSV."""
    folder = Path(folder)
    (folder / "sample").mkdir(parents=True, exist_ok=True)
    fps, num_frames = int(raw["video_fps"]), int(raw["video_frames"])
    rows = []
    for index in range(count):
        videoid = f"video-{split}-{index:06d}"
        frames, meta = moving_shape_clip(_rng(seed, "video", split, index), num_frames, int(raw["video_height"]),
                                         int(raw["video_width"]))
        write_video(folder / "sample" / f"{videoid}.mp4", frames, fps=fps, options=VIDEO_OPTIONS)
        rows.append({"videoid": videoid, "name": meta.pop("name"), "page_dir": "sample",
                     "duration": f"PT00H00M{round(num_frames / fps):02d}S",  # WebVid's ISO 8601 format
                     "contentUrl": f"sample/{videoid}.mp4", **meta})
    return _write_csv(folder / "metadata.csv", rows)


# ---- multi-view renders ---------------------------------------------------------------------------


def write_raw_renders(folder: str | Path, split: str, count: int, seed: int, raw: dict[str, Any],
                      cameras: str = "table5", radius: float = 2.0) -> Path:
    """``count`` objects as ``folder/<uid>/000.png ...`` (RGBA) and ``folder/metadata.csv``; returns the CSV."""
    folder = Path(folder)
    c2ws = [camera_to_world(a, radius) for a in camera_azimuths(int(raw["num_views"]), cameras)]
    rows = []
    for index in range(count):
        uid = f"multiview-{split}-{index:06d}"
        rng = _rng(seed, "multiview", split, index)
        obj, color = str(rng.choice(OBJECTS)), str(rng.choice(list(SHAPE_COLORS)))
        vertices, faces = object_mesh(obj, rng)
        (folder / uid).mkdir(parents=True, exist_ok=True)
        for k, c2w in enumerate(c2ws):
            view = render_view(vertices, faces, SHAPE_COLORS[color], c2w, int(raw["render_size"]))
            Image.fromarray(view, "RGBA").save(folder / uid / f"{k:03d}.png", compress_level=1)
        rows.append({"uid": uid, "caption": f"{with_article(color)} {obj}", "object": obj, "color": color})
    return _write_csv(folder / "metadata.csv", rows)


def _write_csv(path: Path, rows: list[dict[str, Any]]) -> Path:
    with path.open("w", newline="", encoding="utf-8") as handle:
        writer = csv.DictWriter(handle, fieldnames=list(rows[0]) if rows else ["id"])
        writer.writeheader()
        writer.writerows(rows)
    return path


# ---- through prepare ------------------------------------------------------------------------------


def _prepare_config(kind: str, card: dict[str, Any], cell_size: int, samples_per_shard: int, csv_path: Path,
                    src: Path, out: Path, split: str) -> dict[str, Any]:
    """The prepare config of one kind and split: the card's settings, the sample's own source columns."""
    pre, captions, shards = card["preprocessing"][kind], card["captioning"][kind], card["shards"]
    if kind == "video":
        source = {"kind": "video", "csv": csv_path.name, "id_column": "videoid", "caption_column": "name",
                  "path_templates": ["{page_dir}/{videoid}.mp4"]}
    else:
        source = {"kind": "multiview", "csv": csv_path.name, "id_column": "uid", "caption_column": "caption",
                  "num_views": int(card["raw"]["num_views"]), "background": pre["background"],
                  "cameras": pre["cameras"], "radius": float(pre["camera_radius"])}
    data = {
        "name": SOURCE, "key_prefix": "", "layout": pre["layout"], "cell_height": cell_size, "cell_width": cell_size,
        "source": source, "sampling": dict(pre.get("sampling") or {}),
        "captions": {"layout_template": captions["layout_template"], "content_template": captions["content_template"],
                     "captioner": card["captioning"]["captioner"]},
        "shards": {"format": shards["format"], "quality": shards["quality"], "maxcount": samples_per_shard,
                   "maxsize": shards["maxsize"]},
    }
    return {"data": data, "prepare": {"src": str(src), "out": str(out), "split": split, "seed": 0, "workers": 0,
                                      "progress": False}}


def write_sample_shards(
    out_dir: str | Path,
    *,
    num_video: int | None = None,
    num_multiview: int | None = None,
    num_val: int | None = None,
    cell_size: int | None = None,
    samples_per_shard: int | None = None,
    seed: int = 0,
) -> dict[str, Any]:
    """Write raw inputs under ``out_dir/raw/`` and prepare them into ``video/`` and ``multiview/`` shards.

    Each kind folder holds ``train-000000.tar ...`` (``samples_per_shard`` samples each), ``val-000000.tar ...``
    (``num_val`` samples) and prepare's ``manifest.json`` (counts per split, shard names, skipped inputs);
    ``out_dir/manifest.json`` combines both kinds and is returned. Unset sizes come from
    ``data_cards/sample.md``. Not atomic by itself: use :func:`ensure_sample_shards` for a crash-safe cached copy.
    """
    card = load_card(CARD)
    expected, raw = card["expected"], card["raw"]
    num_video = expected["video"]["train"] if num_video is None else num_video
    num_multiview = expected["multiview"]["train"] if num_multiview is None else num_multiview
    num_val = expected["video"]["val"] if num_val is None else num_val
    cell_size = int(card["preprocessing"]["video"]["cell_height"] if cell_size is None else cell_size)
    samples_per_shard = int(card["shards"]["maxcount"] if samples_per_shard is None else samples_per_shard)
    if samples_per_shard < 1:
        raise ValueError(f"samples_per_shard must be >= 1, got {samples_per_shard}")
    out = Path(out_dir)
    manifest: dict[str, Any] = {"version": SAMPLE_VERSION, "source": SOURCE, "seed": seed, "cell_size": cell_size,
                                "kinds": {}}
    counts = {"video": num_video, "multiview": num_multiview}
    for kind in ("video", "multiview"):
        folder = out / kind
        for split, count in (("train", counts[kind]), ("val", num_val)):
            src = out / "raw" / kind / split
            src.mkdir(parents=True, exist_ok=True)
            if kind == "video":
                csv_path = write_raw_videos(src, split, count, seed, raw)
            else:
                pre = card["preprocessing"]["multiview"]
                csv_path = write_raw_renders(src, split, count, seed, raw, pre["cameras"], float(pre["camera_radius"]))
            entry = prepare(_prepare_config(kind, card, cell_size, samples_per_shard, csv_path, src, folder, split))
            if entry["counts"]["samples"] != count:  # the sample data is made to be usable: nothing may drop out
                raise RuntimeError(f"sample {kind}/{split}: {count} inputs gave {entry['counts']['samples']} grids "
                                   f"(skipped: {entry['counts']['skipped']} {entry['counts']['examples']})")
        kind_manifest = json.loads((folder / "manifest.json").read_text())
        kind_manifest.update({"version": SAMPLE_VERSION, "seed": seed})
        for entry in kind_manifest["splits"].values():  # the same bytes wherever and however fast it was made
            for key in VOLATILE_KEYS:
                entry.pop(key, None)
        (folder / "manifest.json").write_text(json.dumps(kind_manifest, indent=2) + "\n")
        manifest["kinds"][kind] = {key: kind_manifest[key] for key in ("kind", "layout", "counts", "shards")}
    (out / "manifest.json").write_text(json.dumps(manifest, indent=2) + "\n")
    log.info("wrote sample shards to %s: %s", out, {k: v["counts"] for k, v in manifest["kinds"].items()})
    return manifest


def ensure_sample_shards(root: str | Path | None = None, seed: int = 0) -> Path:
    """The cached sample dataset folder ``<root>/sample-v2-seed{seed}``, generated with defaults on first use.

    The data is written to a temporary folder next to the target and renamed into place, so a crash or a
    concurrent run never leaves a half-written dataset behind: the folder exists only once it is complete.
    """
    base = Path(root).expanduser() if root is not None else default_cache_dir()
    target = base / f"sample-v{SAMPLE_VERSION}-seed{seed}"
    if (target / "manifest.json").is_file():
        return target
    if target.exists():
        # manifest.json is written last and the folder appears atomically, so this is not ours to trust
        log.warning("%s exists but has no manifest.json (not written by gridgen?); regenerating it", target)
        shutil.rmtree(target)
    base.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.tmp-", dir=base))
    try:
        write_sample_shards(tmp, seed=seed)
        os.rename(tmp, target)  # atomic on one filesystem; fails if another process got there first
    except OSError:
        if (target / "manifest.json").is_file():  # lost a race against an identical writer: use theirs
            log.info("sample shards appeared concurrently at %s; using them", target)
            return target
        raise
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    log.info("generated sample shards at %s", target)
    return target
