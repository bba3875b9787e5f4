"""Tests for the embedded tiny FLUX pipeline and the shared model loading path (CPU, offline, a few seconds)."""

from __future__ import annotations

import os

# Before anything imports huggingface_hub, which reads this once: nothing here may touch the network.
os.environ.setdefault("HF_HUB_OFFLINE", "1")

import json  # noqa: E402
import time  # noqa: E402
from pathlib import Path  # noqa: E402

import pytest  # noqa: E402
import torch  # noqa: E402
from safetensors.torch import load_file  # noqa: E402

from gridgen.embedded import flux_tiny  # noqa: E402
from gridgen.embedded.flux_tiny import (  # noqa: E402
    TINY_FLUX_CONFIG,
    build_tiny_flux,
    ensure_tiny_flux,
    tiny_flux_dirname,
)
from gridgen.models.loading import (  # noqa: E402
    ModelNotFoundError,
    load_flux_pipeline,
    looks_local,
    parse_dtype,
    resolve_pretrained,
)

CAPTION = "A 16-frame sequence arranged in a 4x4 grid. A red circle moves right on a blue background."


@pytest.fixture(scope="module")
def cache_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("gridgen_cache")


@pytest.fixture(scope="module")
def tiny_dir(cache_root: Path) -> Path:
    """The tiny pipeline, built once for this module through the cache (seed 0)."""
    return ensure_tiny_flux(cache_dir=cache_root, seed=0)


@pytest.fixture(scope="module")
def pipe(tiny_dir: Path):
    return load_flux_pipeline(tiny_dir)


def _state_dicts(folder: Path) -> dict[str, dict[str, torch.Tensor]]:
    return {
        sub: load_file(str(next((folder / sub).glob("*.safetensors"))))
        for sub in ("transformer", "vae", "text_encoder", "text_encoder_2")
    }


# ----------------------------------------------------------------------------------------------- build + load


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


def test_load_skips_components_and_casts(tiny_dir: Path) -> None:
    p = load_flux_pipeline(str(tiny_dir), dtype="bf16", load_vae=False, load_text_encoders=False)
    assert p.vae is None and p.text_encoder is None and p.text_encoder_2 is None
    assert p.tokenizer is None and p.tokenizer_2 is None
    assert p.transformer.dtype == torch.bfloat16
    encoders = load_flux_pipeline(str(tiny_dir), load_transformer=False)  # what `make cache` loads
    assert encoders.transformer is None and encoders.vae is not None and encoders.text_encoder_2 is not None


# ----------------------------------------------------------------------------------------------- determinism


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


# ----------------------------------------------------------------------------------------------- tokenizers


def test_tokenizers_round_trip(pipe) -> None:
    clip, t5 = pipe.tokenizer, pipe.tokenizer_2

    ids = clip(CAPTION).input_ids
    assert ids[0] == clip.bos_token_id and ids[-1] == clip.eos_token_id
    assert clip.eos_token_id != 2  # CLIPTextModel would fall back to legacy argmax pooling
    assert clip.decode(ids, skip_special_tokens=True).replace(" ", "") == CAPTION.lower().replace(" ", "")
    words = [t for t in clip.convert_ids_to_tokens(ids[1:-1]) if t.endswith("</w>")]
    assert {"grid</w>", "red</w>", "circle</w>", "background</w>"} <= set(words)  # learned whole words

    ids = t5(CAPTION).input_ids
    assert ids[-1] == t5.eos_token_id
    assert t5.unk_token_id not in ids
    assert t5.decode(ids, skip_special_tokens=True) == CAPTION
    assert len(ids) < 30  # caption words are single pieces, not characters

    unseen = "Zebra quokka xylophone 7x9!"  # out-of-corpus text falls back to characters, never unk
    assert clip.unk_token_id not in clip(unseen).input_ids[1:-1]
    assert t5.unk_token_id not in t5(unseen).input_ids


# ----------------------------------------------------------------------------------------------- errors


def test_missing_local_folder(tmp_path: Path) -> None:
    missing = tmp_path / "nope" / "FLUX.1-dev"
    with pytest.raises(ModelNotFoundError) as info:
        load_flux_pipeline(missing)
    msg = str(info.value)
    assert str(missing) in msg and "does not exist" in msg and "model.pretrained=" in msg
    assert "\n" not in msg
    assert isinstance(info.value, FileNotFoundError)


def test_local_folder_without_model_index(tmp_path: Path) -> None:
    with pytest.raises(ModelNotFoundError, match="model_index.json"):
        load_flux_pipeline(str(tmp_path))


def test_missing_hub_id_offline() -> None:
    repo = "gridgen-tests/not-a-cached-flux"  # never in any cache, unlike black-forest-labs/FLUX.1-dev may be
    with pytest.raises(ModelNotFoundError) as info:
        load_flux_pipeline(repo)
    msg = str(info.value)
    assert repo in msg and "offline" in msg and "hf download" in msg
    assert "\n" not in msg


def test_looks_local_and_parse_dtype() -> None:
    for s in ("/abs/flux", "./flux", "../flux", "~/flux", "models/flux/dev", "."):
        assert looks_local(s), s
    for s in ("black-forest-labs/FLUX.1-dev", "flux-tiny"):
        assert not looks_local(s), s
    assert parse_dtype("bf16") is torch.bfloat16 and parse_dtype("bfloat16") is torch.bfloat16
    assert parse_dtype("fp16") is torch.float16 and parse_dtype("float32") is torch.float32
    assert parse_dtype(torch.float16) is torch.float16
    with pytest.raises(ValueError):
        parse_dtype("int8")


# ----------------------------------------------------------------------------------------------- cache


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
