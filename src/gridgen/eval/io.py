"""Reading the videos an evaluation compares: mp4 files, frame folders, grid images, shards, generate output.

Every reader gives :class:`VideoItem` s: a name, a lazy ``frames()`` (uint8 ``(T, 3, H, W)``, film-strip order)
and what the sample knows besides (caption, reference image, generation time). Listing is cheap and decoding
happens when a video is used, so a large real set is streamed, not held in memory.

What :func:`list_videos` accepts (``eval.real`` / ``eval.fake``):

* a folder of video files (``.mp4 .webm .mkv .avi .mov .gif``; decoded with PyAV), one video each;
* a ``gridgen.generate`` output folder: its ``manifest.json`` lists the samples with their frames, prompt,
  reference image and timing;
* a folder of sub-folders, one video each: the frames as images (``frames/``, ``views/`` or numbered images, in
  natural order: ``frame2`` before ``frame10``), else a video file, else one grid image untiled by the layout;
  a per-sample ``manifest.json`` adds the prompt, the reference image and the timing;
* a folder of images: one video made of those frames, or, when ``layout`` is given (``eval.layout=4x4``) or an
  image has a ``<name>.json`` with ``rows``/``cols``, one grid image per video;
* WebDataset shards (a ``.tar``, a folder of them, a brace pattern): per sample a ``png``/``jpg`` grid and a
  ``json`` with its layout (the format of ``gridgen.data``), caption from ``json.c_content`` or ``txt``;
* a single video file, grid image, or sample folder.

RGBA frames are composited on ``background`` (white, as multi-view renders are usually shown).
"""

from __future__ import annotations

import io
import json
import logging
import re
import tarfile
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image

from gridgen.files import natural_key
from gridgen.layout import GridLayout
from gridgen.video import read_video, write_video

log = logging.getLogger(__name__)

VIDEO_SUFFIXES = (".mp4", ".webm", ".mkv", ".avi", ".mov", ".gif")
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp", ".bmp")
MANIFEST = "manifest.json"
# Where a generate manifest may keep the seconds spent on one sequence (first found wins).
TIMING_KEYS = ("sample_s", "inference_time_s", "sequence_s", "seconds", "time_s", "elapsed_s", "wall_s")
REFERENCE_STEMS = ("reference", "ref", "input", "condition")
BACKGROUNDS = {"white": (255, 255, 255), "black": (0, 0, 0)}
_TAR_MEMBER = re.compile(r"^((?:.*/|)[^./]+)[.]([^/]*)$")
_SPLIT_SHARD = re.compile(r"^(.+)-(\d+)[.]tar$")  # make prepare's shard names: <split>-000000.tar


@dataclass
class VideoItem:
    """One video of an evaluation set; ``frames()`` decodes it (uint8 ``(T, 3, H, W)``)."""

    name: str
    load: Callable[[], torch.Tensor] = field(repr=False)
    source: str = ""
    caption: str | None = None
    reference: Callable[[], torch.Tensor] | None = field(default=None, repr=False)  # uint8 (3, H, W)
    seconds: float | None = None  # generation wall clock of this sequence, from its manifest
    meta: dict[str, Any] = field(default_factory=dict, repr=False)

    def frames(self) -> torch.Tensor:
        frames = self.load()
        if frames.ndim != 4 or frames.shape[1] != 3 or frames.dtype != torch.uint8:
            raise ValueError(f"video '{self.source or self.name}' decoded to {tuple(frames.shape)} {frames.dtype}; "
                             "expected uint8 (T, 3, H, W)")
        return frames


# ---------------------------------------------------------------------------------------------- decoding
def _to_rgb(image: Image.Image, background: str = "white") -> np.ndarray:
    if image.mode in ("RGBA", "LA", "PA") or (image.mode == "P" and "transparency" in image.info):
        rgba = image.convert("RGBA")
        base = Image.new("RGBA", rgba.size, (*BACKGROUNDS[background], 255))
        image = Image.alpha_composite(base, rgba)
    return np.asarray(image.convert("RGB"))


def read_image(source: str | Path | bytes, background: str = "white") -> torch.Tensor:
    """An image file (or its bytes) -> uint8 ``(3, H, W)``."""
    with Image.open(io.BytesIO(source) if isinstance(source, bytes) else source) as image:
        return torch.from_numpy(_to_rgb(image, background).copy()).permute(2, 0, 1)


def read_frames(paths: Iterable[Path], background: str = "white") -> torch.Tensor:
    frames = [read_image(p, background) for p in paths]
    if not frames:
        raise ValueError("no frames to read")
    sizes = {tuple(f.shape) for f in frames}
    if len(sizes) > 1:
        raise ValueError(f"frames of one video have different sizes {sorted(sizes)}; first: {next(iter(paths), '')}")
    return torch.stack(frames)


