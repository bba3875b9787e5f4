"""Raw data sources for ``make prepare``: video files, frame folders, multi-view renders.

``build_source(source_cfg, src)`` picks the class by ``source_cfg["kind"]`` and passes the other keys on.
Every source has ``kind`` (caption kind: video | multiview), ``items() -> list[RawItem]`` (deterministic,
reads no pixels) and ``load(item, cell_height, cell_width, frames_per_grid, sampling, rng) -> list[Clip]``.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from gridgen.data.sources.base import (
    Clip,
    FrameSampling,
    IgnoredFiles,
    RawItem,
    SkipInput,
    check_frame_sizes,
    safe_key,
)
from gridgen.data.sources.frames import FrameFolderSource
from gridgen.data.sources.multiview import MultiViewSource
from gridgen.data.sources.video import VideoSource, write_video

SOURCES = {"video": VideoSource, "frames": FrameFolderSource, "multiview": MultiViewSource}

__all__ = [
    "SOURCES", "Clip", "FrameFolderSource", "FrameSampling", "IgnoredFiles", "MultiViewSource", "RawItem", "SkipInput",
    "VideoSource", "build_source", "check_frame_sizes", "safe_key",
    "write_video",
]


def build_source(source_cfg: dict[str, Any], src: str | Path, resize_mismatched: bool = False):
    """The source named by ``source_cfg["kind"]`` reading ``src``; a missing ``src`` is a one-line error.
    ``resize_mismatched``: fit a frame of another size than its sample's others instead of skipping the sample."""
    cfg = dict(source_cfg)
    kind = cfg.pop("kind", None)
    if kind not in SOURCES:
        raise ValueError(f"data.source.kind must be one of {sorted(SOURCES)}, got {kind!r}")
    if src in (None, "", "???"):
        raise ValueError("prepare.src is not set; give the raw data: prepare.src=<folder or csv>")
    path = Path(str(src)).expanduser()
    if not path.exists():
        raise FileNotFoundError(f"prepare.src '{path}' does not exist; point it at the raw {kind} data "
                                "(a folder, or a WebVid-style CSV for videos)")
    return SOURCES[kind](path, resize_mismatched=resize_mismatched, **cfg)
