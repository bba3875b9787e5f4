"""Data configs: resolving writes nothing, the sample data is built by prepare_data(), validation runs by default."""

from __future__ import annotations

from pathlib import Path

import lightning as L
import pytest
import torch
from hydra.utils import instantiate
from omegaconf import OmegaConf

from gridgen.config import register_resolvers
from gridgen.data.datamodule import GridDataModule
from gridgen.embedded import sample_data as sample_mod
from tests.helpers.train import make_cfg

register_resolvers()

# the default run a fresh machine gets: `python -m gridgen.train` (+ a preset on the tiny model)
COMMANDS = [[], ["task=multiview"], ["experiment=video_coarse", "debug=tiny"], ["experiment=multiview", "debug=tiny"],
            ["data=shards", "data.train_shards=/nowhere"]]


@pytest.mark.parametrize("overrides", COMMANDS, ids=" ".join)
def test_resolving_the_train_config_writes_nothing(tmp_path, monkeypatch, overrides):
    cache = tmp_path / "cache"
    monkeypatch.setenv("GRIDGEN_CACHE", str(cache))
    cfg = make_cfg(tmp_path / "root", *overrides)
    resolved = OmegaConf.to_container(cfg, resolve=True)
    assert not cache.exists() and not (tmp_path / "root").exists()
    if overrides[:1] != ["data=shards"]:
        assert resolved["data"]["train_shards"].startswith(str(cache))
        assert resolved["data"]["sample_data_root"] == str(cache)


@pytest.mark.parametrize("overrides, subset", [([], "video"), (["task=i2v"], "video"), (["task=multiview"], "multiview"),
                                               (["experiment=multiview", "debug=tiny"], "multiview"),
                                               (["experiment=video_coarse", "debug=tiny"], "video")])
def test_sample_config_is_where_ensure_sample_shards_builds(tmp_path, overrides, subset):
    """The plain paths of data=sample (and debug=tiny) are the folders ensure_sample_shards returns."""
    cfg = make_cfg(tmp_path, *overrides)
    root = sample_mod.ensure_sample_shards(cfg.data.sample_data_root)  # the test cache: built once, then reused
    assert cfg.data.train_shards == cfg.data.val_shards == str(root / subset)
    assert cfg.data.sources is None


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


def test_default_make_train_validates_at_20_and_40():
    """The documented default: 40 steps, a validation every 20 over the sample's held-out split."""
    cfg = make_cfg(Path("/nonexistent"))
    assert cfg.trainer.max_steps == 40 and cfg.trainer.val_check_interval == 20
    val_batches = -(-4 // cfg.data.batch_size)  # data_cards/sample.md: 4 held-out grids per subset
    assert cfg.trainer.limit_val_batches == val_batches  # all of them, nothing more
    assert cfg.data.val_shards == cfg.data.train_shards


def test_a_data_config_without_val_shards_does_not_validate(tmp_path, monkeypatch):
    monkeypatch.setenv("GRIDGEN_CACHE", str(tmp_path / "cache"))
    _small_sample_data(monkeypatch)
    root = sample_mod.ensure_sample_shards(tmp_path / "cache")
    cfg = make_cfg(tmp_path, "data=shards", f"data.train_shards={root / 'video'}", "data.batch_size=2",
                   "data.num_workers=0", "trainer.max_steps=3", "trainer.val_check_interval=1")
    assert cfg.data.val_shards is None and cfg.trainer.limit_val_batches > 0
    model = _fit(instantiate(cfg.data), cfg)
    assert model.val_steps == []
