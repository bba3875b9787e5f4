"""A run that goes wrong: the non-finite guard, corrupt checkpoints, resume in the run's own folder, the
fine stage's choice of coarse LoRA, failed runs' folders, progress output, the attention backend."""

import csv
import hashlib
import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from hydra import compose, initialize_config_dir

from gridgen.config import CONF_DIR
from gridgen.models.attention import (
    apply_attention_backend,
    resolve_attention_backend,
    sdpa_kernels,
    set_sdpa_kernels,
)
from gridgen.models.lora import read_lora_file
from gridgen.train import train
from gridgen.training.module import GridModule, NonFiniteError
from tests.helpers.paths import HELPERS

ROOT = Path(__file__).resolve().parents[1]


def make_cfg(tmp: Path, *overrides: str):
    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        return compose("train", overrides=[f"paths.root_dir={tmp}", f"paths.output_dir={tmp}/run", "logger=csv",
                                           "trainer.enable_progress_bar=false", "trainer.limit_val_batches=0",
                                           *overrides])


def run_cli(*args: str, cwd: Path, timeout: int = 300) -> subprocess.CompletedProcess:
    env = {**os.environ, "GRIDGEN_ROOT": str(cwd), "PYTHONUNBUFFERED": "1"}
    return subprocess.run([sys.executable, "-m", "gridgen.train", *args], cwd=cwd, env=env, capture_output=True,
                          text=True, timeout=timeout)


def one_line_error(proc: subprocess.CompletedProcess) -> str:
    assert proc.returncode == 2, proc.stderr[-3000:]
    assert "Traceback" not in proc.stderr, proc.stderr[-3000:]
    lines = [line for line in proc.stderr.splitlines() if line.startswith("gridgen.train: error:")]
    assert len(lines) == 1, proc.stderr[-3000:]
    return lines[0]


# ---- non-finite guard -----------------------------------------------------------------------------------
def nan_at_step(monkeypatch, bad_step: int) -> None:
    original = GridModule.compute_losses

    def patched(self, batch, fixed_t=None):
        out = original(self, batch, fixed_t)
        if fixed_t is None and self.global_step == bad_step:
            out["loss_flow"] = out["loss_flow"] * float("nan")
            out["loss"] = out["loss_base"] + self.alpha * out["loss_flow"]
        return out

    monkeypatch.setattr(GridModule, "compute_losses", patched)


def test_nonfinite_loss_stops_the_run_and_keeps_the_last_checkpoint(tmp_path, monkeypatch):
    nan_at_step(monkeypatch, 3)
    cfg = make_cfg(tmp_path, "trainer.max_steps=6", "lora.rank=4", "optim.lr=1e-2",
                   "callbacks.checkpoint.every_n_train_steps=2")
    with pytest.raises(NonFiniteError, match=r"step 3: non-finite loss_flow=nan.*attention_backend"):
        train(cfg)
    run = tmp_path / "run"
    last = torch.load(run / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=True)
    assert last["global_step"] == 2
    assert all(torch.isfinite(v).all() for v in last["state_dict"].values())
    assert not (run / "lora").exists()  # nothing exported from a broken run
    assert (run / "FAILED").read_text().startswith("NonFiniteError: step 3")


def test_nonfinite_skip_drops_that_update_only(tmp_path, monkeypatch):
    nan_at_step(monkeypatch, 3)
    cfg = make_cfg(tmp_path, "trainer.max_steps=5", "lora.rank=4", "optim.lr=1e-2", "nonfinite.action=skip",
                   "nonfinite.max_skips=1", "callbacks.checkpoint.every_n_train_steps=5")
    train(cfg)
    last = torch.load(tmp_path / "run" / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=True)
    assert last["global_step"] == 5 and last["gridgen_nonfinite_skips"] == 1
    adam_steps = {float(s["step"]) for s in last["optimizer_states"][0]["state"].values()}
    assert adam_steps == {4.0}  # 5 steps, one update skipped: no moment/step change at step 3
    lora, _ = read_lora_file(tmp_path / "run" / "lora")
    assert all(torch.isfinite(v).all() for v in lora.values())


