"""Where things are: the checkout, this folder (scripts that tests run), the shared data beside the checkout."""

from __future__ import annotations

from pathlib import Path

HELPERS = Path(__file__).resolve().parent
ROOT = HELPERS.parents[1]  # the checkout: README.md, Makefile, bench/, src/
SHARED = ROOT.parent / "shared"
DEMO_MULTIVIEW = SHARED / "data" / "grid_demo_multiview"  # one object's 24 RGBA renders (not on every machine)
