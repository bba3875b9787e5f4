"""The embedded tiny FLUX: the pipeline, one transformer forward on fixed inputs, and a caption of the sample
data."""

from __future__ import annotations

import torch
from diffusers import FluxPipeline

from gridgen.embedded import TINY_FLUX_CONFIG, ensure_tiny_flux
from gridgen.models.loading import load_flux_pipeline

CAPTION = "A 16-frame sequence arranged in a 4x4 grid. A red circle moves right on a blue background."

MAX_SEQ = 32  # conf/model/flux_tiny.yaml


def tiny_pipe() -> FluxPipeline:
    pipe = load_flux_pipeline(ensure_tiny_flux())
    pipe.set_progress_bar_config(disable=True)
    return pipe


def transformer_inputs(batch: int = 2) -> dict:
    gen = torch.Generator().manual_seed(0)
    return dict(hidden_states=torch.randn(batch, 64, 64, generator=gen), timestep=torch.tensor([0.7, 0.3][:batch]),
                guidance=torch.full((batch,), 3.5), pooled_projections=torch.randn(batch, 32, generator=gen),
                encoder_hidden_states=torch.randn(batch, 8, 32, generator=gen), txt_ids=torch.zeros(8, 3),
                img_ids=torch.zeros(64, 3), return_dict=False)


def transformer_output(transformer: torch.nn.Module) -> torch.Tensor:
    """One FLUX forward on fixed inputs: 8x8 latent tokens, 6 text tokens, t = 0.7, guidance 3.5."""
    gen = torch.Generator().manual_seed(1)
    tokens, text = 64, 6
    img_ids = torch.stack(torch.meshgrid(torch.zeros(1), torch.arange(8.0), torch.arange(8.0), indexing="ij"),
                          dim=-1).reshape(tokens, 3)  # (1, 8, 8, 3) -> (N, 3)
    with torch.no_grad():
        return transformer(
            hidden_states=torch.randn(1, tokens, TINY_FLUX_CONFIG["in_channels"], generator=gen),
            encoder_hidden_states=torch.randn(1, text, TINY_FLUX_CONFIG["joint_attention_dim"], generator=gen),
            pooled_projections=torch.randn(1, TINY_FLUX_CONFIG["pooled_projection_dim"], generator=gen),
            timestep=torch.tensor([0.7]), guidance=torch.tensor([3.5]),
            img_ids=img_ids, txt_ids=torch.zeros(text, 3), return_dict=False,
        )[0]
