"""Fixtures of the data tests."""

from __future__ import annotations

from pathlib import Path

import pytest


@pytest.fixture(scope="session")
def root(shards) -> Path:
    """The folder of the ``shards`` fixture: video/ (16 train samples, 4x4 grids) and multiview/ (8, 4x6 grids)."""
    return shards[0]
