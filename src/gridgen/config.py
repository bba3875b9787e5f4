"""Where the Hydra configs live, OmegaConf resolvers, and which exceptions count as user errors."""

from __future__ import annotations

import os
from pathlib import Path

from omegaconf import OmegaConf

from gridgen.models.loading import ModelNotFoundError
from gridgen.models.lora import LoraFileError

# conf/ sits at the repository root (src/gridgen/config.py -> ../../conf); GRIDGEN_CONF overrides it.
CONF_DIR = Path(os.environ.get("GRIDGEN_CONF", Path(__file__).resolve().parents[2] / "conf"))

# Errors caused by what the user asked for: entry points print them as one line and exit non-zero.
USER_ERRORS = (ValueError, FileNotFoundError, ModelNotFoundError, LoraFileError)


def _sample_data(cache_dir: str, subset: str) -> str:
    from gridgen.data.sample import ensure_sample_shards

    folder = Path(ensure_sample_shards(cache_dir)) / subset
    if not folder.is_dir():
        raise FileNotFoundError(f"embedded sample data has no subset '{subset}' (have: video, multiview)")
    return str(folder)


def register_resolvers() -> None:
    if not OmegaConf.has_resolver("gridgen_sample_data"):
        OmegaConf.register_new_resolver("gridgen_sample_data", _sample_data)
