"""A training command that goes wrong: a non-finite loss, checkpoints from strangers, resume in the run's own
folder, a finished run never changed by a later command, SIGTERM, and no folder for a run that never trained."""

import csv
import hashlib
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from tests.helpers.train import run_cli


def one_line_error(proc: subprocess.CompletedProcess) -> str:
    assert proc.returncode == 2, proc.stderr[-3000:]
    assert "Traceback" not in proc.stderr, proc.stderr[-3000:]
    lines = [line for line in proc.stderr.splitlines() if line.startswith("gridgen.train: error:")]
    assert len(lines) == 1, proc.stderr[-3000:]
    return lines[0]


def test_huge_learning_rate_is_one_line_exit_2(tmp_path):
    proc = run_cli("trainer.max_steps=6", "optim.lr=1e30", "logger=csv", "trainer.enable_progress_bar=false",
                   cwd=tmp_path)
    line = one_line_error(proc)
    assert "non-finite" in line and "optim.lr" in line, line


class _Payload:
    def __init__(self, marker: str) -> None:
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


@pytest.mark.parametrize("kind", [pytest.param("garbage", marks=pytest.mark.slow),  # ~14 s each: the pickle
                                  pytest.param("truncated", marks=pytest.mark.slow), "pickle"])  # one in CI
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


@pytest.mark.slow  # two subprocesses (~25 s); a failed generate/train leaving no folder stays in CI
def test_a_run_that_never_trained_leaves_no_folder_and_no_wandb_run(tmp_path):
    for bad in ("model.pretrained=/no/such/model", "data.train_shards=/no/such/shards"):
        proc = run_cli("trainer.max_steps=2", bad, cwd=tmp_path)  # the default logger: W&B (offline)
        one_line_error(proc)
    assert not list(tmp_path.glob("outputs/runs/*/*")) and not list(tmp_path.rglob("wandb"))
    assert not (tmp_path / "outputs").exists()  # nor the empty outputs/runs/<date> above it
