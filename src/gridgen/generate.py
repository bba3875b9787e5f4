"""Omni inference entry point: ``python -m gridgen.generate task=<task> prompt="..." [ref=...] [lora=...]``.

A thin ``@hydra.main`` around :func:`generate`, which builds everything from the config (``conf/generate.yaml``
and the task table, ``conf/task/``), writes the grids, frames, videos and ``manifest.json``, and returns the manifest.
"""

from __future__ import annotations

import sys
from pathlib import Path

import hydra
from omegaconf import DictConfig

from gridgen.config import CONF_DIR, exit_on_user_error, refuse_renamed_keys, register_resolvers
from gridgen.inference.pipeline import generate  # noqa: F401 (the library call; tests and notebooks import it here)
from gridgen.run_folder import removed_on_failure

register_resolvers()


@hydra.main(version_base="1.3", config_path=str(CONF_DIR), config_name="generate")
def _hydra_main(cfg: DictConfig) -> None:
    with exit_on_user_error("generate"), removed_on_failure(Path(cfg.paths.root_dir)):
        manifest = generate(cfg)
    out = Path(manifest["out"])
    timing = manifest["timing"]
    lines = [
        f"output folder  {out}",
        f"manifest       {out / 'manifest.json'}",
        f"grids          {len(manifest['samples'])} x {manifest['layout']['name']} "
        f"({manifest['layout']['height']}x{manifest['layout']['width']} px), task {manifest['task']}, "
        f"T={manifest['T']}, {manifest['steps']} steps",
        f"time           {timing['per_grid_total_s']:.3f} s per grid: sampling + decoding {timing['per_grid_s']:.3f} s "
        f"({timing['per_frame_s'] * 1000:.1f} ms per frame), writing files {timing['per_grid_export_s']:.3f} s "
        f"(+ {timing['load_s']:.1f} s loading)",
    ]
    lines += [f"sample {s['index']:<7} {out / s['files']['grid']}" for s in manifest["samples"][:10]]
    print("\n".join(lines), flush=True)  # the entry point's answer to the user


def main() -> None:
    with exit_on_user_error("generate"):
        refuse_renamed_keys(sys.argv[1:])
    _hydra_main()


if __name__ == "__main__":
    main()
