"""A tiny but complete FLUX.1-dev-shaped diffusers pipeline, built in code.

Tests, smoke runs and CI need a FLUX pipeline without downloading 30 GB of gated weights. This module builds
one from scratch: every component has FLUX.1-dev's architecture and config keys (a guidance-distilled
``FluxTransformer2DModel``, a 16-channel VAE with spatial factor 8 and FLUX's shift/scaling factors, CLIP and T5
text encoders, FLUX.1-dev's scheduler config) but only a few thousand parameters each, and the tokenizers are
trained in code on a built-in caption corpus (:mod:`gridgen.embedded.tokenizers`). The result is saved with ``save_pretrained`` so that it goes
through exactly the same ``FluxPipeline.from_pretrained`` path as the real model.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import tempfile
import uuid
from pathlib import Path
from typing import Any

import torch

from gridgen.embedded.tokenizers import build_tiny_tokenizers, finalise_tokenizer_folders
from gridgen.runtime import default_cache_dir

logger = logging.getLogger(__name__)

# Bump whenever anything below changes what gets built, so that stale caches are not reused.
TINY_FLUX_FORMAT_VERSION = 1
TINY_FLUX_NAME = "flux_tiny"
# Written last into a built folder; its presence (with the right version) marks the build as ours and complete.
MARKER_FILE = "gridgen_tiny.json"

# Transformer sizes. FLUX.1-dev: 19 double / 38 single blocks, 24 heads x 128, T5 4096, CLIP 768, rope (16, 56, 56).
TINY_FLUX_CONFIG: dict[str, Any] = {
    "patch_size": 1,
    "in_channels": 64,  # 16 latent channels x 2x2 packing
    "out_channels": None,  # = in_channels
    "num_layers": 2,
    "num_single_layers": 2,
    "attention_head_dim": 16,
    "num_attention_heads": 4,
    "joint_attention_dim": 32,  # = T5 d_model
    "pooled_projection_dim": 32,  # = CLIP hidden_size
    "guidance_embeds": True,  # FLUX.1-dev is guidance-distilled
    "axes_dims_rope": (4, 6, 6),  # must sum to attention_head_dim
}

# FLUX's VAE: 16 latent channels, 4 blocks (spatial factor 2**3 = 8), no quant convs, shift + scaling factor.
TINY_VAE_CONFIG: dict[str, Any] = {
    "in_channels": 3,
    "out_channels": 3,
    "down_block_types": ("DownEncoderBlock2D",) * 4,
    "up_block_types": ("UpDecoderBlock2D",) * 4,
    "block_out_channels": (8, 16, 16, 16),
    "layers_per_block": 1,
    "act_fn": "silu",
    "latent_channels": 16,
    "norm_num_groups": 4,
    "sample_size": 64,
    "scaling_factor": 0.3611,
    "shift_factor": 0.1159,
    "force_upcast": True,
    "use_quant_conv": False,
    "use_post_quant_conv": False,
}

# openai/clip-vit-large-patch14 text tower, shrunk; hidden_size must equal pooled_projection_dim.
TINY_CLIP_CONFIG: dict[str, Any] = {
    "hidden_size": 32,
    "intermediate_size": 64,
    "num_hidden_layers": 2,
    "num_attention_heads": 4,
    "max_position_embeddings": 77,
    "hidden_act": "quick_gelu",
    "projection_dim": 32,
}

# google/t5-v1_1-xxl encoder, shrunk; d_model must equal joint_attention_dim.
TINY_T5_CONFIG: dict[str, Any] = {
    "d_model": 32,
    "d_kv": 8,
    "d_ff": 64,
    "num_layers": 2,
    "num_heads": 4,
    "relative_attention_num_buckets": 8,
    "relative_attention_max_distance": 32,
    "dropout_rate": 0.0,
    "feed_forward_proj": "gated-gelu",
    "tie_word_embeddings": False,
}

# black-forest-labs/FLUX.1-dev scheduler/scheduler_config.json.
FLUX_DEV_SCHEDULER_CONFIG: dict[str, Any] = {
    "num_train_timesteps": 1000,
    "shift": 3.0,
    "use_dynamic_shifting": True,
    "base_shift": 0.5,
    "max_shift": 1.15,
    "base_image_seq_len": 256,
    "max_image_seq_len": 4096,
}

# ----------------------------------------------------------------------------------------------- models


def build_tiny_flux_pipeline(seed: int = 0, staging_dir: str | Path | None = None, corpus: list[str] | None = None
                             ) -> Any:
    """Build the tiny ``FluxPipeline`` in memory (float32, CPU). Same seed -> bitwise-identical weights.

    ``corpus``: the captions its tokenizers learn from (default: the built-in one); the text encoders' vocabularies
    follow the tokenizers'."""
    from diffusers import AutoencoderKL, FlowMatchEulerDiscreteScheduler, FluxPipeline, FluxTransformer2DModel
    from transformers import CLIPTextConfig, CLIPTextModel, T5Config, T5EncoderModel

    if sum(TINY_FLUX_CONFIG["axes_dims_rope"]) != TINY_FLUX_CONFIG["attention_head_dim"]:
        raise ValueError("axes_dims_rope must sum to attention_head_dim")

    with tempfile.TemporaryDirectory(dir=staging_dir) as tmp:
        clip_tok, t5_tok = build_tiny_tokenizers(tmp, corpus)

    # Reseed before every component: each one's weights then depend only on (seed, its own config), not on
    # how many random numbers the others drew.
    torch.manual_seed(seed)
    transformer = FluxTransformer2DModel(**TINY_FLUX_CONFIG)
    torch.manual_seed(seed + 1)
    vae = AutoencoderKL(**TINY_VAE_CONFIG)
    torch.manual_seed(seed + 2)
    clip_config = CLIPTextConfig(
        vocab_size=len(clip_tok),
        bos_token_id=clip_tok.bos_token_id,
        eos_token_id=clip_tok.eos_token_id,  # pooled output = hidden state at the first eos
        pad_token_id=clip_tok.pad_token_id,
        **TINY_CLIP_CONFIG,
    )
    text_encoder = CLIPTextModel(clip_config)
    torch.manual_seed(seed + 3)
    t5_config = T5Config(
        vocab_size=len(t5_tok),
        num_decoder_layers=TINY_T5_CONFIG["num_layers"],
        pad_token_id=t5_tok.pad_token_id,
        eos_token_id=t5_tok.eos_token_id,
        decoder_start_token_id=t5_tok.pad_token_id,
        **TINY_T5_CONFIG,
    )
    text_encoder_2 = T5EncoderModel(t5_config)
    scheduler = FlowMatchEulerDiscreteScheduler(**FLUX_DEV_SCHEDULER_CONFIG)

    for module in (transformer, vae, text_encoder, text_encoder_2):
        module.eval()
    return FluxPipeline(
        scheduler=scheduler,
        vae=vae,
        text_encoder=text_encoder,
        tokenizer=clip_tok,
        text_encoder_2=text_encoder_2,
        tokenizer_2=t5_tok,
        transformer=transformer,
    )


