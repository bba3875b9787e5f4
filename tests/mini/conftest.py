"""Fixtures of the miniature's tests."""

from __future__ import annotations

import pytest
from hydra import initialize_config_dir

from gridgen.config import CONF_DIR, register_resolvers


@pytest.fixture(scope="module")
def hydra_conf():
    """Hydra initialised on gridgen's configs, as `python -m gridgen.mini` opens it, for `gridgen.mini.steps.compose`."""
    register_resolvers()
    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3", job_name="test"):
        yield
