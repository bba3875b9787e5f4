"""GridDataModule: batch format, fixed epochs, deterministic streams, ranks in lockstep (and 2 DDP processes on
uneven shards), fixed validation, skipped samples in the logger and on the console, prepare_data() building the
sample data."""

from __future__ import annotations

import csv
import json
import os
import signal
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import lightning as L
import pytest
import torch
import webdataset as wds
from hydra.utils import instantiate
from lightning.pytorch.loggers import CSVLogger

from gridgen.config import register_resolvers
from gridgen.data import GridDataModule
from gridgen.embedded import sample_data as sample_mod
from gridgen.layout import GridLayout
from tests.helpers.ddp_datamodule import SCRIPT, STEPS, write_shards
from tests.helpers.shards import KINDS, batch_keys, grid_with_cells, one_epoch, setup_error, write_shard
from tests.helpers.train import make_cfg

register_resolvers()


def test_datamodule_empty_folder_error(tmp_path):
    (tmp_path / "empty").mkdir()
    dm = GridDataModule(tmp_path / "empty")
    with pytest.raises(FileNotFoundError, match="no shards matching 'train-.*make prepare"):
        dm.train_dataloader()
    dm = GridDataModule(tmp_path / "nowhere")
    with pytest.raises(FileNotFoundError, match="nowhere"):
        dm.setup("fit")


def test_train_batches_format_and_never_mixed(shards):
    root, _ = shards
    dm = GridDataModule([root / "video", root / "multiview"], batch_size=3, seed=0, shuffle_buffer=16)
    loader = dm.train_dataloader()
    assert dm.batches_per_epoch == (16 + 8) // 3 == len(loader)
    seen = set()
    for _ in range(2):
        batches = one_epoch(loader)
        assert len(batches) == dm.batches_per_epoch  # a fixed number of batches per epoch
        for batch in batches:
            assert set(batch) == {"pixel_values", "caption", "layout", "__key__"}
            layout = GridLayout(**batch["layout"])
            pixels = batch["pixel_values"]
            assert pixels.dtype == torch.float32 and pixels.shape == (3, 3, layout.height, layout.width)
            assert pixels.min() >= -1.0 and pixels.max() <= 1.0 and pixels.min() < 0 < pixels.max()
            kinds = {key.split("-")[0] for key in batch["__key__"]}
            assert len(kinds) == 1  # never a mixed batch
            kind = kinds.pop()
            assert (layout.rows, layout.cols) == {"video": (4, 4), "multiview": (4, 6)}[kind]
            assert all(c.startswith(layout.caption_prefix("video")) for c in batch["caption"])  # "N-frame", Table 4
            assert all(("3D model of" in c) == (kind == "multiview") for c in batch["caption"])
            seen.add(layout.name)
    assert seen == {"4x4", "4x6"}
    assert dm.num_skipped == 0

    dm = GridDataModule(root / "video", batch_size=2, samples_per_epoch=10)
    assert len(one_epoch(dm.train_dataloader())) == 5


