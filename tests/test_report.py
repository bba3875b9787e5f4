"""Offline reports from run and sweep folders (no W&B)."""

import json
import subprocess
import sys

import pytest

from gridgen.report import read_metrics, report, report_sweep


def fake_run(folder, rank, losses):
    (folder / "metrics").mkdir(parents=True)
    rows = ["epoch,lr-AdamW,step,train/alpha,train/loss,train/loss_base,train/loss_flow"]
    for step, (base, flow) in enumerate(losses):
        alpha = 0.5 * step / max(1, len(losses) - 1)
        rows.append(f"0,0.0001,{step},{alpha},{base + alpha * flow},{base},{flow}")
    (folder / "metrics" / "metrics.csv").write_text("\n".join(rows) + "\n")
    (folder / "config.yaml").write_text(f"lora:\n  rank: {rank}\n")
    summary = {"global_step": len(losses), "trainable_parameters": 1000 * rank, "step_time_s": 0.1 * rank,
               "peak_memory_mb": 500.0 + rank, "metrics": {"train/loss_base": losses[-1][0],
                                                          "train/loss_flow": losses[-1][1]}}
    (folder / "summary.json").write_text(json.dumps(summary))


def test_run_report_reads_csv_and_draws(tmp_path):
    fake_run(tmp_path / "r", 4, [(1.0, 2.0), (0.8, 1.5), (0.7, 1.2)])
    series = read_metrics(tmp_path / "r")
    assert series["train/loss_base"] == [(0, 1.0), (1, 0.8), (2, 0.7)]
    assert series["train/alpha"][-1] == (2, 0.5)
    out = report(tmp_path / "r")
    for name in ("losses.png", "alpha.png", "lr.png", "README.md"):
        assert (out / name).stat().st_size > 0
    assert "| trainable_parameters | 4000 |" in (out / "README.md").read_text()


def test_sweep_summary_one_row_per_rank(tmp_path):
    sweep = tmp_path / "sweep"
    for rank in (16, 4, 8):
        fake_run(sweep / f"lora.rank={rank}", rank, [(1.0, 2.0), (0.9 - rank / 100, 1.0)])
    (sweep / "multirun.yaml").write_text("{}\n")
    # evaluation written into a job (`make eval ... eval.out=<job>/eval`) becomes a column of the summary
    (sweep / "lora.rank=8" / "eval").mkdir()
    (sweep / "lora.rank=8" / "eval" / "t2v.json").write_text(json.dumps({"task": "t2v", "metrics": {"fvd": 412.5}}))
    md = report_sweep(sweep).read_text()
    assert "eval/fvd" in md.splitlines()[2] and "| 412.5 |" in md
    lines = [line for line in md.splitlines() if line.startswith("| lora.rank=")]
    assert [line.split("|")[2].strip() for line in lines] == ["16", "4", "8"]  # one row per job
    assert "| lora.rank=8 | 8 | 0.82 | 1 | 8000 | 0.8 | 508 |" in md
    assert (sweep / "sweep_summary.png").stat().st_size > 0
    assert (sweep / "lora.rank=4" / "report" / "losses.png").is_file()


def test_report_on_a_folder_that_is_not_a_run(tmp_path):
    with pytest.raises(FileNotFoundError, match="is not a gridgen run folder"):
        report(tmp_path)
    proc = subprocess.run([sys.executable, "-m", "gridgen.report", f"run={tmp_path}"], capture_output=True,
                          text=True, timeout=120)
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines()[-1].startswith("gridgen.report: error: ")
