"""`make cache` on the embedded tiny FLUX: its model config, the cache config, a folder's shard bytes."""

from __future__ import annotations

from pathlib import Path

from hydra import compose, initialize_config_dir

from gridgen.config import CONF_DIR

TINY = {"name": "flux_tiny", "pretrained": "embedded:tiny", "revision": None, "variant": None,
        "max_sequence_length": 32}


def cache_cfg(tmp: Path, *overrides: str):
    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        return compose("cache", overrides=[f"paths.root_dir={tmp}", *overrides])


def folder_bytes(folder: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(folder.glob("*.tar"))}
