"""Prepare entry point: ``python -m gridgen.prepare data=<name> prepare.src=<folder|csv> prepare.out=<folder>``.

A thin ``@hydra.main`` around :func:`gridgen.data.prepare.prepare` (raw clips, frame folders or multi-view
renders -> grid WebDataset shards + ``manifest.json``). On a cluster, ``-m prepare.parts=N
prepare.part='range(0,N)' hydra/launcher=slurm`` runs N parts as a SLURM array (Hydra's submitit launcher). Configs: ``conf/prepare/prepare.yaml`` and one file per
dataset in ``conf/prepare/data/`` whose values come from the dataset's card in ``data_cards/``.
"""

from __future__ import annotations

import shlex
from pathlib import Path

import hydra
from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig

from gridgen.config import CONF_DIR, exit_on_user_error
from gridgen.data.cards import register_card_resolver
from gridgen.data.prepare import prepare

__all__ = ["CONF_DIR", "main", "prepare"]

register_card_resolver()  # ${gridgen_card:<name>,<key>} in conf/prepare/data/


def rerun_command() -> str:
    """This command, as a multirun over the parts to redo (``{parts}``): named when a merge finds parts missing."""
    if not HydraConfig.initialized():
        return ""
    overrides = HydraConfig.get().overrides
    keep = [o for o in overrides.task if not o.startswith(("prepare.part=", "prepare.merge="))]
    keep += [o for o in overrides.hydra if o.startswith(("hydra/launcher=", "hydra.launcher."))]
    return " ".join(["python -m gridgen.prepare -m", *map(shlex.quote, keep), "prepare.part={parts}"])


@hydra.main(version_base="1.3", config_path=str(CONF_DIR / "prepare"), config_name="prepare")
def main(cfg: DictConfig) -> None:
    with exit_on_user_error("prepare"):
        entry = prepare(cfg, rerun=rerun_command())
    counts = entry["counts"]
    out = Path(str(cfg.prepare.out)).expanduser()
    split = cfg.prepare.split
    skipped = ", ".join(f"{k}={v}" for k, v in sorted(counts["skipped"].items())) or "none"
    count = len(entry["shards"])
    if "part" in entry:  # a part, and other parts have not finished yet
        index, parts = entry["part"]
        lines = [f"part           {index} of {parts}: {count} shards {out}/{split}-p{index:05d}-*.tar",
                 "manifest       written when every part has finished (the last one writes it; or run the same "
                 "command with prepare.merge=true instead of prepare.part)"]
    elif "parts" in entry:
        lines = [f"shards         {out}/{split}-p*.tar ({count} shards from {entry['parts']['count']} parts)",
                 f"manifest       {out / 'manifest.json'}"]
    else:
        lines = [f"shards         {out}/{split}-{{000000..{count - 1:06d}}}.tar ({count} shards)",
                 f"manifest       {out / 'manifest.json'}"]
    print("\n".join([  # the entry point's answer to the user
        *lines,
        f"samples        {counts['samples']} grids from {counts['inputs_done']} inputs",
        f"skipped        {skipped}",
    ]), flush=True)


if __name__ == "__main__":
    main()