def read_video_file(path: str | Path) -> torch.Tensor:
    """Decode every frame of a video file -> uint8 ``(T, 3, H, W)``."""
    return torch.from_numpy(read_video(path)).permute(0, 3, 1, 2).contiguous()  # (T, H, W, 3) -> (T, 3, H, W)


def write_video_file(path: str | Path, frames: torch.Tensor, fps: int = 8, lossless: bool = True) -> Path:
    """uint8 ``(T, 3, H, W)`` -> an H.264 mp4 (lossless by default: evaluation fixtures must decode exactly)."""
    array = frames.permute(0, 2, 3, 1).contiguous().numpy()  # (T, H, W, 3)
    if lossless:
        return write_video(path, array, fps, "libx264rgb", "rgb24", options={"qp": "0", "preset": "ultrafast"})
    return write_video(path, array, fps, "libx264")


def untile_grid(grid: torch.Tensor, layout: str | GridLayout, frame_count: int | None = None) -> torch.Tensor:
    """A grid image ``(3, H, W)`` -> frames ``(rows*cols, 3, H/rows, W/cols)`` with :meth:`GridLayout.untile`."""
    if not isinstance(layout, GridLayout):
        rows_cols = GridLayout.parse(str(layout), 16)
        layout = GridLayout.from_image_size(rows_cols.rows, rows_cols.cols, grid.shape[-2], grid.shape[-1])
    frames = layout.untile(grid)
    return frames[:frame_count] if frame_count else frames


def _layout_of(meta: dict[str, Any], height: int, width: int) -> GridLayout:
    if "rows" in meta and "cols" in meta:
        return GridLayout.from_image_size(int(meta["rows"]), int(meta["cols"]), height, width)
    spec = str(meta.get("layout", ""))
    rows_cols = GridLayout.parse(spec, 16)
    return GridLayout.from_image_size(rows_cols.rows, rows_cols.cols, height, width)


# ---------------------------------------------------------------------------------------------- listing
def _images(folder: Path) -> list[Path]:
    return sorted((p for p in folder.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES and p.is_file()), key=natural_key)


def _videos(folder: Path) -> list[Path]:
    return sorted((p for p in folder.iterdir() if p.suffix.lower() in VIDEO_SUFFIXES and p.is_file()), key=natural_key)


def _sidecar(path: Path, suffix: str) -> Path | None:
    side = path.with_suffix(suffix)
    return side if side.is_file() else None


def _seconds(manifest: dict[str, Any]) -> float | None:
    for scope in (manifest.get("timing"), manifest):
        if isinstance(scope, dict):
            for key in TIMING_KEYS:
                if isinstance(scope.get(key), int | float):
                    return float(scope[key])
    return None


def _layout_spec(layout: str | None, meta: dict[str, Any]) -> str | None:
    if isinstance(meta.get("layout"), str):
        return meta["layout"]
    if isinstance(meta.get("layout"), dict) and {"rows", "cols"} <= set(meta["layout"]):
        return f"{meta['layout']['rows']}x{meta['layout']['cols']}"
    if "rows" in meta and "cols" in meta:
        return f"{meta['rows']}x{meta['cols']}"
    return layout


def _untile_file(path: Path, layout: str, background: str) -> torch.Tensor:
    return untile_grid(read_image(path, background), layout)


def _grid_item(name: str, path: Path, layout: str, background: str, **kwargs: Any) -> VideoItem:
    return VideoItem(name, partial(_untile_file, path, layout, background), str(path), **kwargs)


def sample_folder_item(folder: Path, layout: str | None = None, background: str = "white") -> VideoItem:
    """One video from a folder: generate output (manifest + frames/mp4/grid) or plain frames."""
    manifest: dict[str, Any] = {}
    if (folder / MANIFEST).is_file():
        manifest = json.loads((folder / MANIFEST).read_text())
    caption = manifest.get("c_content") or manifest.get("prompt") or manifest.get("caption")
    if caption is None and (folder / "prompt.txt").is_file():
        caption = (folder / "prompt.txt").read_text().strip()
    images = _images(folder)
    reference_path = next((p for p in images if p.stem.lower() in REFERENCE_STEMS), None)
    ref_value = manifest.get("reference") or manifest.get("ref")
    if reference_path is None and isinstance(ref_value, str) and (folder / ref_value).is_file():
        reference_path = folder / ref_value
    common: dict[str, Any] = {
        "caption": caption, "seconds": _seconds(manifest), "meta": manifest,
        "reference": (lambda: read_image(reference_path, background)) if reference_path else None,
    }
    frame_dir = next((folder / d for d in ("frames", "views") if (folder / d).is_dir() and _images(folder / d)), None)
    listed = manifest.get("frames")
    if isinstance(listed, list) and listed and all(isinstance(p, str) and (folder / p).is_file() for p in listed):
        paths = [folder / p for p in listed]
    elif frame_dir is not None:
        paths = _images(frame_dir)
    else:
        paths = [p for p in images if re.search(r"\d", p.stem) and p != reference_path]
    if paths:
        return VideoItem(folder.name, lambda: read_frames(paths, background), str(folder), **common)
    videos = _videos(folder)
    if videos:
        return VideoItem(folder.name, lambda: read_video_file(videos[0]), str(videos[0]), **common)
    grids = [p for p in images if p != reference_path]
    spec = _layout_spec(layout, manifest)
    if len(grids) == 1 and spec:
        return _grid_item(folder.name, grids[0], spec, background, **common)
    raise ValueError(f"'{folder}' holds no frames (numbered images or frames/), no video file and no grid image "
                     "with a layout; set eval.layout=<rows>x<cols> for grid images")


