"""The configs in gridgen/conf compose as the README documents them: every stage, task and strategy, the paper
presets, the SLURM launcher, the one task table, renamed keys refused, sweep folder names, and resolving the
train config writes nothing."""

from __future__ import annotations

from pathlib import Path

import pytest
from omegaconf import OmegaConf

from gridgen.config import register_resolvers
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


def test_default_make_train_validates_at_20_and_40():
    """The documented default: 40 steps, a validation every 20 over the sample's held-out split."""
    cfg = make_cfg(Path("/nonexistent"))
    assert cfg.trainer.max_steps == 40 and cfg.trainer.val_check_interval == 20
    val_batches = -(-4 // cfg.data.batch_size)  # data_cards/sample.md: 4 held-out grids per subset
    assert cfg.trainer.limit_val_batches == val_batches  # all of them, nothing more
    assert cfg.data.val_shards == cfg.data.train_shards
