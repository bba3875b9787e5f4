"""The large-grid refusal: a measured time estimate, and a disk estimate that matches what a run writes."""

import re
import time

import pytest

from gridgen.config import USER_ERRORS
from gridgen.generate import generate
from gridgen.inference import GridSampler, resolve_layout
from gridgen.inference.budget import LargeGenerationError, measure_grid_cost
from tests.helpers.flux import MAX_SEQ, tiny_pipe
from tests.helpers.generate import gen_cfg


def test_large_grid_is_refused_with_a_measured_estimate(tmp_path, monkeypatch):
    """Over generate.large: one line, nothing written, and an estimate that follows the measured step cost."""
    sample = GridSampler.sample

    def slow_sample(self, *args, **kwargs):  # each denoising step costs 0.2 s more than the tiny model's own
        time.sleep(0.2 * kwargs["steps"])
        return sample(self, *args, **kwargs)

    monkeypatch.setattr(GridSampler, "sample", slow_sample)
    cfg = gen_cfg(tmp_path, "prompt=a red circle", "layout=8x8", "generate.large.frames=32", "generate.steps=5")
    with pytest.raises(LargeGenerationError) as refused:
        generate(cfg)
    message = str(refused.value)
    assert isinstance(refused.value, USER_ERRORS) and "\n" not in message
    assert "64 frames per grid > generate.large.frames=32" in message and "set generate.allow_large=true" in message
    step_s = float(re.search(r"5 steps x ([\d.]+) s", message)[1])
    assert step_s >= 0.2 and re.search(r"would take about \d+ s", message) and " MB (" in message
    assert not (tmp_path / "out").exists()  # refused before anything was written


def test_large_grid_disk_estimate_matches_what_is_written(tmp_path):
    """The probe's bytes (32 of 64 frames exported, scaled) against the files a real run writes."""
    cfg = gen_cfg(tmp_path, "prompt=a red circle", "layout=8x8", "generate.large.frames=32", "generate.steps=2",
                  "generate.allow_large=true")
    manifest = generate(cfg)  # allowed: runs
    folder = tmp_path / "out" / manifest["samples"][0]["folder"]
    files = [p for p in folder.rglob("*") if p.is_file()]
    assert len(files) == 64 + 3  # frames, grid.png, frames.mp4, frames.gif
    layout = resolve_layout("8x8", 128)
    sampler = GridSampler(tiny_pipe(), MAX_SEQ)
    cost = measure_grid_cost(sampler, layout, "a red circle", 0, 3.5, cfg.export, tmp_path)
    written = sum(p.stat().st_size for p in files)
    assert 0.7 * written < cost.bytes < 1.3 * written, (cost.bytes, written)
    on_disk = sum(-(-p.stat().st_size // cost.block) * cost.block for p in files)
    assert 0.7 * on_disk < cost.disk_bytes < 1.3 * on_disk, (cost.disk_bytes, on_disk)