def generate_run_items(root: Path, manifest: dict[str, Any], background: str = "white") -> list[VideoItem]:
    """The samples of a ``gridgen.generate`` run: its root ``manifest.json`` lists every sample's files (relative
    to ``root``), prompt, reference and ``timing.sample_s`` (sampling + decoding of one grid, model loading excluded).
    """
    layout = manifest.get("layout") or {}
    items = []
    for sample in manifest["samples"]:
        files = sample.get("files") or {}
        name = str(sample.get("folder") or sample.get("index"))
        listed = files.get("frames") or files.get("views")
        if isinstance(listed, list) and listed:
            paths = [root / p for p in listed]
            missing = [p for p in paths if not p.is_file()]
            if missing:
                raise FileNotFoundError(f"generate run '{root}': sample {name} lists {missing[0]}, which does not exist")
            load = partial(read_frames, paths, background)
        elif files.get("mp4"):
            load = partial(read_video_file, root / files["mp4"])
        elif files.get("grid") and {"rows", "cols"} <= set(layout):
            load = partial(_untile_file, root / files["grid"], f"{layout['rows']}x{layout['cols']}", background)
        else:
            raise ValueError(f"generate run '{root}': sample {name} has no frames, mp4 or grid with a layout")
        ref = sample.get("ref")
        reference = partial(read_image, Path(ref), background) if isinstance(ref, str) and Path(ref).is_file() else None
        timing = sample.get("timing") or {}
        items.append(VideoItem(name, load, str(root / name), caption=sample.get("prompt"), reference=reference,
                               seconds=_seconds({"timing": timing}), meta=sample))
    return items


def _tar_items(path: Path, layout: str | None, background: str) -> list[VideoItem]:
    """WebDataset shard -> one item per sample; members are read by offset when the video is used."""
    groups: dict[str, dict[str, tarfile.TarInfo]] = {}
    with tarfile.open(path) as tar:
        for member in tar:
            match = _TAR_MEMBER.match(member.name)  # webdataset's rule: key up to the first dot of the basename
            if not member.isreg() or match is None or Path(member.name).name.startswith("__"):
                continue
            groups.setdefault(match[1], {})[match[2].lower()] = member

    def read(member: tarfile.TarInfo) -> bytes:
        with path.open("rb") as f:
            f.seek(member.offset_data)
            return f.read(member.size)

    items = []
    for key, members in groups.items():
        image = next((members[e] for e in ("png", "jpg", "jpeg", "webp") if e in members), None)
        if image is None:
            log.warning("shard %s: sample %s has no grid image; skipped", path, key)
            continue
        meta = json.loads(read(members["json"])) if "json" in members else {}
        caption = meta.get("c_content") or (read(members["txt"]).decode().strip() if "txt" in members else None)
        spec = _layout_spec(layout, meta)
        if spec is None:
            raise ValueError(f"shard '{path}' sample '{key}' has no layout (json rows/cols); set eval.layout=<rows>x<cols>")

        def load(image: tarfile.TarInfo = image, spec: str = spec, meta: dict = meta) -> torch.Tensor:
            grid = read_image(read(image), background)
            if "rows" in meta and "cols" in meta and spec == _layout_spec(None, meta):
                from gridgen.data.decoding import layout_from_meta  # the training reader's own check

                return layout_from_meta(meta, grid.shape[-2], grid.shape[-1]).untile(grid)
            return untile_grid(grid, spec)

        items.append(VideoItem(Path(key).name, load, f"{path}:{key}", caption=caption, meta=meta))
    return items


