"""train(cfg) on the embedded tiny FLUX: exactly the LoRA trains, resume from a checkpoint (or mid-epoch)
continues the run, a crash while a checkpoint is written keeps the previous one."""

import csv

import pytest
import torch

from gridgen.embedded import ensure_tiny_flux
from gridgen.models.loading import load_flux_pipeline
from gridgen.models.lora import FLUX_BLOCKS, read_lora_file
from gridgen.train import train
from tests.helpers.train import make_cfg


def expected_lora_parameters(transformer: torch.nn.Module, rank: int, targets: list[str]) -> tuple[int, set[str]]:
    """r * (d_in + d_out) for every targeted Linear inside the two FLUX block types, by a plain walk."""
    total, names = 0, set()
    for name, mod in transformer.named_modules():
        parts = name.split(".")
        if len(parts) < 3 or parts[0] not in FLUX_BLOCKS or not parts[1].isdigit():
            continue
        if ".".join(parts[2:]) in targets and isinstance(mod, torch.nn.Linear):
            total += rank * (mod.in_features + mod.out_features)
            names.add(name)
    return total, names


def test_only_lora_trains_and_count_is_exact(trained_run):
    run, cfg, _ = trained_run
    base = load_flux_pipeline(ensure_tiny_flux()).transformer
    total, names = expected_lora_parameters(base, cfg.lora.rank, list(cfg.lora.target_modules))
    assert any(n.startswith("single_transformer_blocks") and n.endswith("proj_out") for n in names)
    summary = (run / "summary.json").read_text()
    assert f'"trainable_parameters": {total}' in summary
    state, header = read_lora_file(run / "lora")
    assert {k.rsplit(".lora_", 1)[0] for k in state} == names  # exactly the targeted modules, no final proj_out
    assert header["gridgen_rank"] == "4" and header["gridgen_stage"] == "coarse" and "gridgen_config_hash" in header


def test_resume_continues_step_alpha_and_lr(tmp_path, trained_run):
    run, _, metrics = trained_run
    cfg = make_cfg(tmp_path, "trainer.max_steps=6", "optim.lr=1e-2", "lora.rank=4", "callbacks.alpha.ramp_steps=4",
                   f"ckpt_path={run / 'checkpoints' / 'step000002.ckpt'}")
    resumed = train(cfg)
    ckpt = torch.load(tmp_path / "run" / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=False)
    assert ckpt["global_step"] == 6
    # alpha at the last step (5) of a 4-step ramp to 0.5 is 0.5; step 5 was taken, so the schedule continued
    assert resumed["train/alpha"] == pytest.approx(0.5)
    def rows(folder):
        with (folder / "metrics" / "metrics.csv").open(newline="") as file:
            return [{k: v for k, v in r.items() if v} for r in csv.DictReader(file) if r["step"]]

    parent, child = rows(run), rows(tmp_path / "run")
    before = [r for r in child if int(r["step"]) < 2]
    assert before == [r for r in parent if int(r["step"]) < 2]  # the parent's history before the checkpoint ...
    assert {int(r["step"]) for r in child if r not in before} >= {4, 5}  # ... then its own, no step re-run
    assert (run / "metrics" / "metrics.csv").stat().st_mtime < (tmp_path / "run" / "parent.json").stat().st_mtime


def test_resume_mid_epoch_ends_with_the_uninterrupted_lora(tmp_path):
    """Kill-and-resume: from a mid-epoch checkpoint the run continues at the same step, alpha, LR and data
    position (epoch counters restored, consumed batches skipped) and ends with the same LoRA."""
    common = ["trainer.max_steps=7", "optim.lr=1e-2", "lora.rank=4", "data.samples_per_epoch=6",  # 3 batches/epoch
              "callbacks.checkpoint.every_n_train_steps=4", "optim.scheduler=cosine"]
    train(make_cfg(tmp_path / "a", *common))
    straight, _ = read_lora_file(tmp_path / "a" / "run" / "lora")
    ckpt = tmp_path / "a" / "run" / "checkpoints" / "step000004.ckpt"  # epoch 1, one batch into it
    train(make_cfg(tmp_path / "b", *common, f"ckpt_path={ckpt}"))
    resumed, _ = read_lora_file(tmp_path / "b" / "run" / "lora")
    restarted = torch.load(tmp_path / "b" / "run" / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=True)
    assert restarted["global_step"] == 7
    for key in straight:
        torch.testing.assert_close(resumed[key], straight[key], rtol=0, atol=1e-6, msg=key)


def test_crash_during_checkpoint_write_keeps_the_previous_one(trained_run, monkeypatch):
    """Checkpoints go through Lightning's TorchCheckpointIO (serialise, then an fsspec transaction that writes a
    temporary file and moves it into place): a write that dies half-way leaves last.ckpt loadable."""
    import fsspec.implementations.local as local
    from lightning.fabric.plugins.io.torch_io import TorchCheckpointIO

    run, _, _ = trained_run
    path = run / "checkpoints" / "last.ckpt"
    before = torch.load(path, map_location="cpu", weights_only=True)
    files = sorted(p.name for p in path.parent.iterdir())
    original_write = local.LocalFileOpener.write

    def dying_write(self, data):
        original_write(self, data[: len(data) // 2])
        raise OSError("disk full")

    monkeypatch.setattr(local.LocalFileOpener, "write", dying_write)
    with pytest.raises(OSError, match="disk full"):
        TorchCheckpointIO().save_checkpoint({**before, "global_step": 999}, path)
    monkeypatch.undo()
    after = torch.load(path, map_location="cpu", weights_only=True)
    assert after["global_step"] == before["global_step"] == 4
    assert sorted(p.name for p in path.parent.iterdir()) == files  # no half-written file left behind


def test_a_cpu_run_tunes_glibcs_malloc_for_its_device(tmp_path, monkeypatch):
    """gridgen.train asks gridgen.runtime to tune malloc for the device it trains on (here the CPU); a GPU run's
    device type is cuda, for which tune_cpu_process does nothing (tests/test_runtime.py)."""
    import gridgen.train as train_module

    seen = []
    monkeypatch.setattr(train_module, "tune_cpu_process", seen.append)
    train(make_cfg(tmp_path, "trainer.max_steps=1", "lora.rank=2"))
    assert seen == ["cpu"]
    cfg = make_cfg(tmp_path / "other", "trainer.accelerator=gpu")
    assert train_module.run_device_type(cfg) == "cuda"
