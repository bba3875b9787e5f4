"""The FLUX + LoRA model, built in one place for training and for generation.

    load (FluxPipeline.from_pretrained; model.transformer replaces its transformer; quantized at load when
          model.quantization asks)
      -> quantize (a transformer that is not quantized yet: one built elsewhere)
      -> LoRA (a trainable adapter from lora.*, or a saved LoRA applied frozen at a scale), or the transformer's
         own weights made trainable (adapter=full)
      -> attention backend (when the device is known)
      -> compile (diffusers' regional compilation of the repeated blocks, adapters inside)
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from gridgen.models.attention import apply_attention_backend
from gridgen.models.full import select_trainable
from gridgen.models.loading import load_flux_pipeline, resolve_pretrained
from gridgen.models.lora import apply_lora, attach_lora, keep_lora_fp32, load_lora_weights_into
from gridgen.models.quantization import check_compile, check_scheme, is_quantized, quantize_transformer

if TYPE_CHECKING:
    from diffusers import FluxPipeline
    from peft import LoraConfig

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class TrainableLora:
    """A new adapter from ``lora.*`` (``config``), initialised from ``seed`` alone, or from the LoRA file ``init``."""

    config: LoraConfig
    seed: int = 0
    init: str | Path | None = None


@dataclass(frozen=True)
class TrainableFull:
    """Full fine-tuning (``adapter=full``): the transformer's own weights train, all of them or those matching
    ``train_modules`` (:func:`gridgen.models.full.select_trainable`)."""

    train_modules: tuple[str, ...] | None = None


@dataclass(frozen=True)
class FrozenLora:
    """A saved LoRA (file, run folder or checkpoint) applied at ``scale`` for sampling."""

    path: str | Path
    scale: float = 1.0


@dataclass
class BuiltFlux:
    """What building did: the LoRA applied (the manifest's record), trainable parameter count, attention kernel."""

    lora: dict[str, Any] | None = None
    num_trainable: int = 0
    attention: str | None = None


def prepare_transformer(transformer: torch.nn.Module, model_cfg: Mapping[str, Any],
                        lora: TrainableLora | TrainableFull | FrozenLora | None = None,
                        attention_device: str | None = None) -> BuiltFlux:
    """quantize -> LoRA -> attention -> compile on a loaded FLUX transformer (in place).

    ``model.quantization``: a transformer that is not quantized yet is quantized here, before LoRA.
    ``model.compile``: the repeated FLUX blocks are compiled last, with the adapters inside (one graph per block
    class, reused by every block of that class). ``attention_device`` (``cuda``/``cpu``): select
    ``model.attention_backend`` for it; None leaves the kernel to the caller (training picks it per process).
    """
    scheme = model_cfg.get("quantization")
    if model_cfg.get("compile", False):
        check_compile(scheme)  # before any work: one line instead of a compile error at the first step
    if scheme is not None and not is_quantized(transformer):
        quantize_transformer(transformer, check_scheme(scheme))
    built = BuiltFlux()
    if isinstance(lora, TrainableLora):
        transformer.train()  # from_pretrained returns eval(); LoRA dropout needs train()
        # LoRA's random init comes from the seed alone, not from whatever drew random numbers before (the
        # launcher, samplers): every process and every launch mode starts from the same adapter.
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(lora.seed)
            built.num_trainable = attach_lora(transformer, lora.config)
        keep_lora_fp32(transformer)
        if model_cfg.get("gradient_checkpointing", False):
            transformer.enable_gradient_checkpointing()
        if lora.init:
            header = load_lora_weights_into(transformer, lora.init)
            log.info("initialised LoRA from %s (stage %s)", lora.init, header.get("gridgen_stage", "?"))
    elif isinstance(lora, TrainableFull):
        transformer.train()
        built.num_trainable = select_trainable(transformer, lora.train_modules)
        keep_lora_fp32(transformer)  # the trained weights in fp32, the frozen ones (if any) in model.dtype
        if model_cfg.get("gradient_checkpointing", False):
            transformer.enable_gradient_checkpointing()
    elif isinstance(lora, FrozenLora):
        built.lora = apply_lora(transformer, lora.path, float(lora.scale))
    elif lora is not None:
        raise TypeError(f"lora must be a TrainableLora, a TrainableFull, a FrozenLora or None, got {type(lora).__name__}")
    if attention_device is not None:
        built.attention = apply_attention_backend(model_cfg.get("attention_backend"), attention_device, transformer)
    if model_cfg.get("compile", False):  # model.compile_options: torch.compile kwargs (mode, backend, ...)
        transformer.compile_repeated_blocks(**dict(model_cfg.get("compile_options") or {}))
    return built


def build_flux(model_cfg: Mapping[str, Any], *, lora: TrainableLora | TrainableFull | FrozenLora | None = None,
               device: torch.device | str = "cpu", dtype: torch.dtype | str | None = None,
               load_encoders: bool = True, attention_device: str | None = None) -> tuple[FluxPipeline, BuiltFlux]:
    """Load the FLUX pipeline of ``model_cfg`` (``model.*``) and prepare its transformer
    (:func:`prepare_transformer`); the VAE and text encoders are frozen.

    ``dtype`` defaults to ``model.dtype``; ``load_encoders=False`` skips the VAE and text encoders (batches carry
    cached latents and text embeddings). ``model.transformer`` (a ``save_pretrained`` folder, e.g. an
    ``adapter=full`` run's ``<run>/transformer``) replaces the pipeline's transformer.
    """
    if model_cfg.get("compile", False):
        check_compile(model_cfg.get("quantization"))  # before any weights load
    pipe = load_flux_pipeline(
        resolve_pretrained(model_cfg["pretrained"]),
        dtype=dtype if dtype is not None else model_cfg.get("dtype", "float32"),
        device=device,
        load_vae=load_encoders,
        load_text_encoders=load_encoders,
        revision=model_cfg.get("revision"),
        variant=model_cfg.get("variant"),
        quantization=model_cfg.get("quantization"),
        quantize_text_encoder=bool(model_cfg.get("quantize_text_encoder", False)),
        transformer=model_cfg.get("transformer"),
    )
    for part in (pipe.vae, pipe.text_encoder, pipe.text_encoder_2):
        if part is not None:
            part.requires_grad_(False).eval()
    return pipe, prepare_transformer(pipe.transformer, model_cfg, lora, attention_device)
