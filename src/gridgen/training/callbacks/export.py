"""The LoRA file a run leaves: diffusers format (+ kohya), written when training ends."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import lightning as L

import gridgen
from gridgen.models.lora import (
    check_export_formats,
    kohya_inputs,
    kohya_state_dict,
    lora_state_dict,
    save_lora,
)

log = logging.getLogger(__name__)


class LoraExport(L.Callback):
    """Writes ``<dirpath>/pytorch_lora_weights.safetensors`` (diffusers format, plus ``formats`` such as
    ``kohya``) when training ends. Under FSDP2 every rank hands in its shards and rank 0 writes the full LoRA."""

    def __init__(self, dirpath: str, metadata: dict[str, Any] | None = None,
                 formats: list[str] | tuple[str, ...] = ("diffusers",)) -> None:
        self.dirpath = Path(dirpath)
        self.metadata = dict(metadata or {})
        self.formats = check_export_formats(formats)
        if "diffusers" not in self.formats:  # the file gridgen itself (init_lora, generate) and diffusers read
            raise ValueError(f"lora.export_formats={self.formats} must include diffusers, e.g. [diffusers,kohya]")
        self.path: Path | None = None

    def on_fit_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if "kohya" in self.formats and trainer.world_size == 1:  # a LoRA kohya cannot name fails now, not at the end
            kohya_state_dict(lora_state_dict(pl_module.transformer), *kohya_inputs(pl_module.transformer))

    def on_train_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self.path = self.dirpath / "pytorch_lora_weights.safetensors"
        state = lora_state_dict(pl_module.transformer)  # a collective under FSDP2: every rank calls it
        if trainer.is_global_zero:
            meta = {"gridgen_version": gridgen.__version__, "gridgen_step": trainer.global_step, **self.metadata}
            self.path = save_lora(self.dirpath, pl_module.transformer, meta, formats=self.formats, state_dict=state)
            log.info("exported LoRA to %s", self.path)