def test_train_stream_is_deterministic(shards):
    root, _ = shards

    def first_two_epochs(seed: int) -> list[list[str]]:
        loader = GridDataModule(root, batch_size=2, seed=seed, shuffle_buffer=8).train_dataloader()
        return batch_keys(one_epoch(loader)) + batch_keys(one_epoch(loader))

    run = first_two_epochs(0)
    assert run == first_two_epochs(0)
    assert run[: len(run) // 2] != run[len(run) // 2 :]  # the next epoch draws other shards
    assert run != first_two_epochs(1)


def test_ranks_step_in_lockstep(shards, monkeypatch):
    """Two DDP ranks (simulated): same number of batches each, different data."""
    root, _ = shards
    per_rank = []
    for rank in (0, 1):
        monkeypatch.setenv("RANK", str(rank))
        monkeypatch.setenv("WORLD_SIZE", "2")
        dm = GridDataModule(root / "video", batch_size=2, shuffle_buffer=4)
        dm.trainer = SimpleNamespace(world_size=2)
        per_rank.append(batch_keys(one_epoch(dm.train_dataloader())))
    assert len(per_rank[0]) == len(per_rank[1]) == 16 // (2 * 2)
    assert per_rank[0] != per_rank[1]


def test_validation_is_fixed_and_complete(shards):
    root, _ = shards
    dm = GridDataModule(root / "video", val_shards=[root / "video", root / "multiview"], batch_size=2)
    loader = dm.val_dataloader()
    first, second = one_epoch(loader), one_epoch(loader)
    assert batch_keys(first) == batch_keys(second)
    assert all(torch.equal(a["pixel_values"], b["pixel_values"]) for a, b in zip(first, second, strict=True))
    # every val sample exactly once, in shard order; last batch of each layout partial (3 = 2 + 1)
    assert batch_keys(first) == [
        ["video-val-000000", "video-val-000001"],
        ["multiview-val-000000", "multiview-val-000001"],
        ["video-val-000002"],
        ["multiview-val-000002"],
    ]
    for batch in first:
        layout = GridLayout(**batch["layout"])
        assert batch["pixel_values"].shape[1:] == (3, layout.height, layout.width)
    assert GridDataModule(root).val_dataloader() == []  # no val_shards: no validation


def test_validation_is_the_same_on_every_rank(root, monkeypatch):
    """Three val shards of unequal sizes: both (simulated) ranks validate the same batches, in the same order."""
    val = [root / "video" / "val-000000.tar", root / "multiview" / "val-000000.tar"]
    seen = []
    for rank in (0, 1):
        monkeypatch.setenv("RANK", str(rank))
        monkeypatch.setenv("WORLD_SIZE", "2")
        dm = GridDataModule(root / "video", val_shards=[str(p) for p in val], batch_size=2)
        dm.trainer = SimpleNamespace(world_size=2)
        seen.append([b["__key__"] for b in dm.val_dataloader()])
    assert seen[0] == seen[1]
    assert sorted(k for b in seen[0] for k in b) == sorted(f"{k}-val-{i:06d}" for k in KINDS for i in range(3))


@pytest.mark.slow  # 3 processes (~20 s); the sharding rule is checked in process in CI
def test_ddp_two_cpu_processes_uneven_shards_fixed_steps(tmp_path):
    write_shards(tmp_path)
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "OMP_NUM_THREADS": "1"}  # 2 ranks on 2 shared cores
    # a session of its own: on a hang, the timeout kills rank 0 *and* the rank 1 it launched
    proc = subprocess.Popen([sys.executable, str(SCRIPT), str(tmp_path), str(tmp_path / "out"), str(STEPS)],
                            cwd=tmp_path, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            start_new_session=True)
    try:
        _, stderr = proc.communicate(timeout=180)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.communicate()
        raise AssertionError(f"DDP run with uneven shards did not finish {STEPS} steps in 180 s (hung)") from None
    assert proc.returncode == 0, stderr[-3000:]
    ranks = [json.loads((tmp_path / "out" / f"rank{r}.json").read_text()) for r in (0, 1)]
    for rank in ranks:
        assert rank["world_size"] == 2
        # 8 + 3 samples (the broken one counted) -> 11 // (2 ranks x 2) = 2 batches per epoch: 7 steps span 4 epochs
        assert rank["batches_per_epoch"] == 2
        assert [s["step"] for s in rank["seen"]] == list(range(STEPS))
        for step in rank["seen"]:
            assert len(step["keys"]) == 2 and "broken" not in step["keys"]
            kinds = {key.split("-")[0] for key in step["keys"]}
            assert len(kinds) == 1  # one layout per batch
            assert (step["layout"]["rows"], step["layout"]["cols"]) == {"video": (4, 4), "multiview": (4, 6)}[kinds.pop()]
    assert [s["keys"] for s in ranks[0]["seen"]] != [s["keys"] for s in ranks[1]["seen"]]  # each rank its own data
    assert ranks[0]["weight"] == ranks[1]["weight"] != 0  # gradients were all-reduced: one model
    with open(tmp_path / "out" / "logs" / "metrics.csv") as f:
        skipped = [float(r["data/skipped"]) for r in csv.DictReader(f) if r.get("data/skipped")]
    assert len(skipped) == STEPS and skipped[-1] <= ranks[0]["skipped"] + ranks[1]["skipped"]
    assert skipped[-1] > 0  # the broken sample, seen by the ranks that drew shard 0, summed over ranks


class _CountingModule(L.LightningModule):
    def __init__(self) -> None:
        super().__init__()
        self.weight = torch.nn.Parameter(torch.zeros(()))
        self.train_steps: list[int] = []
        self.val_keys: list[str] = []

    def training_step(self, batch, batch_idx):
        self.train_steps.append(self.current_epoch)
        return (batch["pixel_values"].mean() - self.weight) ** 2

    def validation_step(self, batch, batch_idx):
        self.val_keys.extend(batch["__key__"])

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.1)


def test_lightning_fit_uses_fixed_epochs(shards):
    root, _ = shards
    dm = GridDataModule([root / "video", root / "multiview"], val_shards=root, batch_size=4)
    model = _CountingModule()
    trainer = L.Trainer(
        max_epochs=2,
        accelerator="cpu",
        devices=1,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        num_sanity_val_steps=0,
    )
    trainer.fit(model, datamodule=dm)
    assert model.train_steps == [0] * 6 + [1] * 6  # (16 + 8) // 4 batches per epoch
    assert sorted(model.val_keys) == sorted(
        [f"{k}-val-{i:06d}" for k in ("video", "multiview") for i in range(3)] * 2
    )


