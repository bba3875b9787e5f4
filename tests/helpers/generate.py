"""The generate config and command line: `gen_cfg` composes conf/generate.yaml as a command line would,
`run_cli` runs `python -m gridgen.generate`; `save_images` writes reference images."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
from hydra import compose, initialize_config_dir
from PIL import Image

from gridgen.config import CONF_DIR


def gen_cfg(tmp: Path, *overrides: str):
    """Compose conf/generate.yaml with the overrides a command line gives Hydra."""
    args = [f"paths.root_dir={tmp}", f"paths.output_dir={tmp}/run", f"generate.out={tmp}/out",
            "generate.progress=false", *overrides]
    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        return compose("generate", overrides=args)


def gen_cfg_grid_only(tmp: Path, *overrides: str):
    """`gen_cfg` for one step that writes only grid.png."""
    args = [f"paths.root_dir={tmp}", f"paths.output_dir={tmp}/run", f"generate.out={tmp}/out",
            "generate.progress=false", "generate.steps=1", "export.mp4=false", "export.gif=false",
            "export.frames=false", *overrides]
    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        return compose("generate", overrides=args)


def save_images(folder: Path, count: int, size: tuple[int, int], seed: int = 0, stem: str = "key") -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    for k in range(count):
        Image.fromarray(rng.integers(0, 256, (size[1], size[0], 3), dtype=np.uint8)).save(folder / f"{stem}_{k}.png")
    return folder


def run_cli(*args: str, cwd: Path) -> subprocess.CompletedProcess:
    env = {**os.environ, "GRIDGEN_ROOT": str(cwd), "PYTHONUNBUFFERED": "1", "OMP_NUM_THREADS": "1"}
    return subprocess.run([sys.executable, "-m", "gridgen.generate", *args], cwd=cwd, env=env, capture_output=True,
                          text=True, timeout=180)
