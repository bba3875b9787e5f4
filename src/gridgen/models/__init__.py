"""FLUX model loading (local folder, hub cache or the embedded tiny pipeline) and the tiny test pipeline.

Importing this package is cheap: diffusers/transformers are imported only when a pipeline is built or loaded.
"""

from gridgen.models.loading import (
    ModelNotFoundError,
    load_flux_pipeline,
    looks_local,
    parse_dtype,
    resolve_pretrained,
)
from gridgen.models.tiny import TINY_FLUX_CONFIG, build_tiny_flux, ensure_tiny_flux

__all__ = [
    "TINY_FLUX_CONFIG",
    "ModelNotFoundError",
    "build_tiny_flux",
    "ensure_tiny_flux",
    "load_flux_pipeline",
    "looks_local",
    "parse_dtype",
    "resolve_pretrained",
]