def test_huge_learning_rate_is_one_line_exit_2(tmp_path):
    proc = run_cli("trainer.max_steps=6", "optim.lr=1e30", "logger=csv", "trainer.enable_progress_bar=false",
                   cwd=tmp_path)
    line = one_line_error(proc)
    assert "non-finite" in line and "optim.lr" in line, line


# ---- checkpoints from strangers -------------------------------------------------------------------------
class _Payload:
    def __init__(self, marker: str) -> None:
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


@pytest.mark.parametrize("kind", ["garbage", "truncated", "pickle"])
def test_bad_checkpoint_is_one_line_and_never_unpickled(tmp_path, kind):
    marker = tmp_path / "pwned"
    ckpt = tmp_path / "bad.ckpt"
    if kind == "garbage":
        ckpt.write_bytes(os.urandom(4096))
    elif kind == "truncated":
        torch.save({"state_dict": {"w": torch.ones(1000)}, "global_step": 2}, ckpt)
        ckpt.write_bytes(ckpt.read_bytes()[:700])
    else:
        torch.save({"state_dict": {}, "global_step": 1, "x": _Payload(str(marker))}, ckpt)
    proc = run_cli("trainer.max_steps=2", f"ckpt_path={ckpt}", "logger=csv", cwd=tmp_path)
    line = one_line_error(proc)
    assert str(ckpt) in line, line
    assert not marker.exists()
    assert not list((tmp_path / "outputs" / "runs").glob("*/*"))  # no orphan run folder


# ---- resume: an unfinished run continues in place, a finished one is never changed -----------------------
def tree_hashes(folder: Path) -> dict[str, str]:
    return {str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob("*")) if p.is_file()}


def test_unfinished_run_resumes_in_its_own_folder(tmp_path):
    common = ["lora.rank=4", "callbacks.checkpoint.every_n_train_steps=2", "trainer.enable_progress_bar=false"]
    first = run_cli("trainer.max_steps=4", "trainer.log_every_n_steps=1", *common, cwd=tmp_path)
    assert first.returncode == 0, first.stderr[-3000:]
    (run,) = (tmp_path / "outputs" / "runs").glob("*/*")
    for name in ("summary.json", "lora/pytorch_lora_weights.safetensors"):
        (run / name).unlink()  # what a run killed before its end lacks
    typo = run_cli("trainer.max_steps=6", *common, f"ckpt_path={run / 'checkpoints' / 'step02.ckpt'}", cwd=tmp_path)
    assert "is not a checkpoint file" in one_line_error(typo)
    before = tree_hashes(run)
    rank = run_cli("trainer.max_steps=6", *common, "lora.rank=8", f"ckpt_path={run}", cwd=tmp_path)
    assert "lora.rank=4 in the checkpoint, 8 now" in one_line_error(rank)
    assert tree_hashes(run) == before  # a failed resume in place removes what it added (Hydra's files, log)
    wandb_before = {p.name.rsplit("-", 1)[-1] for p in run.glob("wandb/offline-run-*")}
    resumed = run_cli("trainer.max_steps=6", "trainer.log_every_n_steps=1", *common, f"ckpt_path={run}", cwd=tmp_path)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert list((tmp_path / "outputs" / "runs").glob("*/*")) == [run]  # no second folder
    assert f"run folder     {run}" in resumed.stdout
    assert (run / "lora" / "pytorch_lora_weights.safetensors").is_file()
    assert "ckpt_path: null" in (run / "config.yaml").read_text()  # the run's own config is kept ...
    assert str(run) in (run / "config.resume-step4.yaml").read_text()  # ... the resume's beside it
    assert len(list(run.glob(".hydra/resume-*/config.yaml"))) == 1  # Hydra's files of the resume apart
    last = torch.load(run / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=True)
    assert last["global_step"] == 6
    rows = (run / "metrics" / "metrics.csv").read_text().splitlines()
    step_col = rows[0].split(",").index("step")
    steps = [int(r.split(",")[step_col]) for r in rows[1:] if r.split(",")[step_col]]
    assert min(steps) <= 1 and max(steps) >= 5  # rows before the checkpoint kept, the rest appended
    assert {p.name.rsplit("-", 1)[-1] for p in run.glob("wandb/offline-run-*")} == wandb_before  # same W&B run
    assert "not resumable" not in resumed.stderr


