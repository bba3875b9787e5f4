"""Full fine-tuning of the FLUX transformer (``adapter=full``): which weights train, the exported folder, and a
pipeline folder around it.

Instead of a LoRA, the transformer's own weights train: all of them, or those whose names match
``lora.train_modules``; the VAE and text encoders stay frozen as in LoRA training. Trained weights stay in fp32
(AdamW on bf16 weights loses small updates) whatever ``model.dtype`` the frozen parts use. At the end of a run the
transformer is written with diffusers' ``save_pretrained`` (``config.json`` + safetensors) to ``<run>/transformer``;
``model.transformer=<that folder>`` loads it in place of the pipeline's transformer (generation, evaluation, another
run), and :func:`save_pipeline_with_transformer` makes a whole FluxPipeline folder of it: a ``model.pretrained``.
"""

from __future__ import annotations

import fnmatch
import json
import logging
import shutil
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import torch

from gridgen._quiet import library_progress_bars_off
from gridgen.files import atomic_folder
from gridgen.models.loading import (
    TransformerFolderError,
    check_transformer_fits,
    check_transformer_folder,
    local_pipeline_folder,
    parse_dtype,
)
from gridgen.models.lora import check_finite

log = logging.getLogger(__name__)

ADAPTER_MODES = ("lora", "full")  # lora.mode: conf/adapter/lora.yaml | conf/adapter/full.yaml
# Settings of conf/adapter/lora.yaml that only a LoRA has: null in conf/adapter/full.yaml, refused when set there.
LORA_ONLY_KEYS = ("rank", "alpha", "dropout", "init", "target_modules", "export_formats")
TRANSFORMER_FOLDER = "transformer"  # <run>/transformer: the export of an adapter=full run


def adapter_mode(lora_cfg: Mapping[str, Any]) -> str:
    """``lora.mode``: ``lora`` (a LoRA on the frozen transformer) or ``full`` (the transformer's own weights)."""
    mode = lora_cfg.get("mode") or "lora"  # configs and checkpoints from before adapter=full: LoRA
    if mode not in ADAPTER_MODES:
        raise ValueError(f"lora.mode={mode} is not one of {list(ADAPTER_MODES)}; pick the adapter with adapter=lora "
                         "(default) or adapter=full")
    return mode


def check_adapter_settings(lora_cfg: Mapping[str, Any], model_cfg: Mapping[str, Any],
                           init_lora: str | None = None) -> str:
    """Refuse settings that cannot act in the chosen mode (one line each); returns the mode.

    ``adapter=full``: LoRA settings (``lora.rank`` ..., ``stage.init_lora``) and ``model.quantization`` (the trained
    weights would be the quantized ones). ``adapter=lora``: ``lora.train_modules``."""
    mode = adapter_mode(lora_cfg)
    patterns = lora_cfg.get("train_modules")
    if mode == "lora":
        if patterns is not None:
            raise ValueError(f"lora.train_modules={_listed(patterns)} chooses the weights of a full fine-tuning and this "
                             "run trains a LoRA (lora.target_modules chooses its layers); add adapter=full, or drop it")
        return mode
    for key in LORA_ONLY_KEYS:
        if lora_cfg.get(key) is not None:
            raise ValueError(f"lora.{key}={_listed(lora_cfg[key])} is a LoRA setting, and adapter=full trains the "
                             f"transformer's own weights (no LoRA); drop lora.{key}, or use adapter=lora")
    if init_lora not in (None, "", "none"):
        raise ValueError(f"stage.init_lora={init_lora} starts from a LoRA, and adapter=full trains none; set "
                         "stage.init_lora=null (stage=fine sets auto), and start from a trained transformer with "
                         "model.transformer=<run>/transformer")
    if model_cfg.get("quantization") is not None:
        raise ValueError(f"model.quantization={model_cfg['quantization']} quantizes the transformer weights that "
                         "adapter=full trains; set model.quantization=null (to fit a large model, shard it with "
                         "strategy=fsdp)")
    if patterns is not None and (isinstance(patterns, str) or not patterns
                                 or not all(isinstance(p, str) and p for p in patterns)):
        raise ValueError(f"lora.train_modules={_listed(patterns)} must be null (every weight trains) or a non-empty "
                         "list of name patterns, e.g. lora.train_modules=[transformer_blocks.*,proj_out]")
    return mode


def _listed(value: Any) -> str:
    """A value as it is written on the command line: ``[a,b]`` for a list (also an OmegaConf one)."""
    is_list = isinstance(value, Sequence) and not isinstance(value, str)
    return "[" + ",".join(map(str, value)) + "]" if is_list else str(value)


def select_trainable(transformer: torch.nn.Module, patterns: Sequence[str] | None = None) -> int:
    """Train every parameter of ``transformer`` (``patterns`` None), or those whose name matches a pattern; freeze
    the rest. Returns the number of trainable parameters.

    A pattern is an ``fnmatch`` glob over parameter names (``*`` also crosses dots) that also matches every
    parameter of a module of that name: ``proj_out`` = ``proj_out.weight`` and ``proj_out.bias``;
    ``transformer_blocks.*`` = the double blocks; ``*.attn.to_q`` = every query projection. A pattern that matches
    nothing is refused (a misspelt name would otherwise train less than asked).
    """
    names = [name for name, _ in transformer.named_parameters()]
    if patterns is None:
        chosen = set(names)
    else:
        chosen = set()
        for pattern in patterns:
            matched = {n for n in names if fnmatch.fnmatchcase(n, pattern) or fnmatch.fnmatchcase(n, f"{pattern}.*")}
            if not matched:
                raise ValueError(f"lora.train_modules: '{pattern}' matches no parameter of "
                                 f"{type(transformer).__name__} (names look like '{names[0]}', "
                                 "'transformer_blocks.0.attn.to_q.weight'); correct or drop it")
            chosen |= matched
    for name, param in transformer.named_parameters():
        param.requires_grad_(name in chosen)
    return sum(p.numel() for p in transformer.parameters() if p.requires_grad)


