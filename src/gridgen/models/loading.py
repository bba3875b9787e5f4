"""The one loading path for every FLUX model gridgen uses: a local diffusers folder, a hub id, or the embedded tiny one.

Everything goes through ``FluxPipeline.from_pretrained`` so that the tiny test pipeline and FLUX.1-dev exercise
the same code. Hub ids are read from the local Hugging Face cache only (by default): training jobs should never
start a 30 GB download by surprise, and clusters are often offline. Missing weights raise one clear line.
"""

from __future__ import annotations

import logging
import os
import re
from pathlib import Path
from typing import TYPE_CHECKING

import torch

from gridgen._quiet import library_progress_bars_off

if TYPE_CHECKING:
    from diffusers import FluxPipeline

logger = logging.getLogger(__name__)

EMBEDDED_TINY_NAMES = ("embedded:tiny", "tiny")
_HINT = "set model.pretrained=<local FLUX.1-dev folder or hub id> (see README: Models)"
# A hub id is "name" or "owner/name" made of these characters; anything else can only be a path.
_REPO_ID_RE = re.compile(r"^[A-Za-z0-9][\w.-]*(/[\w.-]+)?$")

_DTYPES: dict[str, torch.dtype] = {
    "float32": torch.float32,
    "fp32": torch.float32,
    "32": torch.float32,
    "bfloat16": torch.bfloat16,
    "bf16": torch.bfloat16,
    "float16": torch.float16,
    "fp16": torch.float16,
    "half": torch.float16,
    "16": torch.float16,
}


class ModelNotFoundError(FileNotFoundError):
    """The requested model weights are not available locally; the message says what to set or download."""


def parse_dtype(dtype: str | torch.dtype) -> torch.dtype:
    """``"float32"/"fp32"``, ``"bfloat16"/"bf16"``, ``"float16"/"fp16"`` (or a ``torch.dtype``) -> ``torch.dtype``."""
    if isinstance(dtype, torch.dtype):
        return dtype
    key = str(dtype).strip().lower().removeprefix("torch.")
    if key not in _DTYPES:
        raise ValueError(f"unknown dtype {dtype!r}; use one of float32/fp32, bfloat16/bf16, float16/fp16")
    return _DTYPES[key]


def resolve_pretrained(name_or_path: str | Path) -> str:
    """Map ``"embedded:tiny"`` / ``"tiny"`` to the cached tiny FLUX folder (built on first use); pass others through."""
    name = str(name_or_path).strip()
    if name.lower() in EMBEDDED_TINY_NAMES:
        from gridgen.embedded import ensure_tiny_flux  # the one seam from models/ into the embedded wing

        return str(ensure_tiny_flux())
    return name


def looks_local(name_or_path: str | Path) -> bool:
    """True if ``name_or_path`` should be read as a filesystem path rather than a hub id."""
    s = str(name_or_path)
    return (
        isinstance(name_or_path, Path)
        or os.path.isabs(s)
        or s in (".", "..", "~")
        or s.startswith(("./", "../", "~", ".\\", "..\\"))
        or "\\" in s
        or not _REPO_ID_RE.match(s)  # e.g. "models/flux/dev": three parts cannot be a repo id
        or os.path.exists(os.path.expanduser(s))
    )


def _short_reason(exc: BaseException, limit: int = 200) -> str:
    """First line of an exception message, shortened: the full chain stays available via ``__cause__``."""
    from huggingface_hub.errors import LocalEntryNotFoundError

    if isinstance(exc, LocalEntryNotFoundError):
        return "not in the local Hugging Face cache"
    text = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
    return text if len(text) <= limit else text[: limit - 3] + "..."


def _dtype_kwarg() -> str:
    """Name of from_pretrained's dtype argument: diffusers 0.42 renamed ``torch_dtype`` (now warns) to ``dtype``."""
    try:
        from diffusers.utils import deprecation_utils
    except ImportError:  # older diffusers
        return "torch_dtype"
    return "dtype" if hasattr(deprecation_utils, "_resolve_dtype") else "torch_dtype"


def _check_folder(name: str) -> Path:
    folder = Path(name).expanduser()
    if not folder.is_dir():
        raise ModelNotFoundError(f"model folder '{folder}' does not exist; {_HINT}")
    if not (folder / "model_index.json").is_file():
        raise ModelNotFoundError(f"model folder '{folder}' has no model_index.json (not a diffusers pipeline folder); {_HINT}")
    return folder


