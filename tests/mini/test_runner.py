"""The miniature's runner (gridgen.mini): its report arithmetic, its cache key, its progress line, its step folders
and its refusals. The whole pipeline at a toy size runs in tests/e2e/test_make_mini.py (slow)."""

from __future__ import annotations

import logging
import math
import os
import subprocess
import sys

import numpy as np
import pytest
from hydra import initialize_config_dir
from omegaconf import OmegaConf
from scipy import stats

from gridgen.config import CONF_DIR, register_resolvers
from gridgen.mini.build import build_folder
from gridgen.mini.report import COLUMNS, dig, interval, markdown_table, summarise
from gridgen.mini.steps import Progress, compose, is_done, step_folder, write_done


@pytest.fixture(scope="module")
def hydra_conf():
    register_resolvers()
    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3", job_name="test"):
        yield


def test_interval_is_students_t_over_seeds():
    values = [0.8, 0.9, 0.7]
    mean, half = interval(values)
    ref = stats.t.interval(0.95, 2, loc=np.mean(values), scale=stats.sem(values))
    assert mean == pytest.approx(0.8) and (mean - half, mean + half) == pytest.approx(ref)
    assert math.isnan(interval([0.5])[1])


def test_summarise_reads_dotted_keys_and_scales_percentages():
    runs = [{"metrics": {"world_identity_all": v, "fvd": 100.0 + 10 * k}, "held_out": {"val/loss_base": 0.5}}
            for k, v in enumerate([0.5, 1.0])]
    assert dig(runs[0], "held_out.val/loss_base") == 0.5 and dig(runs[0], "metrics.missing") is None
    table = summarise({"filmstrip": runs})
    mean, half, n = table["filmstrip"]["metrics.world_identity_all"]
    assert (mean, n) == (75.0, 2) and half == pytest.approx(stats.t.ppf(0.975, 1) * np.std([50, 100], ddof=1) / 2 ** 0.5)
    text = markdown_table(table)
    assert text.count("\n") == 2 and "| filmstrip | 75 ± " in text
    assert len(text.splitlines()[0].split("|")) == len(COLUMNS) + 3


def test_the_default_build_has_the_presets_folder_and_any_other_its_own(hydra_conf, tmp_path):
    default = compose("mini", [f"paths.cache_dir={tmp_path}"])
    assert build_folder(default, default.build) == tmp_path / "mini-v1"  # what experiment=mini / data=mini read
    preset = compose("train", ["experiment=mini", f"paths.cache_dir={tmp_path}", "paths.output_dir=x"])
    assert OmegaConf.select(preset, "data.train_shards") == str(tmp_path / "mini-v1" / "data" / "clips")
    other = compose("mini", [f"paths.cache_dir={tmp_path}", "build.vae.steps=10"])
    folder = build_folder(other, default.build)
    assert folder.parent == tmp_path and folder.name.startswith("mini-v1-") and folder != build_folder(
        compose("mini", [f"paths.cache_dir={tmp_path}", "build.vae.steps=11"]), default.build)


def test_a_step_folder_appears_only_when_its_step_succeeds(tmp_path):
    target = tmp_path / "vae"
    with pytest.raises(RuntimeError), step_folder(target) as tmp:
        (tmp / "half.bin").write_bytes(b"x")
        raise RuntimeError("killed")
    assert not target.exists() and not list(tmp_path.iterdir())
    (tmp_path / ".vae.tmp").mkdir()  # a killed process's leftover
    (tmp_path / ".vae.tmp" / "stale").write_text("x")
    with step_folder(target) as tmp:
        assert not list(tmp.iterdir())
        write_done(tmp, {"psnr_db": 30.0})
    assert is_done(target) and sorted(p.name for p in tmp_path.iterdir()) == ["vae"]


def test_progress_names_the_step_and_estimates_from_measured_ones(caplog):
    progress = Progress({"a": 1.0, "b": 2.0, "c": 1.0})
    progress.skip("c")
    with caplog.at_level(logging.INFO, logger="gridgen.mini"):
        progress.start("a", "build a")
        progress.finish(seconds=60.0)
        progress.start("b", "build b")
    first, second = (r.getMessage() for r in caplog.records)
    assert first.startswith("[mini 1/2 |") and "eta after the first step" in first
    assert second.startswith("[mini 2/2 |") and "eta 2 min] build b" in second  # 60 s per unit x 2 units left


def test_a_finished_report_is_never_overwritten(hydra_conf, tmp_path):
    from gridgen.mini.__main__ import run

    (tmp_path / "report.md").write_text("done\n")
    cfg = compose("mini", [f"out={tmp_path}", f"paths.cache_dir={tmp_path / 'cache'}"])
    with pytest.raises(ValueError, match="never overwritten; pass out=<new folder>"):
        run(cfg, cfg.build)
    assert (tmp_path / "report.md").read_text() == "done\n" and not (tmp_path / "cache").exists()
    with pytest.raises(ValueError, match="stop_after must be one of"):
        run(compose("mini", ["stop_after=all", f"out={tmp_path / 'new'}"]), cfg.build)


def test_mini_refuses_a_bad_key_with_one_line(tmp_path):
    proc = subprocess.run([sys.executable, "-m", "gridgen.mini", "build.vae.stesp=3", f"out={tmp_path / 'out'}"],
                          capture_output=True, text=True, timeout=120, cwd=tmp_path)
    assert proc.returncode == 2
    err = proc.stderr.strip().splitlines()
    assert err[-1].startswith("gridgen.mini: error:") and "stesp" in err[-1], proc.stderr
    assert not any(line.startswith("Traceback") for line in err) and not (tmp_path / "out").exists()


def test_the_presets_refuse_a_missing_build_with_one_line(tmp_path):
    """experiment=mini trains on the base model `make mini` builds; before that it says how to build it."""
    env = {**os.environ, "GRIDGEN_CACHE": str(tmp_path / "cache"), "GRIDGEN_ROOT": str(tmp_path)}
    proc = subprocess.run([sys.executable, "-m", "gridgen.train", "experiment=mini"], capture_output=True, text=True,
                          timeout=120, cwd=tmp_path, env=env)
    assert proc.returncode == 2, proc.stderr[-2000:]
    last = proc.stderr.strip().splitlines()[-1]
    assert "not built yet" in last and "make mini stop_after=build" in last
    assert not (tmp_path / "outputs").exists() and not (tmp_path / "cache").exists()
