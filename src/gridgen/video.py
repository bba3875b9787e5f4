"""Video files through PyAV: one reader of whole files, one writer, one choice of encoder.

Frames are uint8 ``(T, H, W, 3)`` RGB arrays on both sides. Reading converts every decoded frame to ``rgb24``
(swscale, no resize); the data pipeline's own decoder (``data/sources/video.py``) reads only the frames a grid
needs and resizes them on the way, so it keeps its container loop and uses this module only to write.

Writing: H.264 (``libx264``, ``yuv420p``) plays everywhere; ``libx264rgb`` with ``qp=0`` is lossless (evaluation
fixtures must decode to the very frames written); ``threads=1`` gives the same bytes on every machine (x264's
output depends on its thread count). diffusers' ``export_to_video`` writes through OpenCV/imageio without a codec,
pixel format or rate of our choosing, and ``load_video`` returns PIL images, so neither serves here.
"""

from __future__ import annotations

from collections.abc import Sequence
from fractions import Fraction
from pathlib import Path

import numpy as np

H264_OR_MPEG4 = ("libx264", "mpeg4")  # MPEG-4 part 2 where the FFmpeg build of PyAV has no libx264


def first_encoder(codecs: Sequence[str]) -> str | None:
    """The first of ``codecs`` that this PyAV/FFmpeg build can encode, or None."""
    import av

    return next((codec for codec in codecs if codec in av.codecs_available), None)


def read_video(path: str | Path) -> np.ndarray:
    """Every frame of the first video stream of ``path`` -> uint8 ``(T, H, W, 3)`` RGB.

    A file that does not decode, or holds no frame, is a ``ValueError`` naming it.
    """
    import av

    try:
        with av.open(str(path)) as container:
            frames = [frame.to_ndarray(format="rgb24") for frame in container.decode(video=0)]
    except (av.error.FFmpegError, IndexError) as err:
        raise ValueError(f"cannot decode video '{path}': {err}") from err
    if not frames:
        raise ValueError(f"video '{path}' has no frames")
    return np.stack(frames)  # (T, H, W, 3)


def write_video(path: str | Path, frames: np.ndarray, fps: float = 8, codec: str = "libx264",
                pix_fmt: str = "yuv420p", options: dict[str, str] | None = None, bit_rate: int | None = None,
                threads: int | None = None) -> Path:
    """Write uint8 ``frames (T, H, W, 3)`` RGB to ``path`` (the container from its suffix; H and W even for
    ``yuv420p``). ``options`` are the encoder's (``crf``, ``preset``, ``qp``); ``threads=None`` leaves FFmpeg's
    choice."""
    import av

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    _, height, width, _ = frames.shape
    with av.open(str(path), mode="w") as container:
        stream = container.add_stream(codec, rate=Fraction(fps).limit_denominator(1000))
        stream.width, stream.height, stream.pix_fmt = int(width), int(height), pix_fmt
        stream.options = dict(options or {})
        if bit_rate is not None:
            stream.bit_rate = int(bit_rate)
        if threads is not None:
            stream.codec_context.thread_count = int(threads)
        for frame in frames:
            container.mux(stream.encode(av.VideoFrame.from_ndarray(np.ascontiguousarray(frame), format="rgb24")))
        container.mux(stream.encode())  # flush the encoder's delayed frames
    return path
