"""The miniature's VAE (gridgen.embedded.mini_vae) at a toy size."""


import math

import pytest
import torch


def test_mini_vae_trains_and_normalises_from_its_data(mini_data):
    from diffusers import AutoencoderKL

    from gridgen.embedded.mini_data import cell_size
    from gridgen.embedded.mini_vae import MINI_VAE_CONFIG, psnr, read_cells, to_tensor, train_vae

    out, manifest = mini_data
    side = cell_size("clips")
    cells = read_cells(sorted((out / "clips").glob("train-*.tar")), side)
    assert cells.shape[1:] == (side, side, 3) and len(cells) == 16 * manifest["kinds"]["clips"]["train"]
    vae, figures = train_vae(cells[:64], cells[64:96], steps=2, batch_size=4)
    assert isinstance(vae, AutoencoderKL) and vae.config.latent_channels == 16
    with torch.no_grad():
        z = vae.encode(to_tensor(cells[:96])).latent_dist.mode()
        recon = vae.decode(vae.encode(to_tensor(cells[64:96])).latent_dist.mode()).sample.clamp(-1, 1)
    assert z.shape[1:] == (16, side // 8, side // 8)  # FLUX's factor 8
    normalised = (z[:64] - vae.config.shift_factor) * vae.config.scaling_factor
    assert abs(float(normalised.mean())) < 0.05 and abs(float(normalised.std()) - 1) < 0.05
    mse = float((((recon + 1) / 2 - (to_tensor(cells[64:96]) + 1) / 2) ** 2).mean())
    assert figures["psnr_db"] == pytest.approx(10 * math.log10(1 / mse), abs=1e-3)
    assert psnr(vae, cells[64:96]) == pytest.approx(figures["psnr_db"], abs=1e-6)
    assert MINI_VAE_CONFIG["use_quant_conv"] is False

