"""LoraExport: the export is readable like the checkpoints, loads in diffusers with gridgen's output, and its
formats are checked."""

import os

import pytest
import torch
from diffusers import FluxPipeline

from gridgen.embedded import ensure_tiny_flux


def test_exported_lora_is_readable_like_the_checkpoints(trained_run):
    run, _, _ = trained_run
    export = (run / "lora" / "pytorch_lora_weights.safetensors").stat().st_mode & 0o777
    assert export == (run / "checkpoints" / "last.ckpt").stat().st_mode & 0o777 == 0o666 & ~current_umask()


def current_umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def test_export_loads_in_diffusers_and_matches(trained_run):
    run, cfg, _ = trained_run
    from gridgen.training.module import GridModule

    module = GridModule(model=cfg.model, lora=cfg.lora, optim=cfg.optim, loss=cfg.loss, init_lora=str(run / "lora"))
    module.configure_model()  # gridgen's adapted transformer, weights from the export

    pipe = FluxPipeline.from_pretrained(ensure_tiny_flux())
    gen = torch.Generator().manual_seed(0)
    inputs = dict(hidden_states=torch.randn(1, 64, 64, generator=gen), timestep=torch.tensor([0.7]),
                  guidance=torch.tensor([3.5]), pooled_projections=torch.randn(1, 32, generator=gen),
                  encoder_hidden_states=torch.randn(1, 8, 32, generator=gen), txt_ids=torch.zeros(8, 3),
                  img_ids=torch.zeros(64, 3), return_dict=False)
    with torch.no_grad():
        before = pipe.transformer(**inputs)[0]
        pipe.load_lora_weights(run / "lora")
        diffusers_out = pipe.transformer(**inputs)[0]
        ours = module.transformer.eval()(**inputs)[0]
    assert (diffusers_out - before).abs().max() > 1e-4  # the LoRA changes the output ...
    torch.testing.assert_close(diffusers_out, ours, rtol=1e-5, atol=1e-6)  # ... identically in both


def test_export_formats_must_include_diffusers():
    from gridgen.training.callbacks import LoraExport

    with pytest.raises(ValueError, match=r"must include diffusers"):
        LoraExport("unused", formats=["kohya"])
    with pytest.raises(ValueError, match=r"lora.export_formats must list distinct formats"):
        LoraExport("unused", formats=["diffusers", "safetensor"])
    assert LoraExport("unused", formats=["diffusers", "kohya"]).formats == ["diffusers", "kohya"]