class _TinyModule(L.LightningModule):
    def __init__(self) -> None:
        super().__init__()
        self.weight = torch.nn.Parameter(torch.zeros(()))

    def training_step(self, batch, batch_idx):
        pixels = batch["pixel_values"]  # uint8 from the loader, float on the device (on_after_batch_transfer)
        assert pixels.dtype == torch.float32 and pixels.min() >= -1 and pixels.max() <= 1
        loss = (pixels.mean() - self.weight) ** 2
        self.log("train/loss", loss)
        return loss

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.1)


def write_shard_with_two_broken_samples(root, folder):
    """The sample's first video shard with an unreadable PNG and a sample without a layout among its samples."""
    good = [{k: v for k, v in s.items() if k in ("__key__", "png", "json", "txt")}
            for s in wds.WebDataset(str(root / "video" / "train-000000.tar"), shardshuffle=False)]
    broken = [dict(good[0], __key__="broken-png", png=b"\x89PNG no"), dict(good[1], __key__="no-layout", json=b"{}")]
    with wds.TarWriter(str(folder / "train-000000.tar"), mtime=0) as sink:
        for sample in good[:2] + broken + good[2:]:
            sink.write(sample)


def test_skipped_samples_reach_the_lightning_logger(root, tmp_path):
    write_shard_with_two_broken_samples(root, tmp_path)
    dm = GridDataModule(tmp_path, batch_size=2, samples_per_epoch=12, shuffle_buffer=1)
    logger = CSVLogger(tmp_path / "logs", name="", version="v")
    trainer = L.Trainer(max_steps=6, accelerator="cpu", devices=1, logger=logger, log_every_n_steps=1,
                        enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False)
    trainer.fit(_TinyModule(), datamodule=dm)
    with open(tmp_path / "logs" / "v" / "metrics.csv") as f:
        rows = [r for r in csv.DictReader(f) if r.get("data/skipped")]
    logged = {int(r["step"]): float(r["data/skipped"]) for r in rows}
    assert sorted(logged) == list(range(6))  # every step (log_every_n_steps=1)
    values = [logged[s] for s in sorted(logged)]
    assert values == sorted(values) and values[-1] > 0  # a running count that saw the broken samples
    assert values[-1] <= dm.num_skipped and dm.num_skipped % 2 == 0  # both broken ones, every pass


def test_skips_are_one_console_line_per_logging_interval(root, tmp_path, caplog):
    """2 broken samples met again and again by the resampled stream: one line per log_every_n_steps with the counts
    per reason, not one per skip; the lines add up to every skip."""
    import logging
    import re

    write_shard_with_two_broken_samples(root, tmp_path)
    dm = GridDataModule(tmp_path, batch_size=2, samples_per_epoch=12, shuffle_buffer=1)
    trainer = L.Trainer(max_steps=12, accelerator="cpu", devices=1, logger=False, log_every_n_steps=4,
                        enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False)
    with caplog.at_level(logging.WARNING, logger="gridgen.data"):
        trainer.fit(_TinyModule(), datamodule=dm)
    lines = [r.getMessage() for r in caplog.records if r.name.startswith("gridgen.data")]
    assert dm.num_skipped >= 6 and 2 <= len(lines) <= 12 // 4 + 1  # steps 0, 4, 8 and the end of training
    counted = {"undecodable_member": 0, "bad_layout": 0}
    for line in lines:
        assert re.fullmatch(r"data \((up to step \d+|end of training)\): skipped \d+ broken samples: .*; \d+ in all",
                            line), line
        for reason, n in re.findall(r"(\w+)=(\d+)", line):
            counted[reason] += int(n)
    assert counted["undecodable_member"] == counted["bad_layout"] == dm.num_skipped // 2  # every pass meets both
    assert "(e.g. sample 'broken-png': member 'png' cannot be decoded" in lines[0]  # the first line of a reason


def test_pin_memory_that_cannot_act_is_refused(root):
    dm = GridDataModule(root / "video", batch_size=2, samples_per_epoch=4, pin_memory=True)
    dm.trainer = L.Trainer(accelerator="cpu", devices=1, logger=False, enable_progress_bar=False)
    with pytest.raises(ValueError, match="data.pin_memory=true pins batches for copies to a CUDA device"):
        dm.train_dataloader()
    with pytest.raises(ValueError, match="data.image_decoder must be one of"):
        GridDataModule(root / "video", image_decoder="turbo")


