"""The build's own VAE step (``gridgen.mini.build``, recipe ``conf/mini.yaml`` ``build.vae``) with another step
count, on a cached build's data (vae_steps_v7.md): held-out PSNR and kept identity in ``<new folder>/figures.json``,
the VAE beside it for ``analysis/redraw.py ... vae <new folder>``.

    python experiments/mini/analysis/vae_steps.py <steps> <new folder> [<build>, default ~/.cache/gridgen/mini-v7]
"""

import json
import logging
import shutil
import sys
from pathlib import Path

from hydra import initialize_config_dir

from gridgen.config import CONF_DIR, register_resolvers
from gridgen.mini.build import _vae  # the build's VAE step itself, so the recipe has one home
from gridgen.mini.steps import compose

if len(sys.argv) not in (3, 4) or not sys.argv[1].isdigit() or int(sys.argv[1]) < 1:
    print("usage: vae_steps.py <steps, a positive integer> <new folder> [<build folder>]", file=sys.stderr)
    sys.exit(2)
steps, out = int(sys.argv[1]), Path(sys.argv[2])
build = Path(sys.argv[3] if len(sys.argv) == 4 else Path.home() / ".cache/gridgen/mini-v7")
if out.exists() or not (build / "data" / "clips").is_dir():
    why = f"{out} exists: give a new folder" if out.exists() else f"{build} is not a build folder (no data/clips)"
    print(f"vae_steps.py: {why}", file=sys.stderr)
    sys.exit(2)
logging.basicConfig(level=logging.INFO, format="%(message)s", stream=sys.stdout)
register_resolvers()
with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3", job_name="vae_steps"):
    cfg = compose("mini", [f"build.vae.steps={steps}"])
tmp = out.with_name(f".{out.name}.tmp")  # the folder appears only once complete
shutil.rmtree(tmp, ignore_errors=True)  # a killed run's leftover
tmp.mkdir(parents=True)
try:
    figures = _vae(cfg, build, tmp)
    (tmp / "figures.json").write_text(json.dumps(figures, indent=2, default=str) + "\n")
except BaseException:
    shutil.rmtree(tmp, ignore_errors=True)
    raise
tmp.rename(out)
