"""The configs in gridgen/conf compose as the README documents them: every stage, task and strategy, the paper
presets, the SLURM launcher, the one task table, renamed keys refused, sweep folder names, and resolving the
train config writes nothing."""

from __future__ import annotations

from pathlib import Path

import pytest
from hydra import compose, initialize_config_dir
from hydra.utils import instantiate
from omegaconf import OmegaConf

from gridgen.config import CONF_DIR, PAPER_TARGETS, register_resolvers
from gridgen.embedded import sample_data as sample_mod
from gridgen.models.lora import read_lora_file
from gridgen.train import train
from tests.helpers.train import PRESETS, STAGES, STRATEGIES, TASKS, make_cfg

register_resolvers()


@pytest.mark.parametrize("strategy", STRATEGIES)
def test_every_stage_task_strategy_composes(tmp_path, strategy):
    for stage in STAGES:
        for task in TASKS:
            cfg = make_cfg(tmp_path, f"stage={stage}", f"task={task}", f"strategy={strategy}")
            assert cfg.stage.name == stage and cfg.task.name == task
            assert cfg.trainer.accelerator in ("cpu", "gpu", "auto")
    if strategy in ("ddp", "fsdp"):
        strat = instantiate(cfg.trainer.strategy)
        from lightning.pytorch.strategies import DDPStrategy
        if strategy == "fsdp":
            from gridgen.training.strategies import FluxFSDP2Strategy
            assert isinstance(strat, FluxFSDP2Strategy)  # FSDP2: per-parameter sharding, bf16 base + fp32 LoRA
            assert strat.param_dtype == "bfloat16" and strat.reshard_after_forward
        else:
            assert isinstance(strat, DDPStrategy)


def test_slurm_launcher_config_composes(tmp_path):
    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        cfg = compose("train", overrides=["hydra/launcher=slurm", "hydra.launcher.nodes=2", "strategy=ddp",
                                           "trainer.devices=8", "trainer.num_nodes=2"], return_hydra_config=True)
    launcher = cfg.hydra.launcher
    assert launcher._target_ == "hydra_plugins.hydra_submitit_launcher.submitit_launcher.SlurmLauncher"
    assert (launcher.nodes, launcher.gpus_per_node, launcher.tasks_per_node) == (2, 8, 8)
    assert cfg.trainer.num_nodes == 2 and cfg.trainer.strategy._target_.endswith("DDPStrategy")


def test_every_paper_preset_runs_with_debug_override(tmp_path):
    """Each preset composes for FLUX.1-dev and runs on the embedded default with debug=tiny (coarse before fine)."""
    import yaml

    targets = yaml.safe_load(PAPER_TARGETS.read_text())
    for name in PRESETS:
        full = make_cfg(tmp_path, f"experiment={name}")
        assert full.model.name == "flux_dev" and full.trainer.max_steps >= 1000
        assert full.paper_targets.variant in targets[full.paper_targets.task]  # names real paper numbers
        cfg = make_cfg(tmp_path, f"experiment={name}", "debug=tiny", f"paths.output_dir={tmp_path}/outputs/runs/{name}")
        assert (cfg.model.name, cfg.trainer.accelerator, cfg.trainer.devices) == ("flux_tiny", "cpu", 1)
        train(cfg)
        _, header = read_lora_file(tmp_path / "outputs" / "runs" / name / "lora")
        assert header["gridgen_rank"] == str(full.lora.rank)
    assert make_cfg(tmp_path, "experiment=multiview_ef").lora.rank == 16


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
