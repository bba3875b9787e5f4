"""Train the tiny model for a few steps on a fixed set of 4 grids and save the LoRA.

    python tests/helpers/ddp_equivalence.py <devices> <per-process batch size> <out.safetensors-dir> [ddp|fsdp] [clip]

With devices=2 Lightning's DDP strategy (gloo on CPU) re-launches this script once per process and each rank
takes every other sample (DistributedSampler); with devices=1 one process takes all of them. Because noise and
t are keyed by sample, both runs must end with the same LoRA. ``fsdp``: FSDP2 (gloo on CPU) shards the model,
clips by the global gradient norm and gathers the LoRA from every rank's shards for the export.
"""

import sys
from pathlib import Path

import lightning as L
import torch
from hydra import compose, initialize_config_dir
from hydra.utils import instantiate
from torch.utils.data import DataLoader

from gridgen.config import CONF_DIR, register_resolvers
from gridgen.data.datamodule import GridDataModule, collate_grid_samples
from gridgen.embedded import ensure_sample_shards
from gridgen.layout import GridLayout
from gridgen.models.lora import lora_state_dict, save_lora
from gridgen.training.callbacks import AlphaSchedule
from gridgen.training.module import GridModule


def fixed_samples(val_folder: str, count: int) -> list[dict]:
    dm = GridDataModule(train_shards=val_folder, val_shards=val_folder, batch_size=1)
    dm.setup("fit")
    samples = []
    for batch in dm.val_dataset():
        samples.append({"__key__": batch["__key__"][0], "caption": batch["caption"][0],
                        "layout": GridLayout(**batch["layout"]), "pixel_values": batch["pixel_values"][0]})
        if len(samples) == count:
            return samples
    raise RuntimeError(f"need {count} validation samples in {val_folder}")


def main() -> None:
    devices, batch_size, out = int(sys.argv[1]), int(sys.argv[2]), Path(sys.argv[3])
    kind = sys.argv[4] if len(sys.argv) > 4 else "ddp"
    clip = sys.argv[5] if len(sys.argv) > 5 else "1.0"
    register_resolvers()
    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        strategy = [f"strategy={kind}", "trainer.accelerator=cpu", f"trainer.devices={devices}"] if devices > 1 else []
        if devices > 1 and kind == "fsdp":  # tiny model in float32 on CPU: gather weights in their own dtype
            strategy += ["trainer.strategy.param_dtype=null"]
        # AdamW's eps=1e-4 (not 1e-8): Adam divides by sqrt(v), which turns float32 rounding in near-zero
        # gradients (all-reduce order) into lr-sized steps; a larger eps keeps those at rounding size.
        cfg = compose("train", overrides=["paths.root_dir=/tmp", "paths.output_dir=/tmp", "lora.rank=4",
                                          "optim.lr=1e-2", "optim.eps=1e-4", "trainer.max_steps=3",
                                          f"trainer.gradient_clip_val={clip}", *strategy])
    ensure_sample_shards(cfg.data.sample_data_root)  # built on first use (no prepare_data() on this path)
    video = cfg.data.train_shards  # the embedded video subset (train-*.tar and val-*.tar)
    samples = fixed_samples(video, 4)
    loader = DataLoader(samples, batch_size=batch_size, shuffle=False, collate_fn=collate_grid_samples)
    module = GridModule(model=cfg.model, lora=cfg.lora, optim=cfg.optim, loss=cfg.loss, seed=0, max_steps=3)
    # the real trainer config (strategy=ddp: DDPStrategy, gloo on CPU), without checkpoints and loggers
    trainer: L.Trainer = instantiate(cfg.trainer, logger=False, enable_checkpointing=False, enable_progress_bar=False,
                                     callbacks=[AlphaSchedule(alpha_max=0.5, ramp_steps=2)])
    assert trainer.world_size == devices
    torch.manual_seed(0)
    trainer.fit(module, train_dataloaders=loader)
    state = lora_state_dict(module.transformer)  # every rank: gathers FSDP2 shards
    if trainer.is_global_zero:
        save_lora(out, module.transformer, state_dict=state)


if __name__ == "__main__":
    main()
