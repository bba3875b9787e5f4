"""Evaluation entry point: ``python -m gridgen.evaluate task=<task> eval.real=<set> eval.fake=<set>``.

A thin ``@hydra.main`` around :func:`gridgen.eval.pipeline.run_evaluation` (FVD, IS, CLIP scores, PSNR / SSIM and
timing beside the paper's numbers, ``conf/evaluate.yaml``); a multirun (``-m``) ends with ``eval_summary.*``.
"""

from __future__ import annotations

import sys
from pathlib import Path

import hydra
from omegaconf import DictConfig

from gridgen.config import CONF_DIR, exit_on_user_error, refuse_renamed_keys, register_resolvers
from gridgen.eval.pipeline import run_evaluation
from gridgen.run_folder import removed_on_failure

register_resolvers()


@hydra.main(version_base="1.3", config_path=str(CONF_DIR), config_name="evaluate")
def _hydra_main(cfg: DictConfig) -> float | None:
    with exit_on_user_error("evaluate"), removed_on_failure(Path(cfg.paths.root_dir)):
        result = run_evaluation(cfg)
    if result.table is not None:  # rank 0 answers the user
        print(result.table, flush=True)
        print(f"results        {result.paths[0]}\n               {result.paths[1]}", flush=True)
    return result.metrics.get("fvd")  # lets Hydra sweepers optimise over runs


def main() -> None:
    with exit_on_user_error("evaluate"):
        refuse_renamed_keys(sys.argv[1:])
    _hydra_main()


if __name__ == "__main__":
    main()
