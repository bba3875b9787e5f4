"""Exponential moving average of the trained weights: the LoRA, or the transformer with ``adapter=full`` (the GRID
authors' code keeps one of the LoRA with decay 0.99).

    e_0 = w_0                              (the LoRA's initial weights)
    e_k = d * e_(k-1) + (1 - d) * w_k      after every optimizer step k

Only the trainable tensors are averaged, in fp32, with one fused ``torch._foreach_lerp_`` per step.
(Lightning's ``WeightAveraging`` would deep-copy the whole module, frozen FLUX included.) When enabled the
EMA weights are swapped in for validation (held-out losses and sample grids) and exported at the end of
training beside the raw LoRA, in the same diffusers format (``adapter=full``: a second transformer folder,
``<run>/transformer_ema``, written as ``<run>/transformer`` is). The EMA is part of the checkpoint (the
callback's ``state_dict``: tensors and numbers only), so an exact resume continues it.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import lightning as L
import torch

import gridgen
from gridgen.models.lora import lora_state_dict, save_lora

log = logging.getLogger(__name__)

EMA_FILE = "pytorch_lora_weights_ema.safetensors"


class LoraEMA(L.Callback):
    """EMA of the trained weights; ``decay=None`` turns it off (the callback then does nothing).

    Args:
        decay: ``d`` in ``e <- d * e + (1 - d) * w``, in (0, 1); None = off.
        dirpath: where ``pytorch_lora_weights_ema.safetensors`` is written at the end of training
            (None: not exported).
        validate_with_ema: swap the EMA weights in for validation and sample grids.
        transformer_dirpath: ``adapter=full``: the folder the EMA transformer is written to (None: not exported).
    """

    def __init__(self, decay: float | None = None, dirpath: str | None = None, validate_with_ema: bool = True,
                 transformer_dirpath: str | None = None) -> None:
        if decay is not None and not 0.0 < float(decay) < 1.0:
            raise ValueError(f"callbacks.ema.decay must be null (off) or in (0, 1), got {decay}; the paper's code used 0.99")
        self.decay = None if decay is None else float(decay)
        self.dirpath = None if dirpath is None else Path(dirpath)
        self.transformer_dirpath = None if transformer_dirpath is None else Path(transformer_dirpath)
        self.validate_with_ema = validate_with_ema
        self.names: list[str] = []
        self.params: list[torch.nn.Parameter] = []
        self.ema: list[torch.Tensor] | None = None
        self.step = 0  # global step the EMA has seen
        self.path: Path | None = None
        self._loaded: dict[str, Any] | None = None
        self._raw: list[torch.Tensor] | None = None  # the trained weights while the EMA is swapped in

    @property
    def enabled(self) -> bool:
        return self.decay is not None

    # ---- state ----------------------------------------------------------------------------------------
    def on_fit_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if not self.enabled:
            return
        named = [(n, p) for n, p in pl_module.named_parameters() if p.requires_grad]
        self.names, self.params = [n for n, _ in named], [p for _, p in named]
        if self._loaded is not None:  # resumed: continue the checkpoint's average
            saved = self._loaded["ema"]
            if set(saved) != set(self.names):
                raise ValueError("checkpoint's EMA does not fit the trained weights (other adapter, lora.rank, "
                                 "lora.target_modules or lora.train_modules); resume with the run's adapter config")
            self.ema = [_like(saved[n], p) for n, p in named]
            self.step = int(self._loaded["step"])
            self._loaded = None
        else:  # e_0 = w_0
            self.ema = [p.detach().to(torch.float32, copy=True) for p in self.params]
            self.step = trainer.global_step

    def state_dict(self) -> dict[str, Any]:
        if not self.enabled or self.ema is None:
            return {}
        # whole tensors (FSDP2 shards gathered: every rank dumps callback states together), on the CPU
        return {"decay": self.decay, "step": self.step,
                "ema": {n: _full(e).cpu().clone() for n, e in zip(self.names, self.ema, strict=True)}}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        if self.enabled and state_dict.get("ema"):
            self._loaded = state_dict  # applied in on_fit_start, once the module's parameters exist

    # ---- update ---------------------------------------------------------------------------------------
    @torch.no_grad()
    def update(self) -> None:
        """``e <- d * e + (1 - d) * w`` = ``lerp(e, w, 1 - d)`` over all LoRA tensors at once."""
        weights = [p.detach().float() for p in self.params]  # no copy for fp32 adapters
        torch._foreach_lerp_(self.ema, weights, 1.0 - self.decay)

    def on_train_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, outputs: Any, batch: Any,
                           batch_idx: int) -> None:
        # once per optimizer step (not per micro-batch under gradient accumulation)
        if self.ema is not None and trainer.global_step > self.step:
            self.update()
            self.step = trainer.global_step

    # ---- swapping the EMA in --------------------------------------------------------------------------
    @torch.no_grad()
    def swap_in(self) -> None:
        self._raw = [p.detach().clone() for p in self.params]
        torch._foreach_copy_([p.data for p in self.params], self.ema)

    @torch.no_grad()
    def swap_out(self) -> None:
        if self._raw is not None:
            torch._foreach_copy_([p.data for p in self.params], self._raw)
            self._raw = None

    def on_validation_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if self.ema is not None and self.validate_with_ema:
            self.swap_in()

    def on_validation_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self.swap_out()  # before ModelCheckpoint (Lightning runs checkpoint callbacks last) saves the raw LoRA

    # ---- export ---------------------------------------------------------------------------------------
    def on_train_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if self.ema is not None and getattr(pl_module, "mode", "lora") == "full":
            self._export_transformer(trainer, pl_module)
            return
        if self.ema is None or self.dirpath is None:
            return
        from gridgen.training.callbacks.export import LoraExport

        self.path = self.dirpath / EMA_FILE
        self.swap_in()
        try:  # peft's key mapping of the EMA weights; a collective under FSDP2: every rank calls it
            # cloned: on the CPU the returned tensors are the parameters themselves, which swap_out restores
            state = {k: v.clone() for k, v in lora_state_dict(pl_module.transformer).items()}
        finally:
            self.swap_out()
        if not trainer.is_global_zero:
            return
        # the raw export's metadata (stage, task, rank, config hash set by the entry point), marked as EMA
        raw_meta = next((c.metadata for c in trainer.callbacks if isinstance(c, LoraExport)), {})
        meta = {"gridgen_version": gridgen.__version__, "gridgen_step": trainer.global_step, **raw_meta,
                "gridgen_ema_decay": self.decay}
        save_lora(self.dirpath, pl_module.transformer, meta, state_dict=state, name=EMA_FILE)
        log.info("exported EMA LoRA (decay %g) to %s", self.decay, self.path)

    def _export_transformer(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        """``adapter=full``: the transformer with the EMA weights, written as the raw one is (TransformerExport)."""
        from gridgen.training.callbacks.export import TransformerExport

        if self.transformer_dirpath is None:
            return
        self.path = self.transformer_dirpath
        exporter = next((c for c in trainer.callbacks if isinstance(c, TransformerExport)), None) or \
            TransformerExport(str(self.transformer_dirpath))
        self.swap_in()
        try:  # a collective under FSDP2: every rank calls it; the state is a copy, so swap_out cannot change it
            exporter.write(trainer, pl_module, self.transformer_dirpath)
        finally:
            self.swap_out()
        if trainer.is_global_zero:
            log.info("exported the EMA transformer (decay %g) to %s", self.decay, self.path)


def _full(tensor: torch.Tensor) -> torch.Tensor:
    """A whole tensor: an FSDP2 shard (DTensor) is gathered from every rank."""
    return (tensor.full_tensor() if hasattr(tensor, "full_tensor") else tensor).detach()


def _like(saved: torch.Tensor, param: torch.Tensor) -> torch.Tensor:
    """A checkpoint's whole fp32 EMA tensor placed like ``param`` (sharded again under FSDP2)."""
    tensor = saved.to(device=param.device, dtype=torch.float32)
    if hasattr(param, "device_mesh"):  # DTensor
        from torch.distributed.tensor import distribute_tensor

        return distribute_tensor(tensor, param.device_mesh, param.placements)
    return tensor.clone()
