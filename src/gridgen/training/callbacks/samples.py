"""Fixed-seed sample grids at every validation: the same prompts and noise each time, so a run's samples
show what training changed. Saved under ``<run>/samples/step<N>/`` (grid PNG, frames, mp4, GIF) and logged
to W&B as images and videos when a WandbLogger is attached."""

from __future__ import annotations

import logging
from pathlib import Path

import lightning as L
import numpy as np
import torch
from lightning.pytorch.loggers import WandbLogger

from gridgen.inference.export import export_sample, to_uint8
from gridgen.inference.sampler import GridSampler
from gridgen.layout import GridLayout

log = logging.getLogger(__name__)


class SampleGrids(L.Callback):
    """Samples ``prompts`` (one grid each, seeds ``seed + k``) with the current LoRA after each validation.

    Args:
        dirpath: where ``step<N>/<k>/`` folders go.
        prompts: content captions; the layout prefix ``c_layout`` of ``kind`` is added (``caption_layout``: the
            task's own template, ``""`` for none, as a text-to-image task).
        layout: e.g. ``4x4`` (video) or ``4x6`` (multi-view); ``cell_size`` in pixels.
        steps, guidance: sampler settings (paper: 20 steps, guidance 3.5).
    """

    def __init__(self, dirpath: str, prompts: list[str], layout: str = "4x4", cell_size: int = 32, kind: str = "video",
                 steps: int = 20, guidance: float = 3.5, seed: int = 0, fps: int = 8, max_sequence_length: int = 512,
                 enabled: bool = True, caption_layout: str | None = None) -> None:
        self.dirpath = Path(dirpath)
        self.caption_layout = caption_layout
        self.prompts = list(prompts)
        self.layout = GridLayout.parse(layout, cell_size)
        self.kind, self.steps, self.guidance, self.seed, self.fps = kind, steps, guidance, seed, fps
        self.max_sequence_length = max_sequence_length
        self.enabled = enabled
        self._said_off = False

    @torch.no_grad()
    def sample(self, pl_module: L.LightningModule) -> np.ndarray:
        """Grids ``(P, H, W, 3)`` uint8 from the module's frozen pipeline + current transformer."""
        pipe = pl_module.pipe
        pipe.transformer = pl_module.transformer  # the module keeps the trained transformer outside the pipe
        was_training = pl_module.transformer.training
        pl_module.transformer.eval()
        try:
            sampler = GridSampler(pipe, self.max_sequence_length)
            text = sampler.encode_text([self.layout.caption(p, self.kind, self.caption_layout) for p in self.prompts])
            seeds = [self.seed + k for k in range(len(self.prompts))]
            latents = sampler.sample(self.layout, text, seeds, steps=self.steps, guidance=self.guidance)
            grids = to_uint8(sampler.decode(latents, self.layout))
        finally:
            pl_module.transformer.train(was_training)
            pipe.transformer = None
        return grids

    def on_validation_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if not self.enabled or not self.prompts or trainer.sanity_checking:
            return
        if pl_module.pipe is None or pl_module.pipe.vae is None or pl_module.pipe.text_encoder is None:
            if not self._said_off:  # said once: cached training loads no VAE or text encoders to sample with
                log.info("validation samples off: the run loads no VAE / text encoders (data.cached=true); "
                         "sample with `make generate lora=<run>`")
                self._said_off = True
            return
        grids = self.sample(pl_module)  # every rank samples: FSDP forwards are collective
        if not trainer.is_global_zero:
            return
        step = trainer.global_step
        folder = self.dirpath / f"step{step:06d}"
        videos = []
        for k, grid in enumerate(grids):
            files = export_sample(folder / f"{k:02d}", grid, self.layout, self.kind, self.fps, frames=True,
                                  mp4=True, gif=False)
            videos.append(str(folder / files["mp4"]) if "mp4" in files else None)
            (folder / f"{k:02d}_grid.png").write_bytes((folder / files["grid"]).read_bytes())
        for logger in trainer.loggers:
            if isinstance(logger, WandbLogger):
                logger.log_image("samples/grid", list(grids), step=step, caption=self.prompts)
                if all(videos):  # the mp4 files just written
                    logger.log_video("samples/video", videos, step=step, caption=self.prompts)
        log.info("validation samples at step %d -> %s", step, folder)