# ----------------------------------------------------------------------------------------------- on disk


def tiny_flux_dirname(seed: int = 0) -> str:
    """Cache folder name of the tiny pipeline for ``seed``, e.g. ``flux_tiny-v1-seed0``."""
    return f"{TINY_FLUX_NAME}-v{TINY_FLUX_FORMAT_VERSION}-seed{seed}"


def is_tiny_flux_folder(folder: str | Path, seed: int | None = None) -> bool:
    """True if ``folder`` holds a complete tiny pipeline of the current format version (and ``seed``, if given)."""
    folder = Path(folder)
    try:
        marker = json.loads((folder / MARKER_FILE).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return False
    return (
        (folder / "model_index.json").is_file()
        and marker.get("format_version") == TINY_FLUX_FORMAT_VERSION
        and (seed is None or marker.get("seed") == seed)
    )


def _move_into_place(src: Path, dst: Path) -> None:
    """Rename the finished build ``src`` to ``dst``, replacing an older tiny build there."""
    try:
        os.replace(src, dst)  # atomic; fails if dst is a non-empty folder
        return
    except OSError:
        if not dst.exists():
            raise
    # dst exists: swap it out (two renames, each atomic) and delete the old copy afterwards.
    old = dst.with_name(f".{dst.name}.old-{uuid.uuid4().hex[:8]}")
    os.replace(dst, old)
    os.replace(src, dst)
    shutil.rmtree(old, ignore_errors=True)


def build_tiny_flux(out_dir: str | Path, seed: int = 0) -> Path:
    """Build the tiny FLUX pipeline for ``seed`` and save it in diffusers format to ``out_dir``; returns it.

    The pipeline is written into a temporary sibling folder and renamed into place at the end, so an
    interrupted build never leaves a complete-looking half-written ``out_dir``. An existing tiny build at
    ``out_dir`` is replaced; any other non-empty folder there is refused.
    """
    out_dir = Path(out_dir).expanduser().absolute()
    if out_dir.exists() and any(out_dir.iterdir()) and not is_tiny_flux_folder(out_dir):
        raise FileExistsError(f"refusing to overwrite '{out_dir}': it is not empty and not a tiny FLUX build")
    out_dir.parent.mkdir(parents=True, exist_ok=True)

    tmp = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.tmp-", dir=out_dir.parent))
    try:
        pipe = build_tiny_flux_pipeline(seed, staging_dir=tmp)
        from gridgen._quiet import library_progress_bars_off

        with library_progress_bars_off():
            pipe.save_pretrained(str(tmp), safe_serialization=True)
        finalise_tokenizer_folders(tmp)
        marker = {"format_version": TINY_FLUX_FORMAT_VERSION, "seed": seed, "transformer": TINY_FLUX_CONFIG}
        (tmp / MARKER_FILE).write_text(json.dumps(marker, indent=2) + "\n", encoding="utf-8")
        os.chmod(tmp, 0o755)  # mkdtemp makes it 0700; a shared GRIDGEN_CACHE should stay readable
        _move_into_place(tmp, out_dir)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    logger.info("built tiny FLUX pipeline (seed %d) in %s", seed, out_dir)
    return out_dir


def ensure_tiny_flux(cache_dir: str | Path | None = None, seed: int = 0) -> Path:
    """Return the folder of the cached tiny FLUX pipeline for ``seed``, building it on first use.

    Safe under concurrency: builders serialise on a file lock next to the folder, and the folder only appears
    (atomically) once complete, so readers that skip the lock never see a partial build.
    """
    from filelock import FileLock

    root = Path(cache_dir).expanduser() if cache_dir is not None else default_cache_dir()
    folder = root / tiny_flux_dirname(seed)
    if is_tiny_flux_folder(folder, seed):
        return folder
    root.mkdir(parents=True, exist_ok=True)
    with FileLock(str(root / f"{folder.name}.lock")):
        if not is_tiny_flux_folder(folder, seed):  # another process may have built it while we waited
            logger.info("building tiny FLUX pipeline in %s (first use)", folder)
            build_tiny_flux(folder, seed)
    return folder
