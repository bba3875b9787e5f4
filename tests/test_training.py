"""Training module, callbacks, checkpoints, export and the Hydra entry point on the embedded tiny FLUX."""

import csv
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from diffusers import FluxPipeline
from hydra import compose, initialize_config_dir
from hydra.utils import instantiate

from gridgen.config import CONF_DIR, PAPER_TARGETS
from gridgen.embedded import ensure_tiny_flux
from gridgen.models.loading import load_flux_pipeline
from gridgen.models.lora import FLUX_BLOCKS, read_lora_file
from gridgen.train import train
from gridgen.training.callbacks import AlphaSchedule, alpha_at
from tests.helpers.paths import HELPERS

ROOT = Path(__file__).resolve().parents[1]
STAGES, TASKS, STRATEGIES = ("coarse", "fine"), ("t2v", "i2v", "multiview"), ("cpu", "gpu", "ddp", "fsdp")


def make_cfg(tmp: Path, *overrides: str):
    """Compose the real configs as a user's command line would, with the run folder in ``tmp``."""
    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        return compose("train", overrides=[f"paths.root_dir={tmp}", f"paths.output_dir={tmp}/run",
                                           "logger=csv", "trainer.enable_progress_bar=false", *overrides])


def run_cli(*args: str, cwd: Path, timeout: int = 300) -> subprocess.CompletedProcess:
    env = {**os.environ, "GRIDGEN_ROOT": str(cwd), "PYTHONUNBUFFERED": "1"}
    return subprocess.run([sys.executable, "-m", "gridgen.train", *args], cwd=cwd, env=env, capture_output=True,
                          text=True, timeout=timeout)


# ---- alpha schedule -------------------------------------------------------------------------------------
def test_alpha_schedule_shapes():
    assert [alpha_at(s, 0.5, delay_steps=2, ramp_steps=4) for s in range(8)] == [0, 0, 0, 0.125, 0.25, 0.375, 0.5, 0.5]
    assert alpha_at(3, 0.5, 0, 10, "constant") == 0.5
    cos = [alpha_at(s, 1.0, 0, 4, "cosine") for s in range(5)]
    assert cos[0] == 0 and cos[2] == pytest.approx(0.5) and cos[4] == pytest.approx(1.0) and cos[1] < 0.25
    with pytest.raises(ValueError, match="alpha.shape must be one of"):
        AlphaSchedule(shape="step")


# ---- composition ----------------------------------------------------------------------------------------
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


# ---- module: trainable parameters, checkpoints, export -------------------------------------------------
@pytest.fixture(scope="module")
def trained_run(tmp_path_factory):
    """A 4-step run with a large learning rate so the LoRA moves visibly."""
    tmp = tmp_path_factory.mktemp("run")
    cfg = make_cfg(tmp, "trainer.max_steps=4", "optim.lr=1e-2", "lora.rank=4", "callbacks.checkpoint.every_n_train_steps=2")
    metrics = train(cfg)
    return tmp / "run", cfg, metrics


def expected_lora_parameters(transformer: torch.nn.Module, rank: int, targets: list[str]) -> tuple[int, set[str]]:
    """r * (d_in + d_out) for every targeted Linear inside the two FLUX block types, by a plain walk."""
    total, names = 0, set()
    for name, mod in transformer.named_modules():
        parts = name.split(".")
        if len(parts) < 3 or parts[0] not in FLUX_BLOCKS or not parts[1].isdigit():
            continue
        if ".".join(parts[2:]) in targets and isinstance(mod, torch.nn.Linear):
            total += rank * (mod.in_features + mod.out_features)
            names.add(name)
    return total, names


