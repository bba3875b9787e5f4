"""load_flux_pipeline: components skipped and cast, missing folders and hub ids as one-line errors, local paths
and dtypes."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from gridgen.models.loading import ModelNotFoundError, load_flux_pipeline, looks_local, parse_dtype


def test_load_skips_components_and_casts(tiny_dir: Path) -> None:
    p = load_flux_pipeline(str(tiny_dir), dtype="bf16", load_vae=False, load_text_encoders=False)
    assert p.vae is None and p.text_encoder is None and p.text_encoder_2 is None
    assert p.tokenizer is None and p.tokenizer_2 is None
    assert p.transformer.dtype == torch.bfloat16
    encoders = load_flux_pipeline(str(tiny_dir), load_transformer=False)  # what `make cache` loads
    assert encoders.transformer is None and encoders.vae is not None and encoders.text_encoder_2 is not None


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
