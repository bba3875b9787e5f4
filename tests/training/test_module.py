"""GridModule: the cache seam, gradient checkpointing, the LR schedule, validation losses, checkpoints that hold
only the LoRA, the non-finite guard, bf16 plumbing on CPU, training on a cache without encoders, and a LoRA that
overfits one batch."""

from __future__ import annotations

import csv
from pathlib import Path

import pytest

import gridgen.models.builder as builder_lib
import gridgen.training.module as module_lib
from gridgen.train import train
from tests.helpers.train import make_cfg


def _losses(run: Path) -> dict[int, tuple[float, float, float]]:
    with open(run / "metrics" / "metrics.csv") as f:
        return {int(r["step"]): (float(r["train/loss"]), float(r["train/loss_base"]), float(r["train/loss_flow"]))
                for r in csv.DictReader(f) if r.get("train/loss")}


def test_cached_training_equals_uncached_without_encoders(raw, built, tmp_path, monkeypatch):
    out, _ = built
    common = ["trainer.max_steps=3", "trainer.log_every_n_steps=1", "optim.lr=1e-2", "lora.rank=4",
              "callbacks.alpha.alpha_max=0.5", "callbacks.alpha.ramp_steps=1"]
    train(make_cfg(tmp_path / "raw", f"data.train_shards={raw}", *common))

    loads = []
    original = builder_lib.load_flux_pipeline  # the one builder training and generation share

    def spy(*args, **kwargs):
        loads.append(kwargs)
        return original(*args, **kwargs)

    def forbidden(*args, **kwargs):
        raise AssertionError("a cached run must not encode images or prompts")

    monkeypatch.setattr(builder_lib, "load_flux_pipeline", spy)
    monkeypatch.setattr(module_lib, "encode_images", forbidden)
    monkeypatch.setattr(module_lib, "encode_prompts", forbidden)
    train(make_cfg(tmp_path / "cached", "data.cached=true", f"data.train_shards={out}", *common))
    assert loads and all(not kw["load_vae"] and not kw["load_text_encoders"] for kw in loads)

    raw_losses, cached_losses = _losses(tmp_path / "raw" / "run"), _losses(tmp_path / "cached" / "run")
    assert sorted(raw_losses) == sorted(cached_losses) == [0, 1, 2]
    for step in raw_losses:  # same batches (keys), same noise, same LoRA updates: the same losses
        assert cached_losses[step] == pytest.approx(raw_losses[step], rel=1e-5, abs=1e-6), step
    assert raw_losses[2][2] > 0 and raw_losses[0] != raw_losses[1]