def test_only_lora_trains_and_count_is_exact(trained_run):
    run, cfg, _ = trained_run
    base = load_flux_pipeline(ensure_tiny_flux()).transformer
    total, names = expected_lora_parameters(base, cfg.lora.rank, list(cfg.lora.target_modules))
    assert any(n.startswith("single_transformer_blocks") and n.endswith("proj_out") for n in names)
    summary = (run / "summary.json").read_text()
    assert f'"trainable_parameters": {total}' in summary
    state, header = read_lora_file(run / "lora")
    assert {k.rsplit(".lora_", 1)[0] for k in state} == names  # exactly the targeted modules, no final proj_out
    assert header["gridgen_rank"] == "4" and header["gridgen_stage"] == "coarse" and "gridgen_config_hash" in header


def test_checkpoint_holds_only_lora_and_optimizer_state(trained_run):
    run, cfg, _ = trained_run
    ckpt = torch.load(run / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=False)
    state, _ = read_lora_file(run / "lora")
    expected = {"transformer." + k.replace(".lora_A.weight", ".lora_A.default.weight")
                .replace(".lora_B.weight", ".lora_B.default.weight") for k in state}
    assert set(ckpt["state_dict"]) == expected  # nothing frozen saved
    assert ckpt["global_step"] == 4 and len(ckpt["optimizer_states"]) == 1 and ckpt["lr_schedulers"]
    n_lora = sum(v.numel() for v in ckpt["state_dict"].values())
    assert len(ckpt["optimizer_states"][0]["state"]) == len(expected)
    assert n_lora < 0.5 * sum(p.numel() for p in load_flux_pipeline(ensure_tiny_flux()).transformer.parameters())


def test_exported_lora_is_readable_like_the_checkpoints(trained_run):
    run, _, _ = trained_run
    export = (run / "lora" / "pytorch_lora_weights.safetensors").stat().st_mode & 0o777
    assert export == (run / "checkpoints" / "last.ckpt").stat().st_mode & 0o777 == 0o666 & ~current_umask()


def current_umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def test_export_loads_in_diffusers_and_matches(trained_run):
    run, cfg, _ = trained_run
    from gridgen.training.module import GridModule

    module = GridModule(model=cfg.model, lora=cfg.lora, optim=cfg.optim, loss=cfg.loss, init_lora=str(run / "lora"))
    module.configure_model()  # gridgen's adapted transformer, weights from the export

    pipe = FluxPipeline.from_pretrained(ensure_tiny_flux())
    gen = torch.Generator().manual_seed(0)
    inputs = dict(hidden_states=torch.randn(1, 64, 64, generator=gen), timestep=torch.tensor([0.7]),
                  guidance=torch.tensor([3.5]), pooled_projections=torch.randn(1, 32, generator=gen),
                  encoder_hidden_states=torch.randn(1, 8, 32, generator=gen), txt_ids=torch.zeros(8, 3),
                  img_ids=torch.zeros(64, 3), return_dict=False)
    with torch.no_grad():
        before = pipe.transformer(**inputs)[0]
        pipe.load_lora_weights(run / "lora")
        diffusers_out = pipe.transformer(**inputs)[0]
        ours = module.transformer.eval()(**inputs)[0]
    assert (diffusers_out - before).abs().max() > 1e-4  # the LoRA changes the output ...
    torch.testing.assert_close(diffusers_out, ours, rtol=1e-5, atol=1e-6)  # ... identically in both


def test_resume_continues_step_alpha_and_lr(tmp_path, trained_run):
    run, _, metrics = trained_run
    cfg = make_cfg(tmp_path, "trainer.max_steps=6", "optim.lr=1e-2", "lora.rank=4", "callbacks.alpha.ramp_steps=4",
                   f"ckpt_path={run / 'checkpoints' / 'step000002.ckpt'}")
    resumed = train(cfg)
    ckpt = torch.load(tmp_path / "run" / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=False)
    assert ckpt["global_step"] == 6
    # alpha at the last step (5) of a 4-step ramp to 0.5 is 0.5; step 5 was taken, so the schedule continued
    assert resumed["train/alpha"] == pytest.approx(0.5)
    def rows(folder):
        with (folder / "metrics" / "metrics.csv").open(newline="") as file:
            return [{k: v for k, v in r.items() if v} for r in csv.DictReader(file) if r["step"]]

    parent, child = rows(run), rows(tmp_path / "run")
    before = [r for r in child if int(r["step"]) < 2]
    assert before == [r for r in parent if int(r["step"]) < 2]  # the parent's history before the checkpoint ...
    assert {int(r["step"]) for r in child if r not in before} >= {4, 5}  # ... then its own, no step re-run
    assert (run / "metrics" / "metrics.csv").stat().st_mtime < (tmp_path / "run" / "parent.json").stat().st_mtime


