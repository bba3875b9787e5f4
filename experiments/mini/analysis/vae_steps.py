"""The build's VAE recipe (``conf/mini.yaml`` ``build.vae``: batch 32, lr 2e-3, KL weight 1e-6, seed 0) trained with
another step count on a cached build's data (vae_steps_v7.md): held-out PSNR and kept identity in
``<new folder>/figures.json``, the VAE beside it for ``analysis/redraw.py ... vae <new folder>``.

    python experiments/mini/analysis/vae_steps.py <steps> <new folder> [<build>, default ~/.cache/gridgen/mini-v7]
"""

import json
import sys
from pathlib import Path

import numpy as np

from gridgen.embedded.mini_data import cell_size
from gridgen.embedded.mini_vae import read_cells, reconstruct, train_vae
from gridgen.eval.shapes import kept_identity

if len(sys.argv) not in (3, 4) or not sys.argv[1].isdigit() or int(sys.argv[1]) < 1:
    print("usage: vae_steps.py <steps, a positive integer> <new folder> [<build folder>]", file=sys.stderr)
    sys.exit(2)
steps, out = int(sys.argv[1]), Path(sys.argv[2])
data = Path(sys.argv[3] if len(sys.argv) == 4 else Path.home() / ".cache/gridgen/mini-v7") / "data"
if out.exists() or not (data / "clips").is_dir():
    why = f"{out} exists: give a new folder" if out.exists() else f"{data / 'clips'} is not a build's data folder"
    print(f"vae_steps.py: {why}", file=sys.stderr)
    sys.exit(2)
train = np.concatenate([read_cells(sorted((data / k).glob("train-*.tar")), cell_size(k)) for k in ("clips", "frames")])
held = read_cells(sorted((data / "clips").glob("test-*.tar")), cell_size("clips"))
vae, figures = train_vae(train, held, steps=steps, batch_size=32, lr=2e-3, kl_weight=1e-6, seed=0,
                         progress=lambda s, loss: print(s, loss, flush=True) if s % 100 == 0 else None)
tmp = out.with_name(f".{out.name}.tmp")  # the folder appears only once complete
vae.save_pretrained(str(tmp), safe_serialization=True)
figures["kept_identity"] = kept_identity(held, reconstruct(vae, held))
(tmp / "figures.json").write_text(json.dumps(figures, indent=2, default=str))
tmp.rename(out)
print(figures)
