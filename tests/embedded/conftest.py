"""Fixtures of the embedded-wing tests."""

from __future__ import annotations

from pathlib import Path

import pytest


@pytest.fixture(scope="session")
def pipe(tiny_dir: Path):
    """The tiny pipeline of the ``tiny_dir`` fixture, loaded."""
    from gridgen.models.loading import load_flux_pipeline

    return load_flux_pipeline(tiny_dir)


@pytest.fixture(scope="session")
def mini_data(tmp_path_factory):
    """The miniature world's shards at a toy size (1 % of the card's counts), through prepare."""
    from gridgen.embedded.mini_data import write_mini_data

    out = tmp_path_factory.mktemp("mini") / "data"
    return out, write_mini_data(out, scale=0.01)
