"""Prepare entry point: ``python -m gridgen.prepare data=<name> prepare.src=<folder|csv> prepare.out=<folder>``.

A thin ``@hydra.main`` around :func:`gridgen.data.prepare.prepare` (raw clips, frame folders or multi-view
renders -> grid WebDataset shards + ``manifest.json``). Configs: ``conf/prepare/prepare.yaml`` and one file per
dataset in ``conf/prepare/data/`` whose values come from the dataset's card in ``data_cards/``.
"""

from __future__ import annotations

from pathlib import Path

import hydra
from omegaconf import DictConfig

from gridgen.config import CONF_DIR, exit_on_user_error
from gridgen.data.cards import register_card_resolver
from gridgen.data.prepare import prepare

__all__ = ["CONF_DIR", "main", "prepare"]

register_card_resolver()  # ${gridgen_card:<name>,<key>} in conf/prepare/data/


@hydra.main(version_base="1.3", config_path=str(CONF_DIR / "prepare"), config_name="prepare")
def main(cfg: DictConfig) -> None:
    with exit_on_user_error("prepare"):
        entry = prepare(cfg)
    counts = entry["counts"]
    out = Path(str(cfg.prepare.out)).expanduser()
    skipped = ", ".join(f"{k}={v}" for k, v in sorted(counts["skipped"].items())) or "none"
    count = len(entry["shards"])
    print("\n".join([  # the entry point's answer to the user
        f"shards         {out}/{cfg.prepare.split}-{{000000..{count - 1:06d}}}.tar ({count} shards)",
        f"manifest       {out / 'manifest.json'}",
        f"samples        {counts['samples']} grids from {counts['inputs_done']} inputs",
        f"skipped        {skipped}",
    ]), flush=True)


if __name__ == "__main__":
    main()
