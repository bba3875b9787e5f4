"""Test environment: never touch the network, W&B offline, caches inside the repository; the fixtures that test
modules in several folders share (each built once per test process: xdist runs one process per worker)."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from tests.helpers.paths import ROOT

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


@pytest.fixture(autouse=True, scope="session")
def one_torch_thread():
    """One intra-op thread: on a busy 2-core machine OpenMP spin-waiting makes a 3-step tiny run take ~18 s
    instead of ~0.4 s. Both sides of every comparison run with the same setting."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


# ---- sample shards --------------------------------------------------------------------------------------------
@pytest.fixture(scope="session")
def shards(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict]:
    """video/: 16 train samples (4 shards of 4x4 grids); multiview/: 8 (2 shards of 4x6 grids); 3 val each."""
    from gridgen.embedded import write_sample_shards

    root = tmp_path_factory.mktemp("shards")
    manifest = write_sample_shards(root, seed=0, num_video=16, num_multiview=8, num_val=3, samples_per_shard=4)
    return root, manifest


@pytest.fixture(scope="session")
def video_samples(tmp_path_factory) -> list[dict]:
    """4 undecoded 4x4 video samples (png, json, txt) of the embedded sample data."""
    import webdataset as wds

    from gridgen.embedded import write_sample_shards

    root = tmp_path_factory.mktemp("raw")
    write_sample_shards(root, seed=0, num_video=4, num_multiview=2, num_val=2, samples_per_shard=4)
    return [{k: v for k, v in s.items() if k in ("__key__", "png", "json", "txt")}
            for s in wds.WebDataset(str(root / "video" / "train-000000.tar"), shardshuffle=False)]


# ---- the cache (`make cache`) -----------------------------------------------------------------------------------
@pytest.fixture(scope="session")
def raw(tmp_path_factory) -> Path:
    """Raw shards to cache. video/: 2 train shards + 1 val shard of 4x4 grids; multiview/: 1 train + 1 val of 4x6
    grids."""
    from gridgen.embedded import write_sample_shards

    root = tmp_path_factory.mktemp("raw")
    write_sample_shards(root, seed=0, num_video=8, num_multiview=4, num_val=2, samples_per_shard=4)
    return root


@pytest.fixture(scope="session")
def built(raw, tmp_path_factory) -> tuple[Path, dict]:
    """`make cache data=sample data.train_shards=<raw>` (both layouts; batches of 3 cross layout boundaries)."""
    from gridgen.cache import cache
    from tests.helpers.cache import cache_cfg

    tmp = tmp_path_factory.mktemp("cache")
    cfg = cache_cfg(tmp, f"data.train_shards={raw}", f"cache.out={tmp / 'cache'}", "cache.batch_size=3")
    manifests = cache(cfg)
    return tmp / "cache", manifests["train"]


# ---- the embedded tiny FLUX, built in a folder of its own -------------------------------------------------------
@pytest.fixture(scope="session")
def cache_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("gridgen_cache")


@pytest.fixture(scope="session")
def tiny_dir(cache_root: Path) -> Path:
    """The tiny pipeline, built once through a cache folder of its own (seed 0)."""
    from gridgen.embedded.flux_tiny import ensure_tiny_flux

    return ensure_tiny_flux(cache_dir=cache_root, seed=0)


# ---- training runs (read, never changed, by the tests that use them) ---------------------------------------------
@pytest.fixture(scope="session")
def trained_run(tmp_path_factory):
    """A 4-step run with a large learning rate so the LoRA moves visibly."""
    from gridgen.train import train
    from tests.helpers.train import make_cfg

    tmp = tmp_path_factory.mktemp("run")
    cfg = make_cfg(tmp, "trainer.max_steps=4", "optim.lr=1e-2", "lora.rank=4", "callbacks.checkpoint.every_n_train_steps=2")
    metrics = train(cfg)
    return tmp / "run", cfg, metrics


@pytest.fixture(scope="session")
def lora_run(tmp_path_factory):
    """A LoRA trained by gridgen.train (2 steps, large learning rate so that it moves)."""
    from gridgen.train import train
    from tests.helpers.train import make_cfg

    tmp = tmp_path_factory.mktemp("lora_run")
    train(make_cfg(tmp, "trainer.max_steps=2", "optim.lr=1e-2", "lora.rank=4"))
    return tmp / "run"


# ---- generate's references ----------------------------------------------------------------------------------------
@pytest.fixture(scope="session")
def refs(tmp_path_factory):
    """Reference inputs of every task: an image, keyframes, a frame folder, a grid, a clip, a panorama."""
    import numpy as np
    from PIL import Image

    from gridgen.inference.export import write_mp4
    from tests.helpers.generate import save_images

    tmp = tmp_path_factory.mktemp("refs")
    save_images(tmp / "img", 1, (40, 40), stem="ref")
    save_images(tmp / "keys", 5, (32, 32), seed=1)
    save_images(tmp / "frames", 20, (48, 48), seed=2, stem="frame")
    rng = np.random.default_rng(3)
    Image.fromarray(rng.integers(0, 256, (128, 128, 3), dtype=np.uint8)).save(tmp / "grid.png")
    frames = rng.integers(0, 256, (16, 32, 32, 3), dtype=np.uint8)
    write_mp4(tmp / "clip.mp4", frames, fps=8)
    Image.fromarray(rng.integers(0, 256, (32, 128, 3), dtype=np.uint8)).save(tmp / "panorama.png")
    return tmp
