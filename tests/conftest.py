"""Test environment: never touch the network, W&B offline, caches inside the repository."""

import os
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
os.environ["HF_HUB_OFFLINE"] = "1"
os.environ.setdefault("WANDB_MODE", "offline")
os.environ.setdefault("WANDB_SILENT", "true")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
# Tiny models: one thread per process is as fast on an idle machine and 10-100x faster on a busy one; the
# variable also reaches the subprocesses that CLI and DDP tests start.
os.environ.setdefault("OMP_NUM_THREADS", "1")
os.environ.setdefault("GRIDGEN_CACHE", str(ROOT / ".cache" / "tests"))


def pytest_sessionstart(session):
    """Tests that read the embedded sample shards straight from the config (not through a DataModule's
    prepare_data, which builds them for `make train`) find them built once, whatever order the tests run in."""
    from gridgen.embedded import ensure_sample_shards

    ensure_sample_shards(os.environ["GRIDGEN_CACHE"])
