"""Omni inference (paper 2.4, A.5-A.7): one grid sampler for text/image-to-video, interpolation, multi-view and
editing, task recipes that build the initial grid and mask, and export of frames, videos and cameras.

``gridgen.generate`` (``python -m gridgen.generate``) composes these from ``conf/generate.yaml``.
"""

from gridgen.inference.export import (
    export_sample,
    to_uint8,
    write_gif,
    write_mp4,
)
from gridgen.inference.sampler import (
    GridSampler,
    TextConditioning,
    flux_schedule,
    initial_noise,
    sample_grid,
)
from gridgen.inference.tasks import (
    SampleRequest,
    TaskSpec,
    initial_frames,
    keep_tokens,
    read_requests,
    reference_frames,
    resolve_layout,
)

__all__ = [
    "GridSampler",
    "SampleRequest",
    "TaskSpec",
    "TextConditioning",
    "export_sample",
    "flux_schedule",
    "initial_frames",
    "initial_noise",
    "keep_tokens",
    "read_requests",
    "reference_frames",
    "resolve_layout",
    "sample_grid",
    "to_uint8",
    "write_gif",
    "write_mp4",
]