def list_videos(spec: str | Path, layout: str | None = None, background: str = "white") -> list[VideoItem]:
    """Every video under ``spec`` (see the module docstring), in natural name order; frames decoded lazily."""
    if background not in BACKGROUNDS:
        raise ValueError(f"background must be one of {sorted(BACKGROUNDS)}, got {background!r}")
    text = str(spec)
    if "{" in text and ".tar" in text:  # brace pattern of shards
        import webdataset as wds

        return [item for url in wds.shardlists.expand_urls(text) for item in list_videos(url, layout, background)]
    path = Path(text).expanduser()
    if not path.exists():
        raise FileNotFoundError(f"'{path}' does not exist; give a folder of videos (mp4 files or one folder of "
                                "frames per video), WebDataset shards, or a gridgen.generate output folder")
    if path.is_file():
        suffix = path.suffix.lower()
        if suffix == ".tar":
            return _tar_items(path, layout, background)
        if suffix in VIDEO_SUFFIXES:
            return [VideoItem(path.stem, lambda: read_video_file(path), str(path), caption=_caption_sidecar(path))]
        if suffix in IMAGE_SUFFIXES:
            return [_image_as_grid(path, layout, background)]
        raise ValueError(f"cannot read '{path}': not a video ({', '.join(VIDEO_SUFFIXES)}), image or .tar shard")
    shards = sorted(path.glob("*.tar"), key=natural_key)
    if shards:  # before manifest.json: `make prepare` writes one beside its shards, describing them
        return [item for shard in _one_split(path, shards) for item in _tar_items(shard, layout, background)]
    if (path / MANIFEST).is_file():
        manifest = json.loads((path / MANIFEST).read_text())
        if isinstance(manifest.get("samples"), list):
            return generate_run_items(path, manifest, background)
        kinds = sorted(p.parent.name for p in path.glob(f"*/{MANIFEST}") if any(p.parent.glob("*.tar")))
        if kinds:  # the embedded sample data: one prepare output per kind of grid
            raise ValueError(f"'{path}' holds one shard folder per kind of grid ({', '.join(kinds)}); evaluate one: "
                             f"eval.real={path / kinds[0]}")
        return [sample_folder_item(path, layout, background)]
    videos = _videos(path)
    folders = sorted((p for p in path.iterdir() if p.is_dir() and not p.name.startswith(".")), key=natural_key)
    if videos:
        return [VideoItem(v.stem, lambda v=v: read_video_file(v), str(v), caption=_caption_sidecar(v)) for v in videos]
    if folders:
        return [sample_folder_item(f, layout, background) for f in folders]
    images = _images(path)
    if not images:
        raise ValueError(f"'{path}' holds no videos, frame folders, images or shards")
    if layout or any(_sidecar(p, ".json") for p in images):
        return [_image_as_grid(p, layout, background) for p in images]
    return [VideoItem(path.name, lambda: read_frames(images, background), str(path))]  # one video of frames


def _one_split(folder: Path, shards: list[Path]) -> list[Path]:
    """The shards of a folder, refused when they belong to several splits (``train-*.tar`` and ``val-*.tar`` of
    ``make prepare``): a real set is one split, and the message names a brace pattern for each."""
    splits: dict[str, list[str]] = {}
    for shard in shards:
        if match := _SPLIT_SHARD.match(shard.name):
            splits.setdefault(match[1], []).append(match[2])
    if len(splits) < 2:
        return shards
    patterns = {split: f"{split}-{{{numbers[0]}..{numbers[-1]}}}.tar" for split, numbers in sorted(splits.items())}
    listed = ", ".join(f"{pattern} ({len(splits[split])} shards)" for split, pattern in patterns.items())
    last = list(patterns.values())[-1]
    raise ValueError(f"'{folder}' holds the shards of {len(splits)} splits: {listed}; evaluate one split, quoted "
                     f"for the shell: eval.real='{folder}/{last}'")


def _caption_sidecar(path: Path) -> str | None:
    side = _sidecar(path, ".txt")
    return side.read_text().strip() if side else None


def _image_as_grid(path: Path, layout: str | None, background: str) -> VideoItem:
    side = _sidecar(path, ".json")
    meta = json.loads(side.read_text()) if side else {}
    spec = _layout_spec(layout, meta)
    if spec is None:
        raise ValueError(f"grid image '{path}' needs a layout: set eval.layout=<rows>x<cols> or add "
                         f"{path.stem}.json with rows/cols")
    caption = meta.get("c_content") or meta.get("prompt") or _caption_sidecar(path)
    return _grid_item(path.stem, path, spec, background, caption=caption, meta=meta)


def protocol_frames(frames: torch.Tensor, count: int, name: str) -> torch.Tensor:
    """The first ``count`` frames; a shorter video is a user error, never padded."""
    if frames.shape[0] < count:
        raise ValueError(f"video '{name}' has {frames.shape[0]} frames, the protocol needs {count}; "
                         "evaluate with a task whose frames fit (task.frames, eval.frames) or longer videos")
    return frames[:count]