def transformer_state_dict(transformer: torch.nn.Module) -> dict[str, torch.Tensor]:
    """The transformer's whole weights, detached copies on the CPU (never the parameters themselves).

    Under FSDP2 (sharded DTensor parameters) this is a collective: every rank must call it, the shards are gathered
    and only rank 0 keeps the result (the others get an empty dict), so a large model is held once per node."""
    if any(hasattr(p, "full_tensor") for p in transformer.parameters()):
        from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

        return get_model_state_dict(transformer, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
    return {k: v.detach().to("cpu", copy=True).contiguous() for k, v in transformer.state_dict().items()}


def save_transformer(directory: str | Path, config: Mapping[str, Any], state_dict: dict[str, torch.Tensor],
                     dtype: str | torch.dtype = "float32") -> Path:
    """Write ``state_dict`` as a diffusers ``FluxTransformer2DModel`` of ``config`` to ``directory`` with
    ``save_pretrained`` (``config.json`` + ``diffusion_pytorch_model.safetensors``, sharded above 10 GB), in
    ``dtype``.

    Every tensor is checked first: a non-finite one raises and nothing is written. The folder is written beside
    ``directory`` and renamed into place (files 0644 under the usual umask), so a crash leaves the previous one.
    """
    from diffusers import FluxTransformer2DModel

    directory = Path(directory)
    check_finite(state_dict, directory, what="transformer")
    target = parse_dtype(dtype)
    with torch.device("meta"):  # the architecture only; the weights are the trained ones, assigned below
        model = FluxTransformer2DModel.from_config(dict(config))
    model.load_state_dict({k: v.to(target).contiguous() for k, v in state_dict.items()}, strict=True, assign=True)
    with atomic_folder(directory) as tmp, library_progress_bars_off():
        model.save_pretrained(str(tmp), safe_serialization=True)
    return directory


def save_pipeline_with_transformer(pretrained: str | Path, transformer: str | Path, out: str | Path,
                                   revision: str | None = None) -> Path:
    """Write a complete FluxPipeline folder ``out``: the components of ``pretrained`` (a diffusers folder, a hub id
    in the local cache or ``embedded:tiny``), copied file for file, with the ``save_pretrained`` folder
    ``transformer`` as its transformer. ``model.pretrained=<out>`` then uses the trained transformer as its base.

    The transformer is checked before anything is written: safetensors only (nothing is unpickled), its tensors
    those of its config's architecture and finite (read one at a time), its widths those of the pipeline's text
    encoders and VAE. ``out`` appears whole (written beside it, then renamed); an existing ``out`` is refused.
    """
    from diffusers import FluxTransformer2DModel
    from safetensors import safe_open

    out = Path(out).expanduser()
    if out.exists():
        raise ValueError(f"'{out}' exists; a pipeline folder is written once: pick a new folder")
    source = local_pipeline_folder(pretrained, revision)
    folder = check_transformer_folder(transformer)
    config = json.loads((folder / "config.json").read_text())
    with torch.device("meta"):
        expected = {k: tuple(v.shape) for k, v in FluxTransformer2DModel.from_config(config).state_dict().items()}
    found: dict[str, tuple[int, ...]] = {}
    for file in sorted(folder.glob("*.safetensors")):
        with safe_open(str(file), framework="pt") as weights:
            for key in weights.keys():  # noqa: SIM118 - safe_open is not a Mapping
                tensor = weights.get_tensor(key)
                check_finite({key: tensor}, out, what="transformer")
                found[key] = tuple(tensor.shape)
    if found != expected:
        key = sorted(set(found) ^ set(expected)) or [k for k in sorted(found) if found[k] != expected[k]]
        raise TransformerFolderError(f"model.transformer '{transformer}': its weights are not those of its config.json "
                                     f"(first difference: '{key[0]}'); export it again with save_pretrained")
    components = json.loads((source / "model_index.json").read_text())

    def component_config(name: str) -> dict:
        path = source / name / "config.json"
        return json.loads(path.read_text()) if path.is_file() else {}

    check_transformer_fits(config, transformer, t5_dim=component_config("text_encoder_2").get("d_model"),
                           clip_dim=component_config("text_encoder").get("hidden_size"),
                           latent_channels=component_config("vae").get("latent_channels"))
    with atomic_folder(out) as tmp:
        shutil.copyfile(source / "model_index.json", tmp / "model_index.json")
        for name, spec in components.items():
            if name.startswith("_") or name == "transformer" or not isinstance(spec, list) or spec[0] is None:
                continue
            if (source / name).is_dir():  # a hub snapshot's files are links into its blob store: copied as files
                shutil.copytree(source / name, tmp / name)
        (tmp / TRANSFORMER_FOLDER).mkdir()
        for file in [folder / "config.json", *sorted(folder.glob("*.safetensors")),
                     *sorted(folder.glob("*.safetensors.index.json"))]:
            shutil.copyfile(file, tmp / TRANSFORMER_FOLDER / file.name)
    log.info("wrote a FluxPipeline folder %s: %s with the transformer of %s", out, pretrained, transformer)
    return out
