"""FLUX glue in plain torch + diffusers: packing, VAE latents and text conditioning for grid images.

Everything here reuses diffusers' own FLUX code paths (``FluxPipeline._pack_latents``,
``FluxPipeline.encode_prompt``) so that training sees exactly what diffusers' inference sees.
"""

from __future__ import annotations

import logging

import torch
from diffusers import FluxPipeline

from gridgen.layout import GridLayout


class _TruncationOnce(logging.Filter):
    """diffusers warns on every call whose caption exceeds ``max_sequence_length``: in training that is twice
    per step (CLIP and T5). Let the first warning of each kind through, then stay quiet."""

    def __init__(self) -> None:
        super().__init__()
        self.seen: set[str] = set()

    def filter(self, record: logging.LogRecord) -> bool:
        message = record.getMessage()
        if "truncated" not in message:
            return True
        kind = message.split(":", 1)[0]
        if kind in self.seen:
            return False
        self.seen.add(kind)
        record.msg, record.args = message + " (shown once per run)", ()
        return True


logging.getLogger("diffusers.pipelines.flux.pipeline_flux").addFilter(_TruncationOnce())


def pack_latents(latents: torch.Tensor) -> torch.Tensor:
    """VAE latents ``(B, 16, h, w)`` -> packed tokens ``(B, h/2 * w/2, 64)`` (2x2 patches, row-major)."""
    batch, channels, height, width = latents.shape
    return FluxPipeline._pack_latents(latents, batch, channels, height, width)


def unpack_latents(tokens: torch.Tensor, layout: GridLayout) -> torch.Tensor:
    """Packed tokens ``(B, N, 64)`` -> VAE latents ``(B, 16, H/8, W/8)`` of the layout's grid image."""
    return FluxPipeline._unpack_latents(tokens, layout.height, layout.width, 8)


@torch.no_grad()
def encode_images(vae: torch.nn.Module, pixel_values: torch.Tensor) -> torch.Tensor:
    """Grid images in [-1, 1] ``(B, 3, H, W)`` -> normalised packed latents ``(B, N, 64)``.

    ``(z - shift) * scale`` as in FLUX training: the transformer works on the normalised latents. The
    posterior mean is used (not a sample) so that a step is a function of the data alone, identical to
    what a latent cache stores; FLUX's VAE posterior variance is negligible next to the flow noise.
    """
    z = vae.encode(pixel_values.to(vae.dtype)).latent_dist.mode()  # (B, 16, H/8, W/8)
    z = (z - vae.config.shift_factor) * vae.config.scaling_factor
    return pack_latents(z)


@torch.no_grad()
def decode_tokens(vae: torch.nn.Module, tokens: torch.Tensor, layout: GridLayout) -> torch.Tensor:
    """Normalised packed latents ``(B, N, 64)`` -> images in [-1, 1] ``(B, 3, H, W)``."""
    z = unpack_latents(tokens, layout) / vae.config.scaling_factor + vae.config.shift_factor
    return vae.decode(z.to(vae.dtype)).sample.clamp(-1, 1)


@torch.no_grad()
def encode_prompts(pipe: FluxPipeline, captions: list[str], max_sequence_length: int,
                   device: torch.device | str | None = None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Captions -> ``(prompt_embeds (B, L, D_t5), pooled (B, D_clip), text_ids (L, 3))`` via diffusers."""
    prompt_embeds, pooled, text_ids = pipe.encode_prompt(
        prompt=captions, prompt_2=None, device=device, max_sequence_length=max_sequence_length
    )
    return prompt_embeds, pooled, text_ids
