"""The one default cache folder of the embedded pipeline and sample data: ``$GRIDGEN_CACHE`` or ``~/.cache/gridgen``."""

from __future__ import annotations

import os
from pathlib import Path


def default_cache_dir() -> Path:
    """``$GRIDGEN_CACHE`` if set, else ``~/.cache/gridgen``."""
    return Path(os.environ.get("GRIDGEN_CACHE") or Path.home() / ".cache" / "gridgen").expanduser()
