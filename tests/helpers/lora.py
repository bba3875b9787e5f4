"""LoRAs on the tiny FLUX transformer with non-zero weights, and files that are not gridgen LoRAs."""

from __future__ import annotations

import zipfile
from pathlib import Path

import torch
from diffusers import FluxTransformer2DModel
from safetensors.torch import save_file

from gridgen.embedded import TINY_FLUX_CONFIG
from gridgen.models.lora import KOHYA_LORA_FILE, attach_lora, build_lora_config, save_lora


def randomize_lora(transformer: torch.nn.Module, seed: int = 0) -> None:
    """Non-zero A and B everywhere (peft's init leaves B = 0, which would hide a wrong up/down mapping)."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in transformer.named_parameters():
            if ".lora_" in name:
                param.copy_(torch.randn(param.shape, generator=gen) * 0.3)


def tiny_lora(rank: int = 4, targets: tuple[str, ...] = ("attn.to_q", "attn.to_k"), seed: int = 0):
    transformer = FluxTransformer2DModel(**TINY_FLUX_CONFIG)
    attach_lora(transformer, build_lora_config(rank, rank, 0.0, "gaussian", list(targets)))
    randomize_lora(transformer, seed)
    return transformer


def foreign_files(tmp: Path) -> dict[str, Path]:
    files = {"garbage.safetensors": b"\x00\x01 not a LoRA " * 20, "garbage.ckpt": b"e" * 130}
    for name, data in files.items():
        (tmp / name).write_bytes(data)
    with zipfile.ZipFile(tmp / "notorch.ckpt", "w") as archive:  # a zip, but no torch archive
        archive.writestr("readme.txt", "hello")
    torch.save({"state_dict": {"w": torch.ones(1)}}, tmp / "foreign.ckpt")  # a torch checkpoint of something else
    save_file({"x_embedder.weight": torch.ones(2, 2)}, tmp / "model.safetensors")
    save_lora(tmp / "kohya", tiny_lora(), formats=["kohya"])
    return {p.name: p for p in [*tmp.iterdir(), tmp / "kohya" / KOHYA_LORA_FILE]}
