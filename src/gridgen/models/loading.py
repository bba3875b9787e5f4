"""The one loading path for every FLUX model gridgen uses: a local diffusers folder, a hub id, or the embedded tiny one.

Everything goes through ``FluxPipeline.from_pretrained`` so that the tiny test pipeline and FLUX.1-dev exercise
the same code. Hub ids are read from the local Hugging Face cache only (by default): training jobs should never
start a 30 GB download by surprise, and clusters are often offline. Missing weights raise one clear line.
"""

from __future__ import annotations

import json
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
EMBEDDED_MINI = "embedded:mini"  # the miniature's base model (model=flux_mini), built by `make mini`
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
    """Map ``"embedded:tiny"`` / ``"tiny"`` to the cached tiny FLUX folder (built on first use), ``"embedded:mini"``
    to the miniature's base model (refused until ``make mini`` built it); pass others through."""
    name = str(name_or_path).strip()
    if name.lower() in EMBEDDED_TINY_NAMES:
        from gridgen.embedded import ensure_tiny_flux  # the one seam from models/ into the embedded wing

        return str(ensure_tiny_flux())
    if name.lower() == EMBEDDED_MINI:
        from gridgen.embedded.mini_model import mini_base_folder  # built by `make mini`, never here

        return str(mini_base_folder())
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


def local_pipeline_folder(pretrained: str | Path, revision: str | None = None) -> Path:
    """The folder holding ``pretrained``'s files: a local diffusers folder, or a hub id's snapshot in the local
    Hugging Face cache (never downloaded); ``ModelNotFoundError`` (one line) otherwise."""
    name = resolve_pretrained(pretrained)
    if isinstance(pretrained, Path) or looks_local(name):
        return _check_folder(name)
    from huggingface_hub import snapshot_download

    try:
        snapshot = snapshot_download(name, revision=revision, local_files_only=True)
    except Exception as err:  # not cached, not a repo id: one line, like load_flux_pipeline's
        raise ModelNotFoundError(f"'{name}' is not in the local Hugging Face cache ({_short_reason(err)}); download it "
                                 f"once with `hf download {name}` or set model.pretrained=<local folder>") from err
    return _check_folder(snapshot)


# ---- a transformer folder replacing the pipeline's (model.transformer) ------------------------------------
_TRANSFORMER_HINT = ("model.transformer takes a folder written by diffusers' save_pretrained of a FluxTransformer2DModel "
                     "(config.json + .safetensors), e.g. <run>/transformer of an adapter=full run")


class TransformerFolderError(ModelNotFoundError):
    """A ``model.transformer`` folder that is missing, not a FluxTransformer2DModel in safetensors, or does not fit
    the pipeline it is put in."""


def check_transformer_folder(folder: str | Path) -> Path:
    """Raise :class:`TransformerFolderError` (one line) unless ``folder`` holds a diffusers FluxTransformer2DModel
    saved as safetensors (read from JSON and file names only: cheap, and nothing is unpickled); returns it."""
    path = Path(str(folder)).expanduser()
    if not path.is_dir():
        raise TransformerFolderError(f"model.transformer '{folder}' is not a folder; {_TRANSFORMER_HINT}")
    if (path / "model_index.json").is_file():
        raise TransformerFolderError(f"model.transformer '{folder}' is a whole pipeline folder (model_index.json); use "
                                     f"model.pretrained={folder}, or model.transformer={Path(str(folder)) / 'transformer'}")
    try:
        class_name = json.loads((path / "config.json").read_text()).get("_class_name")
    except (OSError, ValueError, AttributeError) as err:
        raise TransformerFolderError(f"model.transformer '{folder}' has no readable config.json ({type(err).__name__}); "
                                     f"{_TRANSFORMER_HINT}") from None
    if class_name != "FluxTransformer2DModel":
        raise TransformerFolderError(f"model.transformer '{folder}' holds a {class_name}, not a FluxTransformer2DModel; "
                                     f"{_TRANSFORMER_HINT}")
    if not list(path.glob("*.safetensors")):
        raise TransformerFolderError(f"model.transformer '{folder}' has no .safetensors weights (gridgen never unpickles "
                                     f".bin/.pt files); {_TRANSFORMER_HINT}")
    return path


