"""`python -m gridgen.train` as a user runs it: the default run with offline W&B, a sweep, the console, bad
input as one line and exit 2 (configs, data, caches), FSDP2 checkpoints that resume."""

from __future__ import annotations

from tests.helpers.shards import grid_with_cells, write_shard
from tests.helpers.train import run_cli


def test_bad_weights_on_the_command_line(tmp_path):
    from tests.helpers.train import run_cli

    proc = run_cli("data=shards", f"data.train_shards=[{tmp_path},{tmp_path}]", "data.weights=[1]", "logger=none",
                   f"hydra.run.dir={tmp_path}/run", cwd=tmp_path, timeout=120)
    assert proc.returncode == 2
    errors = [line for line in proc.stderr.splitlines() if line.startswith("gridgen.train: error:")]
    assert errors == ["gridgen.train: error: data.weights has 1 value(s) for 2 data.train_shards entries; give one "
                      "weight per shard spec, e.g. data.weights=[1,1]"], proc.stderr[-2000:]
    assert "Traceback" not in proc.stderr


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
