"""GPU checks (``make test-gpu``, ``bench/gpu_check.sh``): every test reports its figures through the ``report``
fixture: printed (``pytest -s``) and merged into the JSON file ``$GRIDGEN_GPU_REPORT`` when that is set (the
script runs each test in its own process, so the file is read, updated and rewritten per figure set)."""

from __future__ import annotations

import json
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest


def write_report(name: str, **figures: Any) -> None:
    """Print ``figures`` under ``name`` and merge them into ``$GRIDGEN_GPU_REPORT`` (a JSON object by name)."""
    print(f"\nGPU {name}: " + "  ".join(f"{k}={v:.6g}" if isinstance(v, float) else f"{k}={v}"
                                         for k, v in figures.items()), flush=True)
    path = os.environ.get("GRIDGEN_GPU_REPORT")
    if not path:
        return
    file = Path(path)
    data = json.loads(file.read_text()) if file.is_file() and file.stat().st_size else {}
    data[name] = {**data.get(name, {}), **figures}
    file.parent.mkdir(parents=True, exist_ok=True)
    file.write_text(json.dumps(data, indent=2, sort_keys=True) + "\n")


@pytest.fixture
def report() -> Callable[..., None]:
    return write_report