def test_cells_flux_cannot_take_fail_in_setup(video_samples, tmp_path):
    write_shard(tmp_path / "train-000000.tar", [grid_with_cells(s, 30) for s in video_samples])
    message = setup_error(GridDataModule(tmp_path))
    assert message.startswith(f"shard '{tmp_path / 'train-000000.tar'}': none of its first 4 samples can be "
                              f"trained on; sample '{video_samples[0]['__key__']}': layout 4x4: cell_height must be a positive "
                              "multiple of 16 px")
    assert "got 30; pick e.g. 32" in message and message.endswith("or remove it from data.train_shards")
    # 32 px cells of the same hand-made kind are fine
    write_shard(tmp_path / "ok" / "train-000000.tar", [grid_with_cells(s, 32) for s in video_samples])
    GridDataModule(tmp_path / "ok").setup("fit")


def _small_sample_data(monkeypatch) -> list[Path]:
    """ensure_sample_shards as is (its folder naming, atomic rename), with few samples; records each build."""
    built: list[Path] = []
    real = sample_mod.write_sample_shards

    def write(out, **kwargs):
        built.append(Path(out))
        return real(out, **{**kwargs, "num_video": 8, "num_multiview": 4, "num_val": 2, "samples_per_shard": 4})

    monkeypatch.setattr(sample_mod, "write_sample_shards", write)
    return built


class _Recorder(L.LightningModule):
    def __init__(self) -> None:
        super().__init__()
        self.weight = torch.nn.Parameter(torch.zeros(()))
        self.val_steps: list[int] = []

    def training_step(self, batch, batch_idx):
        return (batch["pixel_values"].mean() - self.weight) ** 2

    def validation_step(self, batch, batch_idx):
        self.val_steps.append(self.global_step)

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.1)


def _fit(dm: GridDataModule, cfg, **trainer_overrides) -> _Recorder:
    model = _Recorder()
    kwargs = dict(limit_val_batches=cfg.trainer.limit_val_batches, val_check_interval=cfg.trainer.val_check_interval,
                  check_val_every_n_epoch=cfg.trainer.check_val_every_n_epoch, max_steps=cfg.trainer.max_steps)
    L.Trainer(accelerator="cpu", devices=1, logger=False, enable_checkpointing=False, enable_progress_bar=False,
              enable_model_summary=False, num_sanity_val_steps=0, **{**kwargs, **trainer_overrides}).fit(model, dm)
    return model


def test_prepare_data_builds_the_sample_data_and_validation_runs(tmp_path, monkeypatch):
    """A fresh cache: Lightning's prepare_data() builds the data before setup(); validation runs by default."""
    cache = tmp_path / "cache"
    monkeypatch.setenv("GRIDGEN_CACHE", str(cache))
    built = _small_sample_data(monkeypatch)
    cfg = make_cfg(tmp_path, "trainer.max_steps=4", "trainer.val_check_interval=2")
    dm = instantiate(cfg.data)
    assert not cache.exists()  # instantiating builds nothing either
    model = _fit(dm, cfg)
    assert len(built) == 1 and Path(cfg.data.train_shards).is_dir()
    assert dm.val_urls == [str(Path(cfg.data.train_shards) / "val-000000.tar")]
    # the default limit_val_batches validates the whole held-out split (2 grids = 1 batch of 2) at each check
    assert cfg.trainer.limit_val_batches >= 1 and model.val_steps == [2, 4]

    again = instantiate(cfg.data)
    again.prepare_data()  # present: nothing is rebuilt
    assert len(built) == 1

    # a config whose sample path is not where the sample data is built: one line saying what to fix
    wrong = instantiate(make_cfg(tmp_path, f"data.train_shards={cache}/sample-v0/video").data)
    with pytest.raises(FileNotFoundError) as info:
        wrong.prepare_data()
    assert f"data.train_shards '{cache}/sample-v0/video' is not in the embedded sample data built at" in str(info.value)


def test_a_data_config_without_val_shards_does_not_validate(tmp_path, monkeypatch):
    monkeypatch.setenv("GRIDGEN_CACHE", str(tmp_path / "cache"))
    _small_sample_data(monkeypatch)
    root = sample_mod.ensure_sample_shards(tmp_path / "cache")
    cfg = make_cfg(tmp_path, "data=shards", f"data.train_shards={root / 'video'}", "data.batch_size=2",
                   "data.num_workers=0", "trainer.max_steps=3", "trainer.val_check_interval=1")
    assert cfg.data.val_shards is None and cfg.trainer.limit_val_batches > 0
    model = _fit(instantiate(cfg.data), cfg)
    assert model.val_steps == []
