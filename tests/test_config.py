"""The configs in gridgen/conf compose as the README documents them: every stage, task and strategy, the paper
presets, the SLURM launcher, the one task table, renamed keys refused, sweep folder names, and resolving the
train config writes nothing."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
from hydra import compose, initialize_config_dir
from hydra.utils import instantiate
from omegaconf import OmegaConf

from gridgen.config import CONF_DIR, PAPER_TARGETS, register_resolvers
from gridgen.embedded import sample_data as sample_mod
from gridgen.inference import resolve_layout
from gridgen.models.lora import read_lora_file
from gridgen.train import train
from tests.helpers.generate import gen_cfg
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


def test_old_spellings_are_refused_with_the_new_one():
    """Nothing rewrites the command line: a key spelled the old way (when `task`/`lora` were rewritten) stops with one
    line naming the new spelling, and the new spellings compose as typed."""
    from gridgen.config import refuse_renamed_keys

    for old, new in (("lora.scale=0", "write lora_scale=0"), ("lora.path=runs/x", "write lora=runs/x"),
                     ("generate_task@task=i2v", "write task=i2v"), ("eval_task=i2v", "write task=i2v"),
                     ("gen.lora=a,b", "write lora=a,b"), ("steps=2", "write generate.steps=2")):
        with pytest.raises(ValueError, match=re.escape(new)) as info:
            refuse_renamed_keys(["-m", "prompt=x", old])
        assert "\n" not in str(info.value) and str(info.value).startswith(f"'{old}'")
    refuse_renamed_keys(["task=i2v", "lora=runs/x", "lora_scale=0", "prompt='a, b'", "--cfg", "job"])  # no error
    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        cfg = compose("generate", overrides=["task=i2v", "lora=runs/x", "lora_scale=0",
                                              "prompt='a dog\\'s tail, running'", "ref=[a.png,b.png]"])
    assert (cfg.task.name, cfg.task.init, cfg.T, cfg.lora, cfg.lora_scale) == ("i2v", "expand", 0.9, "runs/x", 0)
    assert cfg.prompt == "a dog's tail, running" and list(cfg.ref) == ["a.png", "b.png"]


def test_task_rows_share_one_schema():
    """conf/task is one table: every row has the same keys; the tasks that generate, evaluate and train are the ones
    the README lists, and a row's evaluation and generation fields agree (frames = the layout's cells)."""
    from gridgen.config import task_table, tasks_with

    table = task_table()
    assert len({tuple(row) for row in table.values()}) == 1, {name: list(row) for name, row in table.items()}
    assert set(tasks_with("init")) == {"t2v", "t2v_64", "i2v", "interpolate", "t2mv", "i2mv", "edit", "style", "restore",
                                       "mini", "t2i"}
    assert set(tasks_with("metrics")) == {"t2v", "t2v_64", "i2v", "interpolate", "t2mv", "i2mv", "mini", "t2i"}
    for name, row in table.items():
        assert row.name == name and row.data_subset == row.kind
        if row.metrics is not None:
            rows, cols = (int(x) for x in str(row.layout).split("x"))
            assert row.frames == rows * cols, (name, row.frames, row.layout)


def test_flux_dev_config_gives_the_papers_grid_sizes(tmp_path):
    from omegaconf import OmegaConf

    for task, layout, cell in (("t2v", "4x4", 256), ("t2v", "8x8", 128), ("t2mv", "4x6", 256), ("i2v", "4x8", 256)):
        cfg = gen_cfg(tmp_path, "model=flux_dev", f"task={task}", f"layout={layout}")
        plain = OmegaConf.to_container(cfg, resolve=True)  # every interpolation resolves without a data group
        assert plain["model"]["cached"] is False and plain["generate"]["max_sequence_length"] == 512
        grid = resolve_layout(cfg.layout, cfg.generate.grid_heights[cfg.model.name])
        assert (grid.cell_height, grid.cell_width, grid.height) == (cell, cell, 1024)


def test_sweep_folder_names_leave_out_the_constant_keys(tmp_path):
    """SweepFolderNames (train and evaluate): at the start of a multirun the keys given one value join Hydra's
    override_dirname exclude_keys; each job, composed with those Hydra overrides, is named by its swept keys only.
    A multirun that sweeps nothing keeps Hydra's name of all its overrides."""
    from hydra.core.override_parser.overrides_parser import OverridesParser
    from omegaconf import OmegaConf

    from gridgen.config import SweepFolderNames

    def master(*task: str):
        return OmegaConf.create({"hydra": {"overrides": {"task": list(task), "hydra": ["hydra.mode=MULTIRUN"]},
                                           "job": {"config": {"override_dirname": {"exclude_keys": ["logger"]}}}}})

    cfg = master("eval.real=/r", "eval.fake=a,b", "eval.metrics=[psnr,ssim]", "+x.y=1")
    SweepFolderNames().on_multirun_start(cfg)
    added = OverridesParser.create().parse_override(cfg.hydra.overrides.hydra[-1])
    assert added.key_or_group == "hydra.job.config.override_dirname.exclude_keys"
    assert added.value() == ["logger", "eval.real", "eval.metrics", "x.y"]  # [a,b] is a list, not a sweep
    cfg = master("eval.real=/r", "eval.metrics=[psnr]")
    SweepFolderNames().on_multirun_start(cfg)
    assert list(cfg.hydra.overrides.hydra) == ["hydra.mode=MULTIRUN"]
    # composed as a job is: Hydra's own override_dirname, the swept key only
    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        job = compose("evaluate", overrides=["hydra.job.config.override_dirname.exclude_keys=[eval.real]",
                                             "eval.real=/r", "eval.fake=runs/a"], return_hydra_config=True)
    assert job.hydra.job.override_dirname == "eval.fake=runs/a"
