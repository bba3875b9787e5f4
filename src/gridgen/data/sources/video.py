"""Video files (mp4 / webm / mov / avi) decoded with PyAV, captions from a WebVid-style CSV or sidecar files.

WebVid ships ``results_*.csv`` with ``videoid, contentUrl, duration, page_dir, name`` (``name`` is the
caption); downloaded clips usually live at ``<root>/<page_dir>/<videoid>.mp4``. ``prepare.src`` is either that
CSV (video paths relative to its folder, or to ``data.source.video_root``) or a folder of videos, each with an
optional sidecar caption ``<stem>.txt``.

Decoding is sequential (no seeking: WebVid clips are ~18 s) and only the frames a grid uses are converted to
RGB, resized by FFmpeg's swscale straight to the size that covers the cell, and centre-cropped.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from pathlib import Path

import av
import numpy as np
from av.video.reformatter import VideoReformatter

from gridgen import video
from gridgen.data.sources.base import (
    Clip,
    FrameSampling,
    IgnoredFiles,
    RawItem,
    SkipInput,
    check_frame_sizes,
    read_table,
    sidecar_caption,
)
from gridgen.data.tiling import center_crop, cover_size
from gridgen.files import natural_key

log = logging.getLogger(__name__)

VIDEO_EXTENSIONS = (".mp4", ".webm", ".mov", ".avi", ".mkv", ".m4v")
INTERPOLATION = "AREA"  # swscale filter for the resize to the cover size: area averaging, right for shrinking


def probe(container: av.container.InputContainer) -> tuple[int, float | None]:
    """Frame count and frame rate of the first video stream (counting packets if the header has no count)."""
    stream = container.streams.video[0]
    rate = stream.average_rate or stream.guessed_rate
    fps = float(rate) if rate else None
    count = int(stream.frames or 0)
    if count <= 0:  # webm / some avi: no count in the header; demuxing without decoding is cheap
        count = sum(1 for packet in container.demux(stream) if packet.size)
        container.seek(0)
    return count, fps


def decode_frames(container: av.container.InputContainer, wanted: Sequence[int], cell_height: int,
                  cell_width: int, resize_mismatched: bool = False, where: str = "video"
                  ) -> tuple[dict[int, np.ndarray], int]:
    """Decode the first video stream up to ``max(wanted)``; the wanted frames fitted to the cell, by index, and
    how many of them had another size than the first (a stream that changes size mid-way: see
    :func:`~gridgen.data.sources.base.check_frame_sizes`)."""
    stream = container.streams.video[0]
    targets = set(wanted)
    last = max(targets)
    out: dict[int, np.ndarray] = {}
    sizes: list[tuple[str, tuple[int, int]]] = []
    reformatter = VideoReformatter()  # one swscale context for the clip, not one per frame
    for index, frame in enumerate(container.decode(stream)):
        if index in targets:
            sizes.append((f"frame {index}", (frame.height, frame.width)))
            size = cover_size(frame.height, frame.width, cell_height, cell_width)  # each frame's own aspect
            rgb = reformatter.reformat(frame, width=size[1], height=size[0], format="rgb24",
                                       interpolation=INTERPOLATION).to_ndarray()
            out[index] = center_crop(rgb, cell_height, cell_width)
        if index >= last:
            break
    odd = check_frame_sizes(sizes, where, resize_mismatched)
    return out, odd


class VideoSource:
    """Video files listed by a CSV (WebVid) or found in a folder."""

    kind = "video"

    def __init__(self, src: str | Path, *, csv: str | None = None, video_root: str | None = None,
                 id_column: str = "videoid", caption_column: str | None = "name",
                 path_templates: Sequence[str] = ("{page_dir}/{videoid}.mp4", "{videoid}.mp4"),
                 extensions: Sequence[str] = VIDEO_EXTENSIONS, default_caption: str | None = None,
                 fps: float | None = None, resize_mismatched: bool = False) -> None:
        self.src = Path(src).expanduser()
        self.resize_mismatched = bool(resize_mismatched)
        self.ignored = IgnoredFiles()  # folder mode: files under src that are neither videos nor their captions
        self.csv = Path(csv).expanduser() if csv else (self.src if self.src.suffix.lower() == ".csv" else None)
        if self.csv is not None and not self.csv.is_absolute() and self.src.is_dir():
            self.csv = self.src / self.csv  # a relative data.source.csv is relative to prepare.src
        self.video_root = Path(video_root).expanduser() if video_root else (
            self.csv.parent if self.csv is not None and self.src.suffix.lower() == ".csv" else self.src)
        self.id_column = id_column
        self.caption_column = caption_column
        self.path_templates = list(path_templates)
        self.extensions = tuple(e.lower() if e.startswith(".") else f".{e.lower()}" for e in extensions)
        self.default_caption = default_caption
        self.fps = fps  # override for files whose header rate is wrong
        self.duplicates = 0

    # ---- listing ----------------------------------------------------------------------------------
    def items(self) -> list[RawItem]:
        if self.csv is not None:
            return self._from_table()
        if not self.src.is_dir():
            raise FileNotFoundError(f"prepare.src '{self.src}' is neither a folder of videos nor a CSV file")
        files = sorted((p for p in self.src.rglob("*") if p.suffix.lower() in self.extensions and p.is_file()),
                       key=lambda p: natural_key(str(p.relative_to(self.src))))
        if not files:
            raise FileNotFoundError(f"no videos ({', '.join(self.extensions)}) under '{self.src}'; point "
                                    "prepare.src at a folder of videos or a WebVid-style CSV")
        items = []
        for path in files:
            caption = sidecar_caption(path.with_suffix(".txt")) or self.default_caption
            item_id = str(path.relative_to(self.src).with_suffix(""))
            items.append(RawItem(item_id, str(path), caption))
        used = {str(p) for p in files} | {str(p.with_suffix(".txt")) for p in files}
        self.ignored = IgnoredFiles.scan(self.src, lambda p: str(p) in used)
        return items

    def _from_table(self) -> list[RawItem]:
        rows = read_table(self.csv, self.id_column, self.caption_column)
        items, seen = [], set()
        for row in rows:
            item_id = (row.get(self.id_column) or "").strip()
            if not item_id or item_id in seen:
                self.duplicates += 1
                continue
            seen.add(item_id)
            candidates = []
            for template in self.path_templates:
                try:
                    candidates.append(self.video_root / template.format(**row))
                except KeyError:  # a template naming a column this table lacks
                    continue
            path = next((p for p in candidates if p.is_file()), candidates[0] if candidates else
                        self.video_root / item_id)
            caption = (row.get(self.caption_column) or "").strip() if self.caption_column else ""
            metadata = {k: v for k, v in row.items() if k not in (self.id_column, self.caption_column) and k}
            items.append(RawItem(item_id, str(path), caption or self.default_caption, metadata))
        return items

    # ---- loading ----------------------------------------------------------------------------------
    def load(self, item: RawItem, cell_height: int, cell_width: int, frames_per_grid: int,
             sampling: FrameSampling, rng: np.random.Generator) -> list[Clip]:
        path = Path(item.path)
        if not path.is_file():
            raise SkipInput("missing_file", str(path))
        try:
            with av.open(str(path)) as container:
                if not container.streams.video:
                    raise SkipInput("unreadable", f"{path}: no video stream")
                count, fps = probe(container)
                fps = self.fps or fps
                windows, grid_fps = sampling.windows(count, frames_per_grid, fps, rng)
                if not windows:
                    raise SkipInput("too_short", f"{path}: {count} frames")
                wanted = sorted({i for window in windows for i in window})
                frames, odd = decode_frames(container, wanted, cell_height, cell_width, self.resize_mismatched,
                                            where=str(path))
        except SkipInput:
            raise
        except (av.FFmpegError, OSError, ValueError, IndexError, ZeroDivisionError) as exn:
            raise SkipInput("unreadable", f"{path}: {exn}") from exn
        if len(frames) < len(wanted):  # header promised more frames than the stream holds
            raise SkipInput("too_short", f"{path}: decoded {len(frames)} of the {len(wanted)} frames needed")
        return [Clip([frames[i] for i in window], window, grid_fps, resized_mismatched=odd) for window in windows]


def write_video(path: str | Path, frames: np.ndarray, fps: float = 8, codec: str = "libx264",
                options: dict[str, str] | None = None) -> Path:
    """A data set's clip ``frames (T, H, W, 3)`` uint8 (H and W even for yuv420p): with one x264 thread, the same
    frames give the same bytes on every machine."""
    return video.write_video(path, frames, fps, codec, options=options, threads=1 if codec == "libx264" else None)
