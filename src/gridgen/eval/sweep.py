"""Evaluation multiruns: the sweep summary callback.

``python -m gridgen.evaluate -m eval.fake=runs/a/samples,runs/b/samples`` runs one evaluation per value; each job's
folder is Hydra's ``<job number>_<override_dirname>`` of the swept keys (``conf/evaluate.yaml``,
:class:`gridgen.config.SweepFolderNames`), and :class:`EvalSweepSummary` writes ``eval_summary.{md,csv,png}`` in the
sweep folder when the multirun ends.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

from hydra.experimental.callback import Callback
from omegaconf import DictConfig

from gridgen.eval.report import write_sweep_summary

log = logging.getLogger(__name__)


class EvalSweepSummary(Callback):
    """Hydra callback: the comparison table across the runs of an evaluation multirun."""

    def on_multirun_end(self, config: DictConfig, **kwargs: Any) -> None:
        try:
            path = write_sweep_summary(Path(config.hydra.sweep.dir))
        except FileNotFoundError as err:  # every job failed: their own errors say why
            log.warning("no evaluation sweep summary: %s", err)
            return
        print(f"sweep summary  {path}", flush=True)  # the multirun's answer to the user (Hydra's entry process)
