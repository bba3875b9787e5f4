"""The miniature world's models as FLUX pipeline folders: the same classes and files as FLUX.1-dev, small.

* :func:`build_mini_pipeline` saves a ``FluxPipeline`` folder from the mini VAE (:mod:`.mini_vae`), the embedded
  text encoders with tokenizers learned on the world's captions, and a freshly initialised transformer
  (:data:`MINI_TRANSFORMER_CONFIG`); ``gridgen.train adapter=full`` trains that transformer into the base model.
* :func:`mini_corpus`: the tokenizers' corpus, the built-in one plus every caption of the world, so that
  "triangle" is one token and not eight.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any

import torch

from gridgen.embedded.flux_tiny import build_tiny_flux_pipeline
from gridgen.embedded.tokenizers import caption_corpus, finalise_tokenizer_folders
from gridgen.embedded.world import (
    FRAME_PREFIXES,
    FRAME_SUFFIX,
    MINI_COLORS,
    MOTIONS,
    SHAPES,
    mini_caption,
    with_article,
)
from gridgen.runtime import default_cache_dir

log = logging.getLogger(__name__)

MARKER_FILE = "gridgen_mini.json"
BUILD_VERSION = 8  # bump when what `make mini`'s build makes changes, so stale caches are not reused
DEFAULT_BUILD = f"mini-v{BUILD_VERSION}"  # the default build's folder under the cache (data=mini, model=flux_mini)

# FLUX.1-dev's transformer (guidance embedding, rope over (t, y, x)), 2 + 4 blocks of width 128. The text widths
# are the embedded encoders' (T5 d_model 32, CLIP hidden 32).
MINI_TRANSFORMER_CONFIG: dict[str, Any] = {
    "patch_size": 1,
    "in_channels": 64,  # 16 latent channels x 2x2 packing
    "out_channels": None,
    "num_layers": 2,
    "num_single_layers": 4,
    "attention_head_dim": 32,
    "num_attention_heads": 4,
    "joint_attention_dim": 32,
    "pooled_projection_dim": 32,
    "guidance_embeds": True,
    "axes_dims_rope": (8, 12, 12),  # sums to attention_head_dim
}


def mini_corpus() -> list[str]:
    """The built-in caption corpus plus every grid caption, the frames' wordings and shape lists of the world."""
    lines = caption_corpus()
    lines += [f"A 16-frame sequence arranged in a 4x4 grid. {mini_caption(s, c, m)}"
              for s in SHAPES for c in MINI_COLORS for m in MOTIONS]
    names = [f"{with_article(c)} {s}" for s in SHAPES for c in MINI_COLORS]
    lines += [f"{FRAME_PREFIXES[i % len(FRAME_PREFIXES)]} {name} {FRAME_SUFFIX}" for i, name in enumerate(names)]
    lines += names + [f"{a}, {b} and {c}" for a, b, c in zip(names, names[5:] + names[:5], names[11:] + names[:11],
                                                             strict=True)]
    return lines


def build_mini_pipeline(vae: Any, out: str | Path, seed: int = 0, marker: dict[str, Any] | None = None) -> Path:
    """Save a complete FluxPipeline folder at ``out`` (written in a temporary sibling, renamed into place): the
    given VAE, embedded text encoders with :func:`mini_corpus` tokenizers, a new transformer seeded by ``seed``."""
    from diffusers import FluxPipeline, FluxTransformer2DModel

    from gridgen._quiet import library_progress_bars_off

    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.tmp-", dir=out.parent))
    try:
        tiny = build_tiny_flux_pipeline(seed, staging_dir=tmp, corpus=mini_corpus())
        torch.manual_seed(seed)
        transformer = FluxTransformer2DModel(**MINI_TRANSFORMER_CONFIG)
        pipe = FluxPipeline(scheduler=tiny.scheduler, vae=vae, text_encoder=tiny.text_encoder,
                            tokenizer=tiny.tokenizer, text_encoder_2=tiny.text_encoder_2,
                            tokenizer_2=tiny.tokenizer_2, transformer=transformer)
        with library_progress_bars_off():
            pipe.save_pretrained(str(tmp), safe_serialization=True)
        finalise_tokenizer_folders(tmp)
        for leftover in ("clip", "t5"):  # the tokenizers' staging folders
            shutil.rmtree(tmp / leftover, ignore_errors=True)
        (tmp / MARKER_FILE).write_text(json.dumps({"seed": seed, "transformer": MINI_TRANSFORMER_CONFIG,
                                                   **(marker or {})}, indent=2) + "\n")
        os.chmod(tmp, 0o755)
        os.rename(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out


def mini_base_folder(cache_dir: str | Path | None = None) -> Path:
    """The default build's base model (``model.pretrained=embedded:mini``); refused with one line until ``make mini``
    has built it (it is never built implicitly: that takes about 20 minutes)."""
    build = (Path(cache_dir).expanduser() if cache_dir is not None else default_cache_dir()) / DEFAULT_BUILD
    base = build / "base"
    if not ((base / "done.json").is_file() and (base / "model_index.json").is_file()):
        raise FileNotFoundError(f"model=flux_mini (embedded:mini) is the miniature's base model, not built yet at {base}: "
                                "build it once with `make mini stop_after=build` (about 20 min on 2 CPU cores; "
                                "`make mini` builds it too)")
    return base