def load_transformer_folder(folder: str | Path, dtype: str | torch.dtype = "float32") -> torch.nn.Module:
    """A ``FluxTransformer2DModel`` from a ``save_pretrained`` folder (``model.transformer``), safetensors only."""
    from diffusers import FluxTransformer2DModel

    path = check_transformer_folder(folder)
    try:
        with library_progress_bars_off():  # use_safetensors=True: a folder without them is an error, never a pickle
            return FluxTransformer2DModel.from_pretrained(str(path), use_safetensors=True,
                                                          **{_dtype_kwarg(): parse_dtype(dtype)})
    except (OSError, ValueError, RuntimeError) as err:  # a missing shard, a truncated file, mismatched shapes
        raise TransformerFolderError(f"could not load model.transformer '{folder}': {_short_reason(err)}; "
                                     f"{_TRANSFORMER_HINT}") from err


def check_transformer_fits(transformer_config: dict, folder: str | Path, *, t5_dim: int | None = None,
                           clip_dim: int | None = None, latent_channels: int | None = None) -> None:
    """A transformer of another model's width cannot take this pipeline's text embeddings or latents: one line
    naming the first mismatch (each None: that component is not loaded, nothing to compare)."""
    checks = (("joint_attention_dim", t5_dim, "the T5 text encoder's d_model"),
              ("pooled_projection_dim", clip_dim, "the CLIP text encoder's hidden_size"),
              ("in_channels", None if latent_channels is None else 4 * latent_channels,
               "4 x the VAE's latent_channels (2x2 packing)"))
    for key, want, what in checks:
        if want is not None and int(transformer_config.get(key, -1)) != int(want):
            raise TransformerFolderError(f"model.transformer '{folder}' does not fit model.pretrained: its {key} is "
                                         f"{transformer_config.get(key)}, {what} is {want}; use a transformer trained "
                                         "on this base (or set model.pretrained to its base)")


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
    transformer: str | Path | None = None,
) -> FluxPipeline:
    """Load a ``FluxPipeline`` from a local diffusers folder, a hub id (local HF cache) or ``"embedded:tiny"``.

    ``load_vae=False`` / ``load_text_encoders=False`` / ``load_transformer=False`` skip those components (they
    are ``None`` in the pipeline), e.g. when latents or text embeddings are precomputed, or when only the
    encoders run (``make cache``). ``local_files_only=False`` allows downloading a hub id.
    ``quantization``: one of ``gridgen.models.quantization.SCHEMES`` (or None): the transformer's frozen weights
    are quantized while they load, through diffusers' own ``quantization_config``; ``quantize_text_encoder``
    also quantizes T5 with the same scheme.
    ``transformer``: a ``save_pretrained`` folder of a FluxTransformer2DModel (``model.transformer``, e.g. an
    ``adapter=full`` run's ``<run>/transformer``) loaded in place of the pipeline's own (safetensors only; with
    ``quantization`` it is quantized in memory by :func:`gridgen.models.builder.prepare_transformer`).
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
    elif transformer is not None:  # loaded before the pipeline: a bad folder fails before the encoders load
        skipped["transformer"] = load_transformer_folder(transformer, torch_dtype)
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
    if load_transformer and transformer is not None:
        check_transformer_fits(
            dict(pipe.transformer.config), transformer,
            t5_dim=pipe.text_encoder_2.config.d_model if pipe.text_encoder_2 is not None else None,
            clip_dim=pipe.text_encoder.config.hidden_size if pipe.text_encoder is not None else None,
            latent_channels=pipe.vae.config.latent_channels if pipe.vae is not None else None)
    if quantization is not None and quantization.startswith("bnb"):
        # bitsandbytes placed its quantized weights on the CUDA device while loading (.to() would refuse them);
        # the components it did not quantize (VAE, CLIP, T5 unless quantize_text_encoder) still need moving
        # (and a model.transformer, quantized in memory later)
        for component in (pipe.vae, pipe.text_encoder, pipe.text_encoder_2, pipe.transformer):
            if component is not None and not getattr(component, "is_quantized", False):
                component.to(device)
        return pipe
    return pipe.to(device)