@pytest.mark.parametrize("task", TASKS)
def test_every_stage_runs_and_fine_starts_from_coarse_lora(tmp_path, task):
    runs = tmp_path / "outputs" / "runs"
    fine = make_cfg(tmp_path, "stage=fine", f"task={task}", "trainer.max_steps=2", "lora.rank=4",
                    f"paths.output_dir={runs / 'f'}")
    with pytest.raises(FileNotFoundError, match=f"make curriculum task={task}"):
        train(fine)  # no coarse LoRA yet
    coarse = make_cfg(tmp_path, f"task={task}", "trainer.max_steps=2", "optim.lr=1e-2", "lora.rank=4",
                      f"paths.output_dir={runs / 'c'}")
    train(coarse)
    train(fine)
    coarse_file = runs / "c" / "lora" / "pytorch_lora_weights.safetensors"
    _, header = read_lora_file(runs / "f" / "lora")
    assert header["gridgen_stage"] == "fine" and header["gridgen_task"] == task
    assert header["gridgen_init_lora"] == str(coarse_file)
    ckpt = torch.load(runs / "f" / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=True)
    assert ckpt["hyper_parameters"]["init_lora"] == str(coarse_file)


# ---- the command line ----------------------------------------------------------------------------------
def test_cli_default_run_with_offline_wandb(tmp_path):
    from tests.helpers.wandb_offline import summarise

    proc = run_cli("trainer.max_steps=6", "trainer.enable_progress_bar=false", f"hydra.run.dir={tmp_path}/run",
                   "data.val_shards=${data.train_shards}", "trainer.limit_val_batches=1", "trainer.val_check_interval=6",
                   "callbacks.samples.steps=2", cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    run = tmp_path / "run"
    for line in ("run folder", "config", "metrics", "checkpoints", "LoRA export"):
        assert re.search(rf"^{line}\s+\S", proc.stdout, re.M), proc.stdout
    assert (run / "config.yaml").is_file() and (run / "lora" / "pytorch_lora_weights.safetensors").is_file()
    assert (run / "checkpoints" / "last.ckpt").is_file() and (run / "metrics" / "metrics.csv").is_file()
    wandb_file = next(run.glob("wandb/offline-run-*/run-*.wandb"))
    info = summarise(wandb_file)
    assert {"train/loss", "train/loss_base", "train/loss_flow", "train/alpha", "train/grad_norm", "lr-AdamW",
            "train/device/samples_per_sec", "train/device/items_per_sec", "val/loss_base", "samples/grid",
            "samples/video"} <= info["keys"]
    assert "stage:coarse" in info["tags"]


def test_cli_multirun_sweep_over_rank(tmp_path):
    sweep = tmp_path / "sweep"
    proc = run_cli("-m", "lora.rank=2,4", "trainer.max_steps=2", "trainer.enable_progress_bar=false",
                   "callbacks.checkpoint.every_n_train_steps=2", f"hydra.sweep.dir={sweep}", cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    for rank in (2, 4):
        run = sweep / f"lora.rank={rank}"
        _, header = read_lora_file(run / "lora")
        assert header["gridgen_rank"] == str(rank)
        from tests.helpers.wandb_offline import summarise
        assert summarise(next(run.glob("wandb/offline-run-*/run-*.wandb")))["group"] == "sweep"
    summary = (sweep / "sweep_summary.md").read_text()  # written by the SweepReport Hydra callback
    assert "| lora.rank=2 | 2 |" in summary and "| lora.rank=4 | 4 |" in summary


@pytest.mark.parametrize("args, message", [
    (["lora.rank=0"], "lora.rank must be a positive integer, got 0"),
    (["model.pretrained=/nonexistent/flux"], "'/nonexistent/flux' does not exist"),
    (["stage=fine", "stage.init_lora=/nonexistent/lora"], "stage.init_lora '/nonexistent/lora' does not exist"),
    (["data=shards", "data.train_shards=EMPTY"], "no shards"),
    (["lora.rnak=4"], "Could not override 'lora.rnak'"),
    (["+lora.rnak=4"], "'lora.rnak' is not a key gridgen knows, so it would be stored and ignored; did you mean lora.rank"),
    (["+trainer.bogus=1"], "'trainer.bogus' is not a key gridgen knows"),
    (["trainer.max_steps=4", "trainer.val_check_interval=10"], "would never validate"),
])
def test_cli_bad_input_is_one_clear_line(tmp_path, args, message):
    (tmp_path / "empty").mkdir()
    args = [a.replace("EMPTY", str(tmp_path / "empty")) for a in args]
    proc = run_cli(*args, "logger=none", f"hydra.run.dir={tmp_path}/run", cwd=tmp_path, timeout=120)
    assert proc.returncode != 0
    assert message in proc.stderr, proc.stderr[-2000:]
    if not args[0].startswith("lora.rnak"):  # ours: exactly one line, no traceback, no folder
        errors = [line for line in proc.stderr.splitlines() if line.startswith("gridgen.train: error:")]
        assert len(errors) == 1 and "Traceback" not in proc.stderr
        assert not (tmp_path / "run").exists()


@pytest.mark.parametrize("steps", [0, -1])
def test_a_step_count_that_trains_nothing_or_never_ends_is_refused(tmp_path, steps):
    with pytest.raises(ValueError, match=rf"trainer.max_steps={steps} trains nothing or never ends"):
        train(make_cfg(tmp_path, f"trainer.max_steps={steps}"))
    assert not (tmp_path / "run").exists()


def test_known_added_keys_are_accepted(tmp_path):
    """`+` for a parameter of a `_target_` class, a new callback with its own `_target_`, a key under a free-form
    node: composed and run (one step)."""
    proc = run_cli("+trainer.limit_train_batches=5", "+model.compile_options.mode=default", "trainer.max_steps=1",
                   "+callbacks.extra={_target_:lightning.pytorch.callbacks.Timer}", "logger=none",
                   "trainer.enable_progress_bar=false", f"hydra.run.dir={tmp_path}/run", cwd=tmp_path, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]


def test_ddp_two_processes_match_one_process_with_double_batch(tmp_path):
    """strategy=ddp on CPU (gloo, 2 processes, batch 2 each) == 1 process with batch 4, same LoRA."""
    script = HELPERS / "ddp_equivalence.py"
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    for devices, batch, name in ((2, 2, "ddp"), (1, 4, "single")):
        proc = subprocess.run([sys.executable, str(script), str(devices), str(batch), str(tmp_path / name)],
                              env=env, cwd=tmp_path, capture_output=True, text=True, timeout=300)
        assert proc.returncode == 0, proc.stderr[-3000:]
    ddp, _ = read_lora_file(tmp_path / "ddp")
    single, _ = read_lora_file(tmp_path / "single")
    # B starts at zero, so |B| is the size of the training update; DDP's all-reduce sums in another order, so
    # allow float32 noise of 0.1% of the update (a per-rank noise or a wrong gradient average moves it ~100%).
    update = max(v.abs().max().item() for k, v in single.items() if "lora_B" in k)
    assert update > 1e-3  # the LoRA moved
    assert ddp.keys() == single.keys()
    for key in single:
        torch.testing.assert_close(ddp[key], single[key], rtol=0, atol=1e-3 * update, msg=key)


def test_slurm_launcher_config_composes(tmp_path):
    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        cfg = compose("train", overrides=["hydra/launcher=slurm", "hydra.launcher.nodes=2", "strategy=ddp",
                                           "trainer.devices=8", "trainer.num_nodes=2"], return_hydra_config=True)
    launcher = cfg.hydra.launcher
    assert launcher._target_ == "hydra_plugins.hydra_submitit_launcher.submitit_launcher.SlurmLauncher"
    assert (launcher.nodes, launcher.gpus_per_node, launcher.tasks_per_node) == (2, 8, 8)
    assert cfg.trainer.num_nodes == 2 and cfg.trainer.strategy._target_.endswith("DDPStrategy")


PRESETS = ("video_coarse", "video_fine", "i2v", "multiview", "multiview_ef")


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


def test_unknown_experiment_lists_the_available_ones(tmp_path):
    proc = run_cli("experiment=nope", cwd=tmp_path, timeout=120)
    assert proc.returncode != 0
    assert "Could not find 'experiment/nope'" in proc.stderr
    for name in PRESETS:
        assert name in proc.stderr


def test_resume_mid_epoch_ends_with_the_uninterrupted_lora(tmp_path):
    """Kill-and-resume: from a mid-epoch checkpoint the run continues at the same step, alpha, LR and data
    position (epoch counters restored, consumed batches skipped) and ends with the same LoRA."""
    common = ["trainer.max_steps=7", "optim.lr=1e-2", "lora.rank=4", "data.samples_per_epoch=6",  # 3 batches/epoch
              "callbacks.checkpoint.every_n_train_steps=4", "optim.scheduler=cosine"]
    train(make_cfg(tmp_path / "a", *common))
    straight, _ = read_lora_file(tmp_path / "a" / "run" / "lora")
    ckpt = tmp_path / "a" / "run" / "checkpoints" / "step000004.ckpt"  # epoch 1, one batch into it
    train(make_cfg(tmp_path / "b", *common, f"ckpt_path={ckpt}"))
    resumed, _ = read_lora_file(tmp_path / "b" / "run" / "lora")
    restarted = torch.load(tmp_path / "b" / "run" / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=True)
    assert restarted["global_step"] == 7
    for key in straight:
        torch.testing.assert_close(resumed[key], straight[key], rtol=0, atol=1e-6, msg=key)


def test_crash_during_checkpoint_write_keeps_the_previous_one(trained_run, monkeypatch):
    """Checkpoints go through Lightning's TorchCheckpointIO (serialise, then an fsspec transaction that writes a
    temporary file and moves it into place): a write that dies half-way leaves last.ckpt loadable."""
    import fsspec.implementations.local as local
    from lightning.fabric.plugins.io.torch_io import TorchCheckpointIO

    run, _, _ = trained_run
    path = run / "checkpoints" / "last.ckpt"
    before = torch.load(path, map_location="cpu", weights_only=True)
    files = sorted(p.name for p in path.parent.iterdir())
    original_write = local.LocalFileOpener.write

    def dying_write(self, data):
        original_write(self, data[: len(data) // 2])
        raise OSError("disk full")

    monkeypatch.setattr(local.LocalFileOpener, "write", dying_write)
    with pytest.raises(OSError, match="disk full"):
        TorchCheckpointIO().save_checkpoint({**before, "global_step": 999}, path)
    monkeypatch.undo()
    after = torch.load(path, map_location="cpu", weights_only=True)
    assert after["global_step"] == before["global_step"] == 4
    assert sorted(p.name for p in path.parent.iterdir()) == files  # no half-written file left behind


def test_sweep_over_a_key_that_does_not_exist(tmp_path):
    proc = run_cli("-m", "lora.rnk=4,8", f"hydra.sweep.dir={tmp_path}/sweep", cwd=tmp_path, timeout=120)
    assert proc.returncode != 0
    assert "Could not override 'lora.rnk'" in proc.stderr and "Key 'rnk' is not in struct" in proc.stderr
    assert not list((tmp_path / "sweep").glob("lora.rnk=*"))  # no job ran
