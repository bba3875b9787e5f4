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

from gridgen.embedded.cache_dir import default_cache_dir
from gridgen.embedded.flux_tiny import TINY_FLUX_CONFIG, build_tiny_flux, ensure_tiny_flux
from gridgen.embedded.sample_data import ensure_sample_shards, write_sample_shards

__all__ = [
    "TINY_FLUX_CONFIG",
    "build_tiny_flux",
    "default_cache_dir",
    "ensure_sample_shards",
    "ensure_tiny_flux",
    "write_sample_shards",
]
