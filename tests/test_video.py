"""gridgen.video: one reader, one writer, one encoder choice (PyAV)."""

from __future__ import annotations

from fractions import Fraction

import av
import numpy as np
import pytest

from gridgen.video import H264_OR_MPEG4, first_encoder, read_video, write_video


def clip(t: int = 6, h: int = 32, w: int = 48, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (t, h, w, 3), dtype=np.uint8)  # (T, H, W, 3)


def test_lossless_round_trip_keeps_every_frame(tmp_path):
    frames = clip()
    path = write_video(tmp_path / "sub" / "a.mp4", frames, 8, "libx264rgb", "rgb24",
                       options={"qp": "0", "preset": "ultrafast"})
    np.testing.assert_array_equal(read_video(path), frames)
    with av.open(str(path)) as container:
        stream = container.streams.video[0]
        assert stream.codec_context.name == "h264"  # libx264rgb writes H.264 (RGB, lossless)
        assert stream.average_rate == 8 and stream.frames == 6


def smooth_clip(t: int = 5, h: int = 32, w: int = 48) -> np.ndarray:
    """A gradient that moves one pixel a frame: what a lossy codec keeps well."""
    y, x = np.mgrid[0:h, 0:w]
    return np.stack([np.stack([(x + k) * 4 % 256, y * 6, np.full_like(x, 128)], -1) for k in range(t)]).astype(np.uint8)


def test_h264_stream_codec_rate_and_size(tmp_path):
    frames = smooth_clip()
    path = write_video(tmp_path / "b.mp4", frames, 7.5, options={"crf": "18", "preset": "ultrafast"}, threads=1)
    decoded = read_video(path)
    assert decoded.shape == frames.shape and decoded.dtype == np.uint8
    assert np.abs(decoded.astype(int) - frames.astype(int)).mean() < 4  # lossy, but the same pictures
    with av.open(str(path)) as container:
        stream = container.streams.video[0]
        assert stream.codec_context.name == "h264" and stream.codec_context.pix_fmt == "yuv420p"
        assert stream.average_rate == Fraction(15, 2)
    again = write_video(tmp_path / "c.mp4", frames, 7.5, options={"crf": "18", "preset": "ultrafast"}, threads=1)
    assert again.read_bytes() == path.read_bytes()  # one encoder thread: the same bytes every time


def test_first_encoder():
    assert first_encoder(H264_OR_MPEG4) in H264_OR_MPEG4
    assert first_encoder(("no-such-encoder", "mpeg4")) == "mpeg4"
    assert first_encoder(("no-such-encoder",)) is None


def test_unreadable_or_empty_video_is_one_value_error(tmp_path):
    bad = tmp_path / "bad.mp4"
    bad.write_bytes(b"not a video")
    with pytest.raises(ValueError, match=r"^cannot decode video '.*bad\.mp4'"):
        read_video(bad)
