"""Callbacks that tests add to a training run with `+callbacks.probe._target_=tests.helpers.probes.<Name>`."""

import lightning as L
import torch
from torch._dynamo.utils import counters

from gridgen.training.callbacks.ema import LoraEMA


class StepProbe(L.Callback):
    """Per optimizer step: the loss and how many graphs Dynamo has compiled so far."""

    steps: list[dict] = []

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        self.steps.append({"loss": float(outputs["loss"]), "graphs": counters["stats"]["unique_graphs"],
                           "compiled": pl_module.transformer.transformer_blocks[0]._compiled_call_impl is not None})


class ValidationProbe(L.Callback):
    """Records the LoRA weights the module holds during validation and right after it."""

    seen: list[dict[str, dict[str, torch.Tensor]]] = []

    def _lora(self, pl_module):
        return {n: p.detach().clone() for n, p in pl_module.named_parameters() if p.requires_grad}

    def on_validation_epoch_end(self, trainer, pl_module):  # where SampleGrids samples
        ema = next(c for c in trainer.callbacks if isinstance(c, LoraEMA))
        self.seen.append({"during": self._lora(pl_module),
                          "ema": {n: e.clone() for n, e in zip(ema.names, ema.ema, strict=True)}})

    def on_validation_end(self, trainer, pl_module):  # runs after LoraEMA's (callbacks keep config order)
        self.seen[-1]["after"] = self._lora(pl_module)
