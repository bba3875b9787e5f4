"""What every source shares: raw items, clips, skip reasons, frame sampling and caption tables.

A *source* turns a folder or a metadata table into a deterministic list of :class:`RawItem` (cheap: no
pixels are read), and one item into zero or more :class:`Clip` (one grid's worth of fitted frames each).
An input that cannot become a grid raises :class:`SkipInput` with a short reason (``too_short``,
``unreadable``, ``size_mismatch``, ...); prepare counts reasons in the manifest and goes on. Files under
``prepare.src`` that a source does not use (another extension, images outside the frame folders) are counted
as :class:`IgnoredFiles`, so a silently dropped part of a dataset shows in the manifest.
"""

from __future__ import annotations

import csv
import math
import os
import re
from collections import Counter
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from gridgen.files import natural_key

IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".webp", ".bmp")


class SkipInput(Exception):
    """This input cannot become a grid; ``reason`` is the manifest's counter name."""

    def __init__(self, reason: str, detail: str = "") -> None:
        super().__init__(f"{reason}: {detail}" if detail else reason)
        self.reason = reason
        self.detail = detail


@dataclass(frozen=True)
class RawItem:
    """One raw input: a video file, a frame folder or a multi-view object folder."""

    id: str
    path: str
    caption: str | None = None
    metadata: dict[str, Any] = field(default_factory=dict)


@dataclass
class Clip:
    """One grid's worth of frames, already fitted to the cell: ``frames[k]`` is ``(cell_h, cell_w, 3)`` uint8."""

    frames: list[np.ndarray]
    frame_indices: list[int]
    fps: float | None = None
    extra: dict[str, Any] = field(default_factory=dict)  # e.g. cameras of multi-view renders
    resized_mismatched: int = 0  # frames of another size than the others, fitted anyway (prepare.resize_mismatched)


def safe_key(text: str) -> str:
    """A webdataset key from an id: no dots (they start the extension), no slashes, no spaces."""
    return re.sub(r"[^A-Za-z0-9_-]+", "_", text).strip("_") or "item"


def list_images(folder: Path) -> list[Path]:
    return sorted((p for p in folder.iterdir() if p.suffix.lower() in IMAGE_EXTENSIONS and p.is_file()),
                  key=lambda p: natural_key(p.name))


def check_frame_sizes(sizes: Sequence[tuple[str, tuple[int, int]]], where: str, resize_mismatched: bool) -> int:
    """How many frames of one sample differ in ``(height, width)`` from the most common size.

    Frames of one clip or views of one object share a size; one that does not (a 100x80 view among 256x256
    renders) is doubtful input: ``SkipInput("size_mismatch")``, or, with ``prepare.resize_mismatched=true``, fitted
    to the cell like the others and counted. ``sizes`` holds ``(frame name, (height, width))``.
    """
    if not sizes:
        return 0
    common = Counter(size for _, size in sizes).most_common(1)[0][0]
    odd = [(name, size) for name, size in sizes if size != common]
    if odd and not resize_mismatched:
        name, (h, w) = odd[0]
        raise SkipInput("size_mismatch", f"{where}: {name} is {w}x{h} px, the other frames {common[1]}x{common[0]} px "
                        f"({len(odd)} of {len(sizes)} differ); prepare.resize_mismatched=true fits them anyway")
    return len(odd)


@dataclass
class IgnoredFiles:
    """Files under ``prepare.src`` that a source did not use: a count, by extension, and a few examples."""

    count: int = 0
    by_extension: dict[str, int] = field(default_factory=dict)
    examples: list[str] = field(default_factory=list)

    @classmethod
    def scan(cls, root: Path, used: Callable[[Path], bool], max_examples: int = 5) -> IgnoredFiles:
        """Every regular file under ``root`` for which ``used(path)`` is false."""
        ignored = cls()
        for dirpath, dirnames, filenames in os.walk(root):
            dirnames.sort()
            for name in sorted(filenames):
                path = Path(dirpath) / name
                if used(path) or not path.is_file():
                    continue
                ignored.count += 1
                extension = path.suffix.lower() or "(none)"
                ignored.by_extension[extension] = ignored.by_extension.get(extension, 0) + 1
                if len(ignored.examples) < max_examples:
                    ignored.examples.append(str(path.relative_to(root)))
        return ignored

    def to_dict(self) -> dict[str, Any]:
        return {"count": self.count, "by_extension": dict(sorted(self.by_extension.items())),
                "examples": list(self.examples)}


# ---- frame sampling -------------------------------------------------------------------------------


