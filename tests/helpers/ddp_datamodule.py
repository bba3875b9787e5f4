"""DDP with 2 CPU processes (gloo) on an uneven number of shards: a fixed number of steps, no hang.

tests/data/test_datamodule.py runs this file as a script (``python tests/helpers/ddp_datamodule.py <shards>
<out> <steps>``); Lightning's DDP strategy re-launches it once per rank. Source ``a`` has 3 shards of 5, 2 and 1
samples (4x4 grids, one sample broken), source ``b`` one shard of 3 samples (4x6 grids): a non-resampled split
would hand the ranks different numbers of batches and the one that runs dry first would leave the other waiting
in the gradient all-reduce forever. Each rank writes the keys it trained on; the test checks both ran every step
on their own data, layouts never mixed, and the skipped count reached the logger.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import lightning as L
import torch

SCRIPT = Path(__file__).resolve()


STEPS = 7


class _KeyRecorder(L.LightningModule):
    """A real DDP-trained parameter (gradients are all-reduced every step) that records what each rank saw."""

    def __init__(self) -> None:
        super().__init__()
        self.weight = torch.nn.Parameter(torch.zeros(()))
        self.seen: list[dict] = []

    def training_step(self, batch, batch_idx):
        self.seen.append({"step": self.global_step, "keys": batch["__key__"], "layout": batch["layout"]})
        loss = (batch["pixel_values"].mean() - self.weight) ** 2
        self.log("train/loss", loss)
        return loss

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.1)


def write_shards(root: Path) -> None:
    import webdataset as wds

    from gridgen.embedded import write_sample_shards

    write_sample_shards(root / "sample", seed=0, num_video=8, num_multiview=3, num_val=1, samples_per_shard=8)
    video = list(wds.WebDataset(str(root / "sample" / "video" / "train-000000.tar"), shardshuffle=False))
    video = [{k: v for k, v in s.items() if k in ("__key__", "png", "json", "txt")} for s in video]
    video[3] = dict(video[3], __key__="broken", png=b"\x89PNG truncated")
    (root / "a").mkdir()
    for index, (start, stop) in enumerate(((0, 5), (5, 7), (7, 8))):  # 3 shards: 5, 2 and 1 samples
        with wds.TarWriter(str(root / "a" / f"train-{index:06d}.tar"), mtime=0) as sink:
            for sample in video[start:stop]:
                sink.write(sample)


def main() -> None:
    from lightning.pytorch.loggers import CSVLogger

    from gridgen.data.datamodule import GridDataModule

    root, out, steps = Path(sys.argv[1]), Path(sys.argv[2]), int(sys.argv[3])
    dm = GridDataModule(sources={"a": {"shards": str(root / "a"), "weight": 2},
                                 "b": {"shards": str(root / "sample" / "multiview"), "weight": 1}},
                        batch_size=2, shuffle_buffer=2, seed=0)
    model = _KeyRecorder()
    trainer = L.Trainer(accelerator="cpu", devices=2, strategy="ddp", max_steps=steps, log_every_n_steps=1,
                        logger=CSVLogger(out, name="", version="logs"), enable_checkpointing=False,
                        enable_progress_bar=False, enable_model_summary=False, num_sanity_val_steps=0)
    trainer.fit(model, datamodule=dm)
    (out / f"rank{trainer.global_rank}.json").write_text(json.dumps({
        "seen": model.seen, "batches_per_epoch": dm.batches_per_epoch, "world_size": trainer.world_size,
        "weight": model.weight.item(), "skipped": dm.num_skipped}))


if __name__ == "__main__":
    main()
