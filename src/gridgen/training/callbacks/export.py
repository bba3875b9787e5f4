"""What a run leaves when training ends: the LoRA file (diffusers format, + kohya), or with ``adapter=full`` the
transformer folder (diffusers ``save_pretrained``). Each export declares its ``adapter``; the entry point
instantiates the one of the run's mode."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import lightning as L

import gridgen
from gridgen.models.full import save_transformer, transformer_state_dict
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

    adapter = "lora"

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



class TransformerExport(L.Callback):
    """``adapter=full``: writes the trained ``FluxTransformer2DModel`` to ``<dirpath>/`` with diffusers'
    ``save_pretrained`` (``config.json`` + safetensors, in ``model.dtype``) when training ends; ``model.transformer=
    <dirpath>`` loads it. Under FSDP2 every rank hands in its shards and rank 0 writes the gathered weights."""

    adapter = "full"

    def __init__(self, dirpath: str) -> None:
        self.dirpath = Path(dirpath)
        self.path: Path | None = None

    def write(self, trainer: L.Trainer, pl_module: L.LightningModule, dirpath: Path) -> Path | None:
        """The module's transformer as it is now, to ``dirpath`` (rank 0; a collective under FSDP2: every rank calls
        it). Also used by the EMA callback with the EMA weights swapped in."""
        state = transformer_state_dict(pl_module.transformer)
        if not trainer.is_global_zero:
            return None
        return save_transformer(dirpath, pl_module.transformer.config, state,
                                dtype=pl_module.model_cfg.get("dtype", "float32"))

    def on_train_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self.path = self.write(trainer, pl_module, self.dirpath) or self.dirpath
        if trainer.is_global_zero:
            log.info("exported the transformer to %s", self.path)
