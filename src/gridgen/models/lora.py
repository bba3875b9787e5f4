"""LoRA on the FLUX transformer through peft, saved in the diffusers/PEFT file format.

LoRA (Hu et al. 2021) replaces a frozen weight ``W`` by ``W + (alpha / r) * B A`` with ``A: (r, d_in)``,
``B: (d_out, r)``; only ``A`` and ``B`` train. Adapters are attached with diffusers' ``add_adapter`` (the
same call diffusers' own FLUX LoRA scripts make) and exported with ``FluxPipeline.save_lora_weights`` so
that ``FluxPipeline.load_lora_weights`` reads our files unchanged.
"""

from __future__ import annotations

import json
import logging
import os
import re
from collections.abc import Sequence
from pathlib import Path

import safetensors.torch
import torch
from diffusers import FluxPipeline
from diffusers.loaders.lora_base import LORA_ADAPTER_METADATA_KEY, _pack_dict_with_prefix
from peft import LoraConfig
from peft.utils import get_peft_model_state_dict, set_peft_model_state_dict

log = logging.getLogger(__name__)

LORA_FILE = "pytorch_lora_weights.safetensors"
# Block types of the FLUX transformer that carry LoRA; targets are matched inside these blocks only, so
# that the single blocks' ``proj_out`` is adapted but the transformer's final ``proj_out`` is not.
FLUX_BLOCKS = ("transformer_blocks", "single_transformer_blocks")


class LoraFileError(ValueError):
    """A LoRA file that does not fit the model it is loaded into."""


def target_regex(targets: Sequence[str], blocks: Sequence[str] = FLUX_BLOCKS) -> str:
    """Module-name suffixes inside FLUX blocks -> one full-match regex for peft's ``target_modules``."""
    if not targets:
        raise ValueError("lora.target_modules is empty; list module names such as attn.to_q, ff.net.2")
    alternatives = "|".join(re.escape(t) for t in targets)
    block_names = "|".join(re.escape(b) for b in blocks)
    return rf"^(?:{block_names})\.\d+\.(?:{alternatives})$"


def build_lora_config(rank: int, alpha: float | None, dropout: float, init: str | bool,
                      target_modules: Sequence[str]) -> LoraConfig:
    if not isinstance(rank, int) or rank <= 0:
        raise ValueError(f"lora.rank must be a positive integer, got {rank!r}; try lora.rank=16")
    init_weights: str | bool = {"default": True, "true": True, "false": False}.get(str(init).lower(), init)
    return LoraConfig(
        r=rank,
        lora_alpha=float(alpha if alpha is not None else rank),
        lora_dropout=float(dropout),
        init_lora_weights=init_weights,
        target_modules=target_regex(list(target_modules)),
    )


def attach_lora(transformer: torch.nn.Module, config: LoraConfig) -> int:
    """Freeze the transformer, add the adapter; returns the number of trainable parameters."""
    transformer.requires_grad_(False)
    transformer.add_adapter(config)  # diffusers' PeftAdapterMixin: only lora_A / lora_B require grad
    matched = sum(1 for name, _ in transformer.named_modules() if name.endswith(".lora_A"))
    if matched == 0:
        raise ValueError(f"lora.target_modules matched no module of {type(transformer).__name__}")
    return sum(p.numel() for p in transformer.parameters() if p.requires_grad)


def lora_state_dict(transformer: torch.nn.Module) -> dict[str, torch.Tensor]:
    """peft-format LoRA weights of the transformer (``...to_q.lora_A.weight``), detached and contiguous."""
    return {k: v.detach().contiguous() for k, v in get_peft_model_state_dict(transformer).items()}


def save_lora(directory: str | Path, transformer: torch.nn.Module, metadata: dict[str, str] | None = None) -> Path:
    """Write ``<directory>/pytorch_lora_weights.safetensors`` in diffusers' FLUX LoRA format, atomically.

    Keys are ``transformer.<module>.lora_A.weight``; the safetensors header carries diffusers'
    ``lora_adapter_metadata`` (rank, alpha, targets, so diffusers rebuilds the exact adapter) plus
    gridgen's own ``metadata`` entries.
    """
    directory = Path(directory)
    adapter_metadata = transformer.peft_config["default"].to_dict()
    adapter_metadata = {k: (sorted(v) if isinstance(v, set) else v) for k, v in adapter_metadata.items()}
    header = {
        "format": "pt",
        LORA_ADAPTER_METADATA_KEY: json.dumps(
            _pack_dict_with_prefix(adapter_metadata, FluxPipeline.transformer_name), indent=2, sort_keys=True
        ),
        **{k: str(v) for k, v in (metadata or {}).items()},
    }

    def save_atomically(weights: dict[str, torch.Tensor], filename: str) -> None:
        tmp = f"{filename}.tmp-{os.getpid()}"
        safetensors.torch.save_file(weights, tmp, metadata=header)
        os.replace(tmp, filename)  # a crash mid-write leaves the previous file intact

    FluxPipeline.save_lora_weights(
        directory, transformer_lora_layers=lora_state_dict(transformer), save_function=save_atomically
    )
    return directory / LORA_FILE


def _lora_path(path: str | Path) -> Path:
    path = Path(path)
    if path.is_dir():
        path = path / LORA_FILE
    if not path.is_file():
        raise FileNotFoundError(
            f"LoRA file '{path}' does not exist; point to a pytorch_lora_weights.safetensors written by "
            "gridgen (runs write it under <run>/lora/)"
        )
    return path


def read_lora_header(path: str | Path) -> dict[str, str]:
    """The safetensors header metadata of a LoRA file (or its folder), without reading the tensors."""
    with safetensors.safe_open(str(_lora_path(path)), framework="pt") as f:
        return f.metadata() or {}


def read_lora_file(path: str | Path) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """A gridgen/diffusers LoRA file (or a folder holding one) -> (peft state dict, header metadata)."""
    path = _lora_path(path)
    header = read_lora_header(path)
    state = safetensors.torch.load_file(str(path))
    prefix = f"{FluxPipeline.transformer_name}."
    return {k.removeprefix(prefix): v for k, v in state.items()}, header


def load_lora_weights_into(transformer: torch.nn.Module, path: str | Path) -> dict[str, str]:
    """Load a saved LoRA into the transformer's existing (trainable) adapter; keys and shapes must match."""
    state, header = read_lora_file(path)
    expected = lora_state_dict(transformer)
    missing = sorted(set(expected) - set(state))
    unexpected = sorted(set(state) - set(expected))
    if missing or unexpected:
        example = (missing or unexpected)[0]
        raise LoraFileError(
            f"LoRA file '{path}' does not fit this model: {len(missing)} missing and {len(unexpected)} "
            f"unexpected keys (e.g. '{example}'); was it trained with another model or lora.target_modules?"
        )
    for key, value in state.items():
        if value.shape != expected[key].shape:
            raise LoraFileError(
                f"LoRA file '{path}': '{key}' has shape {tuple(value.shape)}, the model expects "
                f"{tuple(expected[key].shape)}; set lora.rank to the file's rank ({header.get('gridgen_rank', '?')})"
            )
    set_peft_model_state_dict(transformer, state)
    return header