def check_model_source(pretrained: str | Path, revision: str | None = None) -> str:
    """Raise ``ModelNotFoundError`` (one line) unless ``pretrained`` can be loaded offline: a diffusers folder,
    or a hub id in the local HF cache; returns the resolved name. Cheap: reads no weights."""
    name = resolve_pretrained(pretrained)
    if isinstance(pretrained, Path) or looks_local(name):
        _check_folder(name)
        return name
    from huggingface_hub import try_to_load_from_cache

    if not isinstance(try_to_load_from_cache(name, "model_index.json", revision=revision), str):
        raise ModelNotFoundError(f"'{name}' is not in the local Hugging Face cache; download it once with "
                                 f"`hf download {name}` (gated models such as FLUX.1-dev need `hf auth login` first) "
                                 "or set model.pretrained=<local folder>")
    return name


def load_flux_pipeline(
    pretrained: str | Path,
    *,
    dtype: str | torch.dtype = "float32",
    device: str | torch.device = "cpu",
    load_vae: bool = True,
    load_text_encoders: bool = True,
    load_transformer: bool = True,
    revision: str | None = None,
    variant: str | None = None,
    local_files_only: bool = True,
    quantization: str | None = None,
    quantize_text_encoder: bool = False,
) -> FluxPipeline:
    """Load a ``FluxPipeline`` from a local diffusers folder, a hub id (local HF cache) or ``"embedded:tiny"``.

    ``load_vae=False`` / ``load_text_encoders=False`` / ``load_transformer=False`` skip those components (they
    are ``None`` in the pipeline), e.g. when latents or text embeddings are precomputed, or when only the
    encoders run (``make cache``). ``local_files_only=False`` allows downloading a hub id.
    ``quantization``: one of ``gridgen.models.quantization.SCHEMES`` (or None): the transformer's frozen weights
    are quantized while they load, through diffusers' own ``quantization_config``; ``quantize_text_encoder``
    also quantizes T5 with the same scheme.
    Raises ``ModelNotFoundError`` (one line) when the weights are not there.
    """
    from diffusers import FluxPipeline

    name = resolve_pretrained(pretrained)
    torch_dtype = parse_dtype(dtype)
    skipped: dict[str, None] = {}
    if not load_vae:
        skipped["vae"] = None
    if not load_text_encoders:
        skipped.update(text_encoder=None, text_encoder_2=None, tokenizer=None, tokenizer_2=None)
    if not load_transformer:
        skipped["transformer"] = None
    kwargs = {_dtype_kwarg(): torch_dtype, "variant": variant, **skipped}
    if quantization is not None:
        from gridgen.models.quantization import pipeline_quantization_config

        kwargs["quantization_config"] = pipeline_quantization_config(
            quantization, torch_dtype, text_encoder=quantize_text_encoder and load_text_encoders)

    if isinstance(pretrained, Path) or looks_local(name):
        folder = _check_folder(name)
        logger.info("loading FLUX pipeline from %s", folder)
        try:
            # revision only means something for the hub; a local folder is one fixed version
            with library_progress_bars_off():
                pipe = FluxPipeline.from_pretrained(str(folder), **kwargs)
        except OSError as e:  # a component folder or weight file is missing
            raise ModelNotFoundError(
                f"could not load model folder '{folder}': {_short_reason(e)}; {_HINT}"
            ) from e
    else:
        from huggingface_hub.errors import HFValidationError

        logger.info("loading FLUX pipeline %s (revision %s) from the HF cache", name, revision or "main")
        try:
            with library_progress_bars_off():
                pipe = FluxPipeline.from_pretrained(
                    name, revision=revision, local_files_only=local_files_only, **kwargs
                )
        except (OSError, HFValidationError) as e:  # not cached / not downloadable / not a valid repo id
            mode = "offline" if local_files_only else "from the Hugging Face hub"
            raise ModelNotFoundError(
                f"could not load '{name}' {mode}: {_short_reason(e)}; download it once with "
                f"`hf download {name}` (gated models such as FLUX.1-dev need `hf auth login` first) "
                f"or set model.pretrained=<local folder>"
            ) from e
    if quantization is not None and quantization.startswith("bnb"):
        # bitsandbytes placed its quantized weights on the CUDA device while loading (.to() would refuse them);
        # the components it did not quantize (VAE, CLIP, T5 unless quantize_text_encoder) still need moving
        for component in (pipe.vae, pipe.text_encoder, pipe.text_encoder_2):
            if component is not None and not getattr(component, "is_quantized", False):
                component.to(device)
        return pipe
    return pipe.to(device)
