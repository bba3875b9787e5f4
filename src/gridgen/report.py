"""Report entry point: ``python -m gridgen.report run=<run folder | sweep folder>`` (``make report run=...``).

A thin ``@hydra.main`` around :func:`gridgen.reporting.report`: loss curves, alpha and learning rate as PNG with
a Markdown summary in ``<run>/report/``, or ``sweep_summary.{md,csv,png}`` for a sweep folder, without W&B.
"""

from __future__ import annotations

import hydra
from omegaconf import DictConfig

from gridgen.config import CONF_DIR, exit_on_user_error
from gridgen.reporting import report


@hydra.main(version_base="1.3", config_path=str(CONF_DIR), config_name="report")
def main(cfg: DictConfig) -> None:
    with exit_on_user_error("report"):
        out = report(cfg.run)
    print(f"report         {out}", flush=True)  # the entry point's answer to the user


if __name__ == "__main__":
    main()
