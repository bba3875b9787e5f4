"""Fixtures of the embedded-wing tests."""

from __future__ import annotations

from pathlib import Path

import pytest


@pytest.fixture(scope="session")
def pipe(tiny_dir: Path):
    """The tiny pipeline of the ``tiny_dir`` fixture, loaded."""
    from gridgen.models.loading import load_flux_pipeline

    return load_flux_pipeline(tiny_dir)
