"""GridThroughput: MFU from the FLOPs formula and the measured step time."""

import csv

import pytest

from gridgen.train import train
from gridgen.training.module import GridModule
from tests.helpers.train import make_cfg_no_val


def test_throughput_logs_mfu_from_the_flops_formula(tmp_path):
    from gridgen.training.flops import training_flops_per_batch

    cfg = make_cfg_no_val(tmp_path, "trainer.max_steps=6", "trainer.log_every_n_steps=2", "lora.rank=4",
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
