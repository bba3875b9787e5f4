"""FLUX model loading (local folder, hub cache or the embedded tiny pipeline of :mod:`gridgen.embedded`).

Importing this package is cheap: diffusers/transformers are imported only when a pipeline is built or loaded.
"""

from gridgen.models.loading import (
    ModelNotFoundError,
    load_flux_pipeline,
    looks_local,
    parse_dtype,
    resolve_pretrained,
)

__all__ = [
    "ModelNotFoundError",
    "load_flux_pipeline",
    "looks_local",
    "parse_dtype",
    "resolve_pretrained",
]
