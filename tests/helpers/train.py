"""The training config and command line as a user gives them: `make_cfg` composes conf/train.yaml with the run
folder under a test's folder (`make_cfg_no_val`: validation off), `run_cli` runs `python -m gridgen.train`
there."""

import os
import subprocess
import sys
from pathlib import Path

from hydra import compose, initialize_config_dir

from gridgen.config import CONF_DIR

STAGES, TASKS, STRATEGIES = ("coarse", "fine"), ("t2v", "i2v", "multiview"), ("cpu", "gpu", "ddp", "fsdp")

PRESETS = ("video_coarse", "video_fine", "i2v", "multiview", "multiview_ef")


def make_cfg(tmp: Path, *overrides: str):
    """Compose the real configs as a user's command line would, with the run folder in ``tmp``."""
    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        return compose("train", overrides=[f"paths.root_dir={tmp}", f"paths.output_dir={tmp}/run",
                                           "logger=csv", "trainer.enable_progress_bar=false", *overrides])


def make_cfg_no_val(tmp: Path, *overrides: str):
    """`make_cfg` with validation off (trainer.limit_val_batches=0)."""
    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        return compose("train", overrides=[f"paths.root_dir={tmp}", f"paths.output_dir={tmp}/run", "logger=csv",
                                           "trainer.enable_progress_bar=false", "trainer.limit_val_batches=0",
                                           *overrides])


def run_cli(*args: str, cwd: Path, timeout: int = 300) -> subprocess.CompletedProcess:
    env = {**os.environ, "GRIDGEN_ROOT": str(cwd), "PYTHONUNBUFFERED": "1"}
    return subprocess.run([sys.executable, "-m", "gridgen.train", *args], cwd=cwd, env=env, capture_output=True,
                          text=True, timeout=timeout)
