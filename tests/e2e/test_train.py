"""`python -m gridgen.train` as a user runs it: the default run with offline W&B, a sweep, the console, bad
input as one line and exit 2 (configs, data, caches), FSDP2 checkpoints that resume."""

from __future__ import annotations

import re

import pytest
import torch

from gridgen.models.lora import read_lora_file
from tests.helpers.shards import grid_with_cells, write_shard
from tests.helpers.train import PRESETS, run_cli


@pytest.mark.slow  # the README's `make train` runs the default with offline W&B in CI
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


@pytest.mark.slow  # the README's `python -m gridgen.train -m lora.rank=4,8,16` runs in CI
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


# each a subprocess (~12 s): three kinds in CI (a gridgen value, a Hydra override, an unknown key), the rest slow
SLOW = pytest.mark.slow


@pytest.mark.parametrize("args, message", [
    (["lora.rank=0"], "lora.rank must be a positive integer, got 0"),
    pytest.param(["model.pretrained=/nonexistent/flux"], "'/nonexistent/flux' does not exist", marks=SLOW),
    pytest.param(["stage=fine", "stage.init_lora=/nonexistent/lora"], "stage.init_lora '/nonexistent/lora' does not exist", marks=SLOW),
    pytest.param(["data=shards", "data.train_shards=EMPTY"], "no shards", marks=SLOW),
    (["lora.rnak=4"], "Could not override 'lora.rnak'"),
    (["+lora.rnak=4"], "'lora.rnak' is not a key gridgen knows, so it would be stored and ignored; did you mean lora.rank"),
    pytest.param(["+trainer.bogus=1"], "'trainer.bogus' is not a key gridgen knows", marks=SLOW),
    pytest.param(["trainer.max_steps=4", "trainer.val_check_interval=10"], "would never validate", marks=SLOW),
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


def test_known_added_keys_are_accepted(tmp_path):
    """`+` for a parameter of a `_target_` class, a new callback with its own `_target_`, a key under a free-form
    node: composed and run (one step)."""
    proc = run_cli("+trainer.limit_train_batches=5", "+model.compile_options.mode=default", "trainer.max_steps=1",
                   "+callbacks.extra={_target_:lightning.pytorch.callbacks.Timer}", "logger=none",
                   "trainer.enable_progress_bar=false", f"hydra.run.dir={tmp_path}/run", cwd=tmp_path, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]


@pytest.mark.slow  # a subprocess (~15 s); bad-input lines stay in CI
def test_unknown_experiment_lists_the_available_ones(tmp_path):
    proc = run_cli("experiment=nope", cwd=tmp_path, timeout=120)
    assert proc.returncode != 0
    assert "Could not find 'experiment/nope'" in proc.stderr
    for name in PRESETS:
        assert name in proc.stderr


@pytest.mark.slow  # a subprocess (~16 s); the key check runs in CI through test_cli_bad_input
def test_sweep_over_a_key_that_does_not_exist(tmp_path):
    proc = run_cli("-m", "lora.rnk=4,8", f"hydra.sweep.dir={tmp_path}/sweep", cwd=tmp_path, timeout=120)
    assert proc.returncode != 0
    assert "Could not override 'lora.rnk'" in proc.stderr and "Key 'rnk' is not in struct" in proc.stderr
    assert not list((tmp_path / "sweep").glob("lora.rnk=*"))  # no job ran


def test_console_one_bar_with_both_losses_and_no_library_noise(tmp_path):
    """The default command's console (W&B logger included): the embedded model's notice first, one bar showing
    L_base, L_flow and alpha, one s/step figure shared by bar and log line, log lines above the bar (never
    inside it), no validation bars, none of the libraries' known noise."""
    proc = run_cli("trainer.max_steps=4", "trainer.log_every_n_steps=2", "trainer.val_check_interval=4",
                   "callbacks.progress_log.cpu_notice_after_s=0", cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    out = proc.stdout + proc.stderr
    first = next(line for line in out.splitlines() if line.strip())
    assert "tiny FLUX with random weights" in first and "colour noise by design" in first, first
    for noise in ("anonymous setting", "litlogger", "LeafSpec", "TPU available", "Run history", "v_num", "Epoch",
                  "Validation", "Training:", "Loading pipeline components", "Loading weights"):
        assert noise not in out, noise
    # the expected duration from the steps after the first (which carries one-time costs such as compilation)
    assert re.search(r"a step takes [\d.]+ s on CPU \(the first 3 steps, with one-time costs, [\d.]+ s\): the 4 "
                     r"steps of this run will take about \d+:\d\d", out), out[-3000:]
    # every log line starts a line of its own: tqdm clears the bar before writing it
    for match in re.finditer(r"\[\d{4}-\d\d-\d\d [\d:,]+\]\[", proc.stdout):
        before = proc.stdout[:match.start()]
        tail = before[max(before.rfind("\n"), before.rfind("\r")) + 1:]
        assert not tail.strip(), f"log line inside the bar: {tail!r}"
    bars = re.findall(r"step 4/4 \|[^|]*\| (L_base [\d.]+  L_flow [\d.]+  alpha [\d.]+  s/step ([\d.]+)  eta 0:00)",
                      proc.stdout)
    logged = re.findall(r"step 4/4  (L_base [\d.]+  L_flow [\d.]+  alpha [\d.]+  s/step ([\d.]+)  eta 0:00)", out)
    assert bars and logged, out[-3000:]
    assert bars[-1] == logged[-1]  # the same figures, the same s/step
    assert "W&B run        " in proc.stdout and "wandb sync" in proc.stdout


def test_bad_weights_on_the_command_line(tmp_path):
    from tests.helpers.train import run_cli

    proc = run_cli("data=shards", f"data.train_shards=[{tmp_path},{tmp_path}]", "data.weights=[1]", "logger=none",
                   f"hydra.run.dir={tmp_path}/run", cwd=tmp_path, timeout=120)
    assert proc.returncode == 2
    errors = [line for line in proc.stderr.splitlines() if line.startswith("gridgen.train: error:")]
    assert errors == ["gridgen.train: error: data.weights has 1 value(s) for 2 data.train_shards entries; give one "
                      "weight per shard spec, e.g. data.weights=[1,1]"], proc.stderr[-2000:]
    assert "Traceback" not in proc.stderr


@pytest.mark.slow  # the same refusal is checked in process in CI (tests/data/test_datamodule.py)
def test_cells_flux_cannot_take_on_the_command_line(video_samples, tmp_path):
    from tests.helpers.train import run_cli

    write_shard(tmp_path / "shards" / "train-000000.tar", [grid_with_cells(s, 30) for s in video_samples])
    proc = run_cli("data=shards", f"data.train_shards={tmp_path / 'shards'}", "logger=csv", "trainer.max_steps=1",
                   f"hydra.run.dir={tmp_path}/run", cwd=tmp_path, timeout=300)
    assert proc.returncode == 2, proc.stderr[-3000:]
    errors = [line for line in proc.stderr.splitlines() if line.startswith("gridgen.train: error:")]
    assert len(errors) == 1 and "Traceback" not in proc.stderr, proc.stderr[-3000:]
    assert "train-000000.tar': none of its first 4 samples" in errors[0] and "multiple of 16 px" in errors[0]


def test_stale_cache_on_the_command_line(built, tmp_path):
    out, _ = built
    proc = run_cli("data.cached=true", f"data.train_shards={out}", "model.max_sequence_length=16", "logger=none",
                   f"hydra.run.dir={tmp_path}/run", cwd=tmp_path, timeout=120)
    assert proc.returncode == 2
    errors = [line for line in proc.stderr.splitlines() if line.startswith("gridgen.train: error:")]
    assert len(errors) == 1 and "Traceback" not in proc.stderr, proc.stderr[-2000:]
    assert "model.max_sequence_length=32" in errors[0] and "make cache" in errors[0]


@pytest.mark.slow  # ~50 s on 2 cores; CI keeps FSDP2's 2-process equivalence test
def test_fsdp2_checkpoint_is_lora_only_and_resumes(tmp_path):
    common = ["strategy=fsdp", "trainer.accelerator=cpu", "trainer.devices=2", "trainer.strategy.param_dtype=null",
              "lora.rank=4", "optim.lr=1e-2", "callbacks.checkpoint.every_n_train_steps=2", "logger=csv",
              "trainer.enable_progress_bar=false", "model.dtype=float32"]
    first = run_cli("trainer.max_steps=4", *common, cwd=tmp_path)
    assert first.returncode == 0, first.stderr[-3000:]
    (run,) = (tmp_path / "outputs" / "runs").glob("*/*")
    ckpt = torch.load(run / "checkpoints" / "step000002.ckpt", map_location="cpu", weights_only=True)
    assert ckpt["state_dict"] and all("lora_" in k for k in ckpt["state_dict"])  # LoRA tensors only, whole
    straight, _ = read_lora_file(run / "lora")
    resumed = run_cli("trainer.max_steps=4", *common, f"ckpt_path={run / 'checkpoints' / 'step000002.ckpt'}",
                      "hydra.run.dir=" + str(tmp_path / "resumed"), cwd=tmp_path)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    again, _ = read_lora_file(tmp_path / "resumed" / "lora")
    for key in straight:
        torch.testing.assert_close(again[key], straight[key], rtol=0, atol=1e-6, msg=key)
