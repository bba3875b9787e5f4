"""`make report`: loss curves and the sweep summary from a run's metrics.csv, with readable axes."""

import json
import re
import subprocess
import sys

import pytest
from hydra import compose, initialize_config_dir

from gridgen.config import CONF_DIR
from gridgen.reporting import plot_series, plot_sweep, read_metrics, report, report_sweep


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
    series = read_metrics(tmp_path / "r")  # Lightning's rows 0, 1, 2 are the run's steps 1, 2, 3
    assert series["train/loss_base"] == [(1, 1.0), (2, 0.8), (3, 0.7)]
    assert series["train/alpha"][-1] == (3, 0.5)
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


def tick_labels(axis, which: str = "both") -> list[str]:
    return [t.get_text() for t in axis.get_ticklabels(which=which) if t.get_visible() and t.get_text()]


@pytest.mark.parametrize("low, high", [(2.55, 2.75), (0.05, 3.0)])
def test_run_plots_have_axis_labels_and_plain_log_ticks(low, high):
    """Loss curves on a log axis read as numbers (2.6, 0.05), not 2.6x10^0 or 10^-1 in mathtext."""
    series = {"train/loss": [(s, high - (high - low) * s / 9) for s in range(10)], "train/alpha": [(0, 0.0), (9, 0.5)]}
    fig = plot_series(series, ["train/loss"], "losses", "loss", logy=True)
    fig.canvas.draw()
    (ax,) = fig.axes
    assert (ax.get_xlabel(), ax.get_ylabel(), ax.get_yscale()) == ("step", "loss", "log")
    labels = tick_labels(ax.yaxis)
    assert labels and all(re.fullmatch(r"\d+(\.\d+)?", text) for text in labels), labels
    shown = [float(text) for text in labels]
    assert any(low <= v <= high for v in shown)  # at least one labelled tick inside the data's range
    fig = plot_series(series, ["train/alpha"], "alpha schedule", "alpha")
    fig.canvas.draw()
    assert (fig.axes[0].get_xlabel(), fig.axes[0].get_ylabel()) == ("step", "alpha")


def test_sweep_plot_ticks_at_each_rank_without_offset_text():
    rows = [{"lora.rank": rank, "final_loss_base": 2.5501 + rank * 1e-5, "final_loss_flow": 1.0 / rank,
             "trainable_parameters": 123_456 * rank, "step_time_s": 0.1, "peak_memory_mb": 512.0 + rank}
            for rank in (16, 4, 8)]
    fig = plot_sweep(rows)
    fig.canvas.draw()
    assert len(fig.axes) == 5
    for ax in fig.axes:
        assert ax.get_xlabel() == "LoRA rank" and ax.get_ylabel() and ax.get_title()
        assert tick_labels(ax.xaxis, "major") == ["4", "8", "16"] and tick_labels(ax.xaxis, "minor") == []
        assert ax.yaxis.get_offset_text().get_text() == ""  # would sit on top of the title
        assert all("e" not in text and "×" not in text for text in tick_labels(ax.yaxis))


def test_plots_use_the_steps_the_run_names(tmp_path):
    """A real run (Lightning's CSVLogger) logging every 2 steps and validating every 4: the report's points sit at
    steps 2, 4, 6, 8 and validation at 4 and 8, the steps of its console, checkpoints and summary.json."""
    from gridgen.train import train

    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        cfg = compose("train", overrides=[f"paths.root_dir={tmp_path}", f"paths.output_dir={tmp_path}/run",
                                          "logger=csv", "trainer.enable_progress_bar=false", "trainer.max_steps=8",
                                          "trainer.log_every_n_steps=2", "trainer.val_check_interval=4"])
    train(cfg)
    run = tmp_path / "run"
    series = read_metrics(run)
    assert [step for step, _ in series["train/loss"]] == [2, 4, 6, 8]
    assert [step for step, _ in series["val/loss_base"]] == [4, 8]
    assert json.loads((run / "summary.json").read_text())["global_step"] == 8
    fig = plot_series(series, ["train/loss", "train/loss_base"], "losses", "loss", logy=True)
    assert [list(line.get_xdata()) for line in fig.axes[0].lines] == [[2, 4, 6, 8]] * 2
    fig = plot_series(series, ["val/loss_base"], "validation", "loss")
    assert list(fig.axes[0].lines[0].get_xdata()) == [4, 8]
    assert (report(run) / "val.png").is_file()


def test_sweep_plot_states_a_tiny_spread_instead_of_stretching_it():
    """1.3632 vs 1.3635 is a 0.02% difference: the panel starts at zero and says so, not a full-height jump."""
    rows = [{"lora.rank": 4, "final_loss_base": 1.3632}, {"lora.rank": 8, "final_loss_base": 1.3635}]
    fig = plot_sweep(rows)
    fig.canvas.draw()
    (ax,) = fig.axes
    low, high = ax.get_ylim()
    assert low == 0 and 1.3635 <= high < 2
    texts = [t.get_text() for t in ax.texts]
    assert texts == ["spread 0.0003 (0.022% of the largest)"], texts
