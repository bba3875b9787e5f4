"""The embedded tiny FLUX pipeline: a diffusers FluxPipeline folder with FLUX.1-dev's shapes, built
deterministically, cached, and never half-written."""

from __future__ import annotations

import json
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from gridgen.embedded import flux_tiny
from gridgen.embedded.flux_tiny import TINY_FLUX_CONFIG, build_tiny_flux, ensure_tiny_flux, tiny_flux_dirname
from gridgen.models.loading import resolve_pretrained
from tests.helpers.flux import CAPTION


def _state_dicts(folder: Path) -> dict[str, dict[str, torch.Tensor]]:
    return {
        sub: load_file(str(next((folder / sub).glob("*.safetensors"))))
        for sub in ("transformer", "vae", "text_encoder", "text_encoder_2")
    }


def test_folder_is_a_diffusers_flux_pipeline(tiny_dir: Path) -> None:
    assert tiny_dir.name == tiny_flux_dirname(0) == "flux_tiny-v1-seed0"
    index = json.loads((tiny_dir / "model_index.json").read_text())
    assert index["_class_name"] == "FluxPipeline"
    for sub in (
        "transformer",
        "vae",
        "text_encoder",
        "tokenizer",
        "text_encoder_2",
        "tokenizer_2",
        "scheduler",
    ):
        assert (tiny_dir / sub).is_dir(), sub
    # both transformers 4 (slow CLIP: vocab.json + merges.txt) and 5 (tokenizer.json) can read the CLIP tokenizer
    for name in ("tokenizer.json", "vocab.json", "merges.txt"):
        assert (tiny_dir / "tokenizer" / name).is_file()
    assert "local_files_only" not in json.loads(
        (tiny_dir / "tokenizer" / "tokenizer_config.json").read_text()
    )
    assert not list(tiny_dir.parent.glob(".*tmp-*")), "temporary build folders left behind"


def test_load_has_flux_dev_shapes(pipe) -> None:
    from diffusers import AutoencoderKL, FlowMatchEulerDiscreteScheduler, FluxPipeline, FluxTransformer2DModel
    from transformers import CLIPTextModel, CLIPTokenizer, T5EncoderModel, T5TokenizerFast

    assert isinstance(pipe, FluxPipeline)
    assert isinstance(pipe.transformer, FluxTransformer2DModel)
    assert isinstance(pipe.vae, AutoencoderKL)
    assert isinstance(pipe.text_encoder, CLIPTextModel)
    assert isinstance(pipe.text_encoder_2, T5EncoderModel)
    assert isinstance(pipe.tokenizer, CLIPTokenizer)
    assert isinstance(pipe.tokenizer_2, T5TokenizerFast)
    assert isinstance(pipe.scheduler, FlowMatchEulerDiscreteScheduler)

    tcfg = pipe.transformer.config
    assert tcfg.guidance_embeds is True
    for key in (
        "in_channels",
        "num_layers",
        "num_single_layers",
        "attention_head_dim",
        "joint_attention_dim",
    ):
        assert tcfg[key] == TINY_FLUX_CONFIG[key]
    assert tuple(tcfg.axes_dims_rope) == TINY_FLUX_CONFIG["axes_dims_rope"]
    vcfg = pipe.vae.config
    assert vcfg.shift_factor == pytest.approx(0.1159) and vcfg.scaling_factor == pytest.approx(0.3611)
    assert vcfg.latent_channels == 16 and pipe.vae_scale_factor == 8
    assert not vcfg.use_quant_conv and not vcfg.use_post_quant_conv
    assert pipe.text_encoder.config.hidden_size == tcfg.pooled_projection_dim
    assert pipe.text_encoder_2.config.d_model == tcfg.joint_attention_dim
    scfg = pipe.scheduler.config
    assert scfg.use_dynamic_shifting and scfg.base_shift == 0.5 and scfg.max_shift == 1.15
    assert (scfg.base_image_seq_len, scfg.max_image_seq_len, scfg.shift) == (256, 4096, 3.0)
    assert pipe.tokenizer.model_max_length == 77 and pipe.tokenizer_2.model_max_length == 512


def test_encode_prompt(pipe) -> None:
    prompt_embeds, pooled, text_ids = pipe.encode_prompt(CAPTION, prompt_2=None, max_sequence_length=32)
    assert prompt_embeds.shape == (1, 32, TINY_FLUX_CONFIG["joint_attention_dim"])
    assert pooled.shape == (1, TINY_FLUX_CONFIG["pooled_projection_dim"])
    assert text_ids.shape == (32, 3)
    assert torch.isfinite(prompt_embeds).all() and torch.isfinite(pooled).all()


def test_pipeline_runs_end_to_end(pipe) -> None:
    out = pipe(
        "A 4-frame sequence arranged in a 2x2 grid. a red circle",
        height=64,
        width=64,
        num_inference_steps=2,
        guidance_scale=3.5,
        max_sequence_length=32,
        output_type="pt",
        generator=torch.Generator().manual_seed(0),
    )
    assert out.images.shape == (1, 3, 64, 64)
    assert torch.isfinite(out.images).all()


def test_build_is_deterministic(tiny_dir: Path, tmp_path: Path) -> None:
    again = build_tiny_flux(tmp_path / "seed0", seed=0)
    other = build_tiny_flux(tmp_path / "seed1", seed=1)
    ref, same, diff = _state_dicts(tiny_dir), _state_dicts(again), _state_dicts(other)
    for sub in ref:
        assert ref[sub].keys() == same[sub].keys()
        assert all(torch.equal(ref[sub][k], same[sub][k]) for k in ref[sub]), sub
        assert not all(torch.equal(ref[sub][k], diff[sub][k]) for k in ref[sub]), sub
    for tok in ("tokenizer", "tokenizer_2"):  # tokenizer training is deterministic too
        assert (tiny_dir / tok / "tokenizer.json").read_bytes() == (
            again / tok / "tokenizer.json"
        ).read_bytes()


def test_ensure_tiny_flux_is_cached(
    tiny_dir: Path, cache_root: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    stamp = (tiny_dir / "model_index.json").stat().st_mtime_ns

    def no_rebuild(*args, **kwargs):
        raise AssertionError("ensure_tiny_flux rebuilt a cached pipeline")

    monkeypatch.setattr(flux_tiny, "build_tiny_flux", no_rebuild)
    start = time.perf_counter()
    assert ensure_tiny_flux(cache_dir=cache_root, seed=0) == tiny_dir
    assert time.perf_counter() - start < 1.0
    # the default cache root comes from GRIDGEN_CACHE, and "embedded:tiny" resolves through it
    monkeypatch.setenv("GRIDGEN_CACHE", str(cache_root))
    assert resolve_pretrained("embedded:tiny") == str(tiny_dir)
    assert resolve_pretrained("tiny") == str(tiny_dir)
    assert resolve_pretrained("black-forest-labs/FLUX.1-dev") == "black-forest-labs/FLUX.1-dev"
    assert (tiny_dir / "model_index.json").stat().st_mtime_ns == stamp


def test_interrupted_build_leaves_nothing(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    def crash(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(flux_tiny, "build_tiny_flux_pipeline", crash)
    with pytest.raises(KeyboardInterrupt):
        build_tiny_flux(tmp_path / "tiny", seed=0)
    assert list(tmp_path.iterdir()) == []


def test_build_refuses_foreign_folder(tmp_path: Path) -> None:
    (tmp_path / "precious.txt").write_text("keep me")
    with pytest.raises(FileExistsError):
        build_tiny_flux(tmp_path, seed=0)
    assert (tmp_path / "precious.txt").read_text() == "keep me"
