"""Embedded models and data: everything gridgen makes from a seed so that it runs with no download.

* :mod:`.flux_tiny`: a tiny FLUX.1-dev-shaped diffusers pipeline with random weights (``model.pretrained=
  embedded:tiny``), saved under the cache folder and loaded through the same ``FluxPipeline.from_pretrained``
  as the real model; its tokenizers are learned in code (:mod:`.tokenizers`).
* :mod:`.sample_data`: the sample dataset (``data=sample``): raw mp4 clips of the moving-shapes world
  (:mod:`.world`) and RGBA renders of meshes (:mod:`.render`), prepared into grid shards by ``make prepare``'s
  own path.

The rest of gridgen reaches this wing through two seams only: ``models.loading.resolve_pretrained("embedded:tiny")``
calls :func:`ensure_tiny_flux`, and ``GridDataModule.prepare_data`` (and ``make cache``) calls
:func:`ensure_sample_shards`. Both build into ``$GRIDGEN_CACHE`` (default ``~/.cache/gridgen``) on first use, into
versioned folders (``flux_tiny-v1-seed0``, ``sample-v2-seed0``).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from gridgen.runtime import default_cache_dir

if TYPE_CHECKING:
    from gridgen.embedded.flux_tiny import TINY_FLUX_CONFIG, build_tiny_flux, ensure_tiny_flux
    from gridgen.embedded.sample_data import ensure_sample_shards, write_sample_shards

# Imported on first use, so that asking for the tiny model does not import the sample data's drawing and prepare
# code, and the reverse.
_FLUX_TINY_NAMES = {"TINY_FLUX_CONFIG", "build_tiny_flux", "ensure_tiny_flux"}
_SAMPLE_DATA_NAMES = {"ensure_sample_shards", "write_sample_shards"}

__all__ = [
    "TINY_FLUX_CONFIG",
    "build_tiny_flux",
    "default_cache_dir",
    "ensure_sample_shards",
    "ensure_tiny_flux",
    "write_sample_shards",
]


def __getattr__(name: str) -> Any:
    if name in _FLUX_TINY_NAMES:
        import gridgen.embedded.flux_tiny as flux_tiny

        return getattr(flux_tiny, name)
    if name in _SAMPLE_DATA_NAMES:
        import gridgen.embedded.sample_data as sample_data

        return getattr(sample_data, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