def test_a_finished_run_is_never_changed_by_a_later_command(tmp_path):
    """Every file of a finished run hashes the same after a resume with a changed rank, from a corrupt
    checkpoint, from an older checkpoint (which continues in a new folder naming its parent) and a killed resume."""
    common = ["lora.rank=4", "callbacks.checkpoint.every_n_train_steps=2", "trainer.enable_progress_bar=false",
              "logger=csv"]
    assert run_cli("trainer.max_steps=4", *common, cwd=tmp_path).returncode == 0
    runs = tmp_path / "outputs" / "runs"
    (run,) = runs.glob("*/*")
    before = tree_hashes(run)

    rank = run_cli("trainer.max_steps=6", *common, "lora.rank=8", f"ckpt_path={run / 'checkpoints' / 'step000002.ckpt'}",
                   cwd=tmp_path)
    assert "lora.rank=4 in the checkpoint, 8 now" in one_line_error(rank)
    done = run_cli("trainer.max_steps=4", *common, f"ckpt_path={run}", cwd=tmp_path)
    assert "nothing to train; set trainer.max_steps above 4" in one_line_error(done)

    # a corrupt last.ckpt of an unfinished run: resumed in place, so that folder must come back unchanged too
    other = tmp_path / "other"
    (other / "checkpoints").mkdir(parents=True)
    (other / "checkpoints" / "last.ckpt").write_bytes((run / "checkpoints" / "last.ckpt").read_bytes()[:5000])
    (other / "metrics.csv").write_text("step,loss\n0,1.0\n")
    other_before = tree_hashes(other)
    corrupt = run_cli("trainer.max_steps=6", *common, f"ckpt_path={other}", cwd=tmp_path)
    assert "cannot be read as a checkpoint" in one_line_error(corrupt)
    assert tree_hashes(other) == other_before and sorted(p.name for p in other.iterdir()) == ["checkpoints", "metrics.csv"]
    assert list(runs.glob("*/*")) == [run]  # no folder for the runs that never trained

    older = run_cli("trainer.max_steps=6", *common, f"ckpt_path={run / 'checkpoints' / 'step000002.ckpt'}", cwd=tmp_path)
    assert older.returncode == 0, older.stderr[-3000:]
    (child,) = set(runs.glob("*/*")) - {run}
    parent = json.loads((child / "parent.json").read_text())
    assert parent["parent_run"] == str(run) and parent["step"] == 2
    assert torch.load(child / "checkpoints" / "last.ckpt", weights_only=True)["global_step"] == 6
    rows = list(csv.DictReader((child / "metrics" / "metrics.csv").open()))
    steps = {int(r["step"]) for r in rows if r["step"]}
    assert min(steps) < 2 and max(steps) == 5  # the parent's rows before step 2, then its own

    env = {**os.environ, "GRIDGEN_ROOT": str(tmp_path), "PYTHONUNBUFFERED": "1"}
    killed = subprocess.Popen([sys.executable, "-m", "gridgen.train", "trainer.max_steps=400", *common,
                               f"ckpt_path={run}"], cwd=tmp_path, env=env, stdout=subprocess.DEVNULL,
                              stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 120
    while not any((p / "checkpoints" / "step000006.ckpt").exists() for p in runs.glob("*/*")):
        assert killed.poll() is None and time.monotonic() < deadline, "the resume did not reach step 6"
        time.sleep(0.2)
    killed.kill()
    killed.wait()
    assert tree_hashes(run) == before


def test_sigterm_marks_the_run_failed_with_a_reason(tmp_path):
    env = {**os.environ, "GRIDGEN_ROOT": str(tmp_path), "PYTHONUNBUFFERED": "1"}
    proc = subprocess.Popen([sys.executable, "-m", "gridgen.train", "trainer.max_steps=400", "lora.rank=4",
                             "logger=csv", "trainer.enable_progress_bar=false", "callbacks.checkpoint.every_n_train_steps=2"],
                            cwd=tmp_path, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 120
    while not list((tmp_path / "outputs" / "runs").glob("*/*/checkpoints/step000002.ckpt")):
        assert proc.poll() is None and time.monotonic() < deadline, proc.stderr.read()[-2000:]
        time.sleep(0.2)
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(timeout=120) == 128 + signal.SIGTERM
    (run,) = (tmp_path / "outputs" / "runs").glob("*/*")
    text = (run / "FAILED").read_text()
    assert text.startswith("SIGTERMException: stopped at step") and "SIGTERM" in text.split(":", 1)[1], text
    assert f"ckpt_path={run}" in text


def test_a_run_that_never_trained_leaves_no_folder_and_no_wandb_run(tmp_path):
    for bad in ("model.pretrained=/no/such/model", "data.train_shards=/no/such/shards"):
        proc = run_cli("trainer.max_steps=2", bad, cwd=tmp_path)  # the default logger: W&B (offline)
        one_line_error(proc)
    assert not list(tmp_path.glob("outputs/runs/*/*")) and not list(tmp_path.rglob("wandb"))
    assert not (tmp_path / "outputs").exists()  # nor the empty outputs/runs/<date> above it


# ---- fine stage: which coarse LoRA ----------------------------------------------------------------------
def test_init_lora_auto_matches_rank_and_skips_debug_and_unfinished_runs(tmp_path, caplog):
    runs = tmp_path / "outputs" / "runs"
    for name, extra in (("r4", ["lora.rank=4"]), ("r8", ["lora.rank=8"]), ("debug8", ["lora.rank=8", "debug_run=true"])):
        train(make_cfg(tmp_path, "trainer.max_steps=1", *extra, f"paths.output_dir={runs / name}"))
    unfinished = runs / "unfinished"
    train(make_cfg(tmp_path, "trainer.max_steps=1", "lora.rank=8", f"paths.output_dir={unfinished}"))
    (unfinished / "summary.json").unlink()
    (runs / "debug8" / "lora" / "pytorch_lora_weights.safetensors").touch()  # newest of all
    caplog.set_level("INFO", logger="gridgen.training.runs")
    fine = make_cfg(tmp_path, "stage=fine", "trainer.max_steps=1", "lora.rank=8", f"paths.output_dir={runs / 'fine'}")
    train(fine)
    _, meta = read_lora_file(runs / "fine" / "lora")
    assert meta["gridgen_init_lora"] == str(runs / "r8" / "lora" / "pytorch_lora_weights.safetensors")
    message = next(r.getMessage() for r in caplog.records if "starts from" in r.getMessage())
    assert "rank 4" in message and "debug run" in message and "unfinished run" in message, message
    with pytest.raises(FileNotFoundError, match="rank=16.*passed over"):
        train(make_cfg(tmp_path, "stage=fine", "trainer.max_steps=1", "lora.rank=16",
                       f"paths.output_dir={runs / 'fine16'}"))


# ---- progress ---------------------------------------------------------------------------------------------
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
    assert "on CPU: the 4 steps of this run will take about" in out
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


def test_step_timer_excludes_validation_and_the_first_step():
    from types import SimpleNamespace

    from gridgen.training.callbacks.timing import StepTimer

    clock = iter([0.0, 10.0, 11.0, 11.2, 15.2, 16.0, 16.0])  # start; step 1 (warm-up) ends at 10 s; a 4 s validation
    timer = StepTimer(smoothing=0.5)
    trainer = SimpleNamespace(global_step=0, max_steps=10)
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr("gridgen.training.callbacks.timing.time.perf_counter", lambda: next(clock))
        timer.on_train_start(trainer, None)
        for step, validate in ((1, False), (2, False), (3, True)):
            trainer.global_step = step
            if validate:
                timer.on_validation_start(trainer, None)
                timer.on_validation_end(trainer, None)
            timer.on_train_batch_end(trainer, None, None, None, step - 1)
    # step 2: 11.0 - 10.0 = 1 s (first timed: the mean); step 3: 16.0 - 11.0 - 4.0 (validation) = 1 s
    assert timer.seconds_per_step == pytest.approx(1.0)
    assert timer.eta(trainer) == pytest.approx(7.0)
    assert timer.mean_seconds_per_step == pytest.approx(1.0)  # the run summary's figure
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr("gridgen.training.callbacks.timing.time.perf_counter", lambda: 16.0)
        assert timer.training_time() == pytest.approx(12.0)  # throughput's clock: 16 s less the validation


# ---- attention backend ------------------------------------------------------------------------------------
@pytest.fixture
def sdpa_flags():
    """The process-global SDPA kernel flags, restored after the test."""
    saved = sdpa_kernels()
    yield
    set_sdpa_kernels(*saved)


def test_attention_backend_never_cudnn_by_default_on_cuda(sdpa_flags):
    assert resolve_attention_backend("auto", "cpu") == "sdpa"
    assert apply_attention_backend("auto", "cuda") == "sdpa_no_cudnn"
    assert sdpa_kernels() == (True, True, True, False)
    apply_attention_backend("sdpa_math", "cuda")
    assert sdpa_kernels() == (False, False, True, False)
    with pytest.raises(ValueError, match="model.attention_backend='nope' is unknown"):
        resolve_attention_backend("nope", "cuda")


def test_diffusers_attention_backend_is_set_on_the_transformer(tmp_path):
    cfg = make_cfg(tmp_path, "trainer.max_steps=1", "model.attention_backend=_native_math")
    train(cfg)
    assert "attention_backend: _native_math" in (tmp_path / "run" / "config.yaml").read_text()


def test_source_tree_import_without_pip_metadata(tmp_path):
    (tmp_path / "src" / "gridgen").mkdir(parents=True)  # a source tree that was never pip-installed
    for name in ("__init__.py", "_quiet.py"):
        (tmp_path / "src" / "gridgen" / name).write_text((ROOT / "src" / "gridgen" / name).read_text())
    code = "import sys; sys.path.insert(0, 'src'); import gridgen; print(gridgen.__version__)"
    proc = subprocess.run([sys.executable, "-S", "-c", code], cwd=tmp_path, capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0 and proc.stdout.strip() == "0.1.0+src", proc.stderr


# ---- FSDP2 ----------------------------------------------------------------------------------------------
def test_fsdp2_two_processes_match_one_process_with_clipping(tmp_path):
    """strategy=fsdp (FSDP2, gloo, 2 processes x batch 2) == 1 process x batch 4, with gradient clipping active
    (clip far below the gradient norm: a per-shard norm would clip each rank differently) and the LoRA
    gathered from both ranks' shards for the export."""
    script = HELPERS / "ddp_equivalence.py"
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    for devices, batch, name in ((2, 2, "fsdp"), (1, 4, "single")):
        proc = subprocess.run([sys.executable, str(script), str(devices), str(batch), str(tmp_path / name), "fsdp",
                               "1e-3"], env=env, cwd=tmp_path, capture_output=True, text=True, timeout=300)
        assert proc.returncode == 0, proc.stderr[-3000:]
    fsdp, _ = read_lora_file(tmp_path / "fsdp")
    single, _ = read_lora_file(tmp_path / "single")
    update = max(v.abs().max().item() for k, v in single.items() if "lora_B" in k)
    assert update > 1e-4 and fsdp.keys() == single.keys()
    for key in single:
        torch.testing.assert_close(fsdp[key], single[key], rtol=0, atol=1e-3 * update, msg=key)


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


# ---- throughput and MFU -----------------------------------------------------------------------------------
def test_throughput_logs_mfu_from_the_flops_formula(tmp_path):
    from gridgen.training.flops import training_flops_per_batch

    cfg = make_cfg(tmp_path, "trainer.max_steps=6", "trainer.log_every_n_steps=2", "lora.rank=4",
                   "callbacks.throughput.peak_tflops=0.001")
    train(cfg)
    rows = list(csv.DictReader((tmp_path / "run" / "metrics" / "metrics.csv").open()))
    logged = [r for r in rows if r.get("train/device/mfu")]
    assert logged, rows[0].keys()
    row = logged[-1]
    flops_per_sec = float(row["train/device/flops_per_sec"])
    # MFU is the measured FLOP/s over the configured peak; FLOP/s = batches/s x FLOPs per batch of the formula
    assert float(row["train/device/mfu"]) == pytest.approx(flops_per_sec / 1e9, rel=1e-6)
    module = GridModule(model=cfg.model, lora=cfg.lora, optim=cfg.optim, loss=cfg.loss, seed=0)
    module.configure_model()
    image_tokens = (4 * 32 // 16) * (4 * 32 // 16)  # the sample's 4x4 grids of 32 px cells: 16 px per token
    per_batch = training_flops_per_batch(module.transformer, 2, image_tokens, int(cfg.model.max_sequence_length))
    batches_per_sec = float(row["train/device/batches_per_sec"])
    assert flops_per_sec == pytest.approx(batches_per_sec * per_batch, rel=1e-6)


def test_export_formats_must_include_diffusers():
    from gridgen.training.callbacks import LoraExport

    with pytest.raises(ValueError, match=r"must include diffusers"):
        LoraExport("unused", formats=["kohya"])
    with pytest.raises(ValueError, match=r"lora.export_formats must list distinct formats"):
        LoraExport("unused", formats=["diffusers", "safetensor"])
    assert LoraExport("unused", formats=["diffusers", "kohya"]).formats == ["diffusers", "kohya"]


def test_sdpa_backend_resets_a_diffusers_backend(sdpa_flags):
    from diffusers import FluxTransformer2DModel

    from gridgen.embedded import TINY_FLUX_CONFIG

    transformer = FluxTransformer2DModel(**TINY_FLUX_CONFIG)
    apply_attention_backend("_native_math", "cpu", transformer)
    backends = {m.processor._attention_backend for m in transformer.modules() if hasattr(m, "processor")}
    assert backends == {"_native_math"}
    apply_attention_backend("sdpa_math", "cpu", transformer)
    backends = {m.processor._attention_backend for m in transformer.modules() if hasattr(m, "processor")}
    assert backends == {None} and sdpa_kernels() == (False, False, True, False)


# ---- bf16 on CPU: the dtype plumbing users run on GPUs ----------------------------------------------------
def test_bf16_mixed_and_true_train_finite_and_close_to_fp32(tmp_path):
    """The GPU suite checks bf16 on CUDA; here the same configs on CPU: a bf16 frozen base with fp32 LoRA
    weights (bf16-true) and autocast (bf16-mixed) train to finite losses close to fp32's."""
    common = ["trainer.max_steps=8", "lora.rank=4", "optim.lr=1e-3"]
    losses = {}
    for name, extra in (("fp32", []), ("bf16-mixed", ["trainer.precision=bf16-mixed"]),
                        ("bf16-base-mixed", ["model.dtype=bfloat16", "trainer.precision=bf16-mixed"]),  # flux_dev's
                        ("bf16-true", ["model.dtype=bfloat16", "trainer.precision=bf16-true"])):
        metrics = train(make_cfg(tmp_path / name, *common, *extra))
        losses[name] = metrics["train/loss_base"]
        lora, _ = read_lora_file(tmp_path / name / "run" / "lora")
        assert all(v.dtype == torch.float32 and torch.isfinite(v).all() for v in lora.values()), name
    for name in ("bf16-mixed", "bf16-base-mixed", "bf16-true"):
        assert losses[name] == pytest.approx(losses["fp32"], rel=0.05), losses


def test_bf16_true_resume_is_exact(tmp_path, monkeypatch):
    """bf16-true casts the module to bf16 after the checkpoint's LoRA is loaded; the fp32 LoRA must survive."""
    common = ["lora.rank=4", "optim.lr=1e-2", "model.dtype=bfloat16", "trainer.precision=bf16-true",
              "callbacks.checkpoint.every_n_train_steps=2"]
    train(make_cfg(tmp_path / "a", *common, "trainer.max_steps=2"))
    ckpt = tmp_path / "a" / "run" / "checkpoints" / "last.ckpt"
    saved = torch.load(ckpt, map_location="cpu", weights_only=True)["state_dict"]
    seen = {}
    original = GridModule.on_train_start

    def record(self):  # the weights the resumed run starts its first step from
        seen.update({k: v.detach().clone() for k, v in self.named_parameters() if v.requires_grad})
        return original(self)

    monkeypatch.setattr(GridModule, "on_train_start", record)
    train(make_cfg(tmp_path / "b", *common, f"ckpt_path={ckpt}", "trainer.max_steps=3"))
    assert saved.keys() == seen.keys()
    for key, value in saved.items():
        assert value.dtype == torch.float32 and seen[key].dtype == torch.float32, key
        torch.testing.assert_close(seen[key], value, rtol=0, atol=0, msg=key)
