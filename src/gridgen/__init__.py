"""gridgen: GRID (grid-layout omni visual generation) on FLUX with PyTorch Lightning and Hydra."""

from importlib.metadata import PackageNotFoundError
from importlib.metadata import version as _version

from gridgen._quiet import quiet_optional_imports

quiet_optional_imports()

try:
    __version__ = _version("gridgen")
except PackageNotFoundError:  # imported from a source tree (PYTHONPATH=src) that was never pip-installed
    __version__ = "0.1.0+src"
