"""Frame folders: one folder of numbered images per clip (TikTok dataset, GRID's ``multi_frame{k}.png``).

``prepare.src`` is a folder; every folder below it that holds images (or, with ``data.source.frames_subdir``,
whose ``<subdir>/`` holds them, like TikTok's ``00001/images/0001.png``) is one clip. Frames are ordered by
the numbers in their names (``multi_frame2.png`` before ``multi_frame10.png``). Captions come from a CSV
(``data.source.csv``: id and caption columns), a sidecar ``caption.txt`` inside the clip folder or
``<clip>.txt`` beside it, else ``data.source.default_caption``.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path

import numpy as np
from PIL import Image, UnidentifiedImageError

from gridgen.data.sources.base import (
    IMAGE_EXTENSIONS,
    Clip,
    FrameSampling,
    IgnoredFiles,
    RawItem,
    SkipInput,
    check_frame_sizes,
    list_images,
    read_table,
    sidecar_caption,
)
from gridgen.data.tiling import fit_to_cell, parse_color, to_rgb
from gridgen.files import natural_key


def find_clip_folders(src: Path, frames_subdir: str | None = None) -> list[tuple[str, Path, Path]]:
    """``(id, clip folder, image folder)`` of every clip under ``src`` (``src`` itself may be one), sorted."""
    if not src.is_dir():
        raise FileNotFoundError(f"prepare.src '{src}' is not a folder; point it at a folder of frame folders")
    found = []
    for dirpath, dirnames, filenames in os.walk(src):
        dirnames.sort(key=natural_key)
        folder = Path(dirpath)
        if not any(Path(name).suffix.lower() in IMAGE_EXTENSIONS for name in filenames):
            continue
        if frames_subdir:
            if folder.name != frames_subdir:
                continue
            clip = folder.parent
        else:
            clip = folder
        rel = clip.relative_to(src)
        item_id = clip.name if rel == Path(".") else str(rel)
        found.append((item_id, clip, folder))
    return sorted(found, key=lambda entry: natural_key(entry[0]))


class FrameFolderSource:
    """Clips stored as folders of numbered frames."""

    kind = "video"

    def __init__(self, src: str | Path, *, frames_subdir: str | None = None, csv: str | None = None,
                 id_column: str = "id", caption_column: str | None = "caption",
                 default_caption: str | None = None, fps: float | None = None,
                 background: str | Sequence[int] = "black", resize_mismatched: bool = False) -> None:
        self.src = Path(src).expanduser()
        self.resize_mismatched = bool(resize_mismatched)  # fit frames of an odd size instead of skipping the clip
        self.ignored = IgnoredFiles()  # files under src that items() did not use
        self.frames_subdir = frames_subdir
        self.csv = Path(csv).expanduser() if csv else None
        self.id_column = id_column
        self.caption_column = caption_column
        self.default_caption = default_caption
        self.fps = fps
        self.background = parse_color(background)

    def _csv_path(self) -> Path | None:
        """``data.source.csv``; a relative one is relative to ``prepare.src``."""
        if self.csv is None:
            return None
        return self.csv if self.csv.is_absolute() else self.src / self.csv

    def _table(self) -> dict[str, dict[str, str]]:
        """CSV rows by id."""
        path = self._csv_path()
        if path is None:
            return {}
        rows = read_table(path, self.id_column, self.caption_column)
        return {row[self.id_column].strip(): row for row in rows}

    def items(self) -> list[RawItem]:
        folders = find_clip_folders(self.src, self.frames_subdir)
        if not folders:
            where = f"'{self.frames_subdir}/' subfolders" if self.frames_subdir else "folders"
            raise FileNotFoundError(f"no {where} of images ({', '.join(IMAGE_EXTENSIONS)}) under '{self.src}'")
        table = self._table()
        items = []
        for item_id, clip, images in folders:
            row = table.get(item_id, {})
            caption = (row.get(self.caption_column) or "").strip() if self.caption_column else ""
            caption = caption or sidecar_caption(clip / "caption.txt", clip.with_suffix(".txt")) or self.default_caption
            metadata = {k: v for k, v in row.items() if k and k not in (self.id_column, self.caption_column)}
            items.append(RawItem(item_id, str(images), caption, metadata))
        self.ignored = self._ignored(folders)
        return items

    def _ignored(self, folders: list[tuple[str, Path, Path]]) -> IgnoredFiles:
        """Files under ``src`` that are neither a frame of a clip, nor a caption file, nor the CSV."""
        frame_dirs = {str(images) for _, _, images in folders}
        captions = {str(clip / "caption.txt") for _, clip, _ in folders} | {
            str(clip.with_suffix(".txt")) for _, clip, _ in folders}
        csv_path = self._csv_path()
        if csv_path is not None:
            captions.add(str(csv_path))

        def used(path: Path) -> bool:
            return (str(path.parent) in frame_dirs and path.suffix.lower() in IMAGE_EXTENSIONS) or str(path) in captions

        return IgnoredFiles.scan(self.src, used)

    def size(self, path: Path) -> tuple[int, int]:
        """``(height, width)`` of an image from its header (no decoding)."""
        try:
            with Image.open(path) as image:
                return image.height, image.width
        except (OSError, UnidentifiedImageError, ValueError) as exn:
            raise SkipInput("unreadable", f"{path}: {exn}") from exn

    def read(self, path: Path, cell_height: int, cell_width: int) -> np.ndarray:
        try:
            with Image.open(path) as image:
                rgb = to_rgb(image, self.background)
        except (OSError, UnidentifiedImageError, ValueError) as exn:
            raise SkipInput("unreadable", f"{path}: {exn}") from exn
        return fit_to_cell(rgb, cell_height, cell_width)

    @staticmethod
    def images(item: RawItem) -> tuple[Path, list[Path]]:
        """The item's folder and its images in natural order (``SkipInput("missing_file")`` without the folder)."""
        folder = Path(item.path)
        if not folder.is_dir():
            raise SkipInput("missing_file", str(folder))
        return folder, list_images(folder)

    def load(self, item: RawItem, cell_height: int, cell_width: int, frames_per_grid: int,
             sampling: FrameSampling, rng: np.random.Generator) -> list[Clip]:
        folder, files = self.images(item)
        windows, fps = sampling.windows(len(files), frames_per_grid, self.fps, rng)
        if not windows:
            raise SkipInput("too_short", f"{folder}: {len(files)} frames")
        cache: dict[int, np.ndarray] = {}
        clips = []
        for window in windows:
            odd = check_frame_sizes([(files[i].name, self.size(files[i])) for i in window], str(folder),
                                    self.resize_mismatched)  # before decoding anything
            for i in window:
                if i not in cache:
                    cache[i] = self.read(files[i], cell_height, cell_width)
            clips.append(Clip([cache[i] for i in window], window, fps, resized_mismatched=odd))
        return clips