@dataclass(frozen=True)
class FrameSampling:
    """Which source frames make a grid of ``frames_per_grid`` cells.

    Consecutive cells are ``step`` source frames apart: ``stride`` frames, or ``source_fps / fps`` for a
    target ``fps`` (never below 1: a grid does not repeat frames). A window covers
    ``L = floor((F - 1) * step) + 1`` source frames. Up to ``grids_per_clip`` non-overlapping windows are taken
    from one clip; ``start="random"`` spreads the leftover frames as random gaps (seeded), an integer starts
    the first window at that frame and packs the others right after it. A clip shorter than one window gives
    no grid (``too_short``).
    """

    stride: int | None = None
    fps: float | None = None
    start: str | int = "random"
    grids_per_clip: int = 1

    def __post_init__(self) -> None:
        if self.stride is not None and self.fps is not None:
            raise ValueError(f"set data.sampling.stride or data.sampling.fps, not both (got stride={self.stride}, "
                             f"fps={self.fps}); set the other one to null, e.g. data.sampling.fps=null")
        if self.stride is not None and (not isinstance(self.stride, int) or self.stride < 1):
            raise ValueError(f"data.sampling.stride must be a positive integer, got {self.stride!r}")
        if self.fps is not None and not self.fps > 0:
            raise ValueError(f"data.sampling.fps must be positive, got {self.fps!r}")
        if not (self.start == "random" or (isinstance(self.start, int) and self.start >= 0)):
            raise ValueError(f"data.sampling.start must be 'random' or a frame index >= 0, got {self.start!r}")
        if not isinstance(self.grids_per_clip, int) or self.grids_per_clip < 1:
            raise ValueError(f"data.sampling.grids_per_clip must be a positive integer, got {self.grids_per_clip!r}")

    def step(self, source_fps: float | None) -> float:
        if self.fps is None:
            return float(self.stride or 1)
        if not source_fps:
            raise ValueError("data.sampling.fps needs the source frame rate; set data.source.fps "
                             "(frame folders) or use data.sampling.stride")
        return max(1.0, source_fps / self.fps)

    def windows(self, num_frames: int, frames_per_grid: int, source_fps: float | None,
                rng: np.random.Generator) -> tuple[list[list[int]], float | None]:
        """Frame indices of each grid taken from a clip of ``num_frames`` frames, and their frame rate."""
        step = self.step(source_fps)
        length = math.floor((frames_per_grid - 1) * step) + 1  # source frames covered by one window
        first = 0 if self.start == "random" else int(self.start)
        count = min(self.grids_per_clip, max(0, num_frames - first) // length)
        if count == 0:
            return [], None
        if self.start == "random":
            slack = num_frames - count * length
            gaps = np.sort(rng.integers(0, slack + 1, size=count))  # sorted offsets: uniform gap split
            starts = [int(gaps[j]) + j * length for j in range(count)]
        else:
            starts = [first + j * length for j in range(count)]
        windows = [[start + math.floor(i * step + 1e-9) for i in range(frames_per_grid)] for start in starts]
        return windows, (source_fps / step if source_fps else None)


# ---- caption tables -------------------------------------------------------------------------------


def read_table(path: Path, id_column: str, caption_column: str | None,
               required: Iterable[str] = ()) -> list[dict[str, str]]:
    """Rows of a CSV metadata table (WebVid: ``videoid, name, page_dir, duration, contentUrl``).

    A missing id or caption column is a user error, named with the columns that are there.
    """
    if not path.is_file():
        raise FileNotFoundError(f"metadata table '{path}' does not exist; set data.source.csv to a CSV file")
    with path.open(newline="", encoding="utf-8") as handle:
        reader = csv.DictReader(handle)
        columns = list(reader.fieldnames or [])
        for role, column in (("id", id_column), ("caption", caption_column), *(("", c) for c in required)):
            if column is not None and column not in columns:
                key = {"id": "data.source.id_column", "caption": "data.source.caption_column"}.get(role)
                fix = f"; set {key}=<column>" if key else ""
                raise ValueError(
                    f"CSV '{path}' has no {role + ' ' if role else ''}column '{column}' "
                    f"(columns: {', '.join(columns) or 'none'}){fix}"
                )
        return [dict(row) for row in reader]


def sidecar_caption(*candidates: Path) -> str | None:
    """The first existing, non-empty caption file among ``candidates``."""
    for path in candidates:
        if path.is_file():
            text = path.read_text(encoding="utf-8").strip()
            if text:
                return text
    return None
