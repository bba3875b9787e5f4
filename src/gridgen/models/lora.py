"""LoRA on the FLUX transformer through peft, saved in the diffusers/PEFT file format (and kohya/ComfyUI's).

LoRA (Hu et al. 2021) replaces a frozen weight ``W`` by ``W + (alpha / r) * B A`` with ``A: (r, d_in)``,
``B: (d_out, r)``; only ``A`` and ``B`` train. Adapters are attached with diffusers' ``add_adapter`` (the
same call diffusers' own FLUX LoRA scripts make) and exported with ``FluxPipeline.save_lora_weights`` so
that ``FluxPipeline.load_lora_weights`` reads our files unchanged; ``formats=("diffusers", "kohya")`` adds the
``lora_unet_*`` file that ComfyUI and kohya's scripts load (diffusers reads it too).
"""

from __future__ import annotations

import json
import logging
import os
import re
import zipfile
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import safetensors.torch
import torch
from diffusers import FluxPipeline
from diffusers.loaders.lora_base import LORA_ADAPTER_METADATA_KEY, _pack_dict_with_prefix
from peft import LoraConfig
from peft.tuners.lora import LoraLayer
from peft.utils import get_peft_model_state_dict, set_peft_model_state_dict

from gridgen.files import atomic_path, default_file_mode

log = logging.getLogger(__name__)

LORA_FILE = "pytorch_lora_weights.safetensors"
KOHYA_LORA_FILE = "pytorch_lora_weights_kohya.safetensors"
EXPORT_FORMATS = {"diffusers": LORA_FILE, "kohya": KOHYA_LORA_FILE}  # lora.export_formats -> file name
# Block types of the FLUX transformer that carry LoRA; targets are matched inside these blocks only, so
# that the single blocks' ``proj_out`` is adapted but the transformer's final ``proj_out`` is not.
FLUX_BLOCKS = ("transformer_blocks", "single_transformer_blocks")


class LoraFileError(ValueError):
    """A LoRA file that cannot be read, or does not fit the model it is loaded into."""


class NonFiniteLoraError(ValueError):
    """LoRA weights with NaN or inf values, refused by the exporter."""


def target_regex(targets: Sequence[str], blocks: Sequence[str] = FLUX_BLOCKS) -> str:
    """Module-name suffixes inside FLUX blocks -> one full-match regex for peft's ``target_modules``."""
    if not targets:
        raise ValueError("lora.target_modules is empty; list module names such as attn.to_q, ff.net.2")
    alternatives = "|".join(re.escape(t) for t in targets)
    block_names = "|".join(re.escape(b) for b in blocks)
    return rf"^(?:{block_names})\.\d+\.(?:{alternatives})$"


def build_lora_config(rank: int, alpha: float | None, dropout: float, init: str | bool,
                      target_modules: Sequence[str]) -> LoraConfig:
    if not isinstance(rank, int) or rank <= 0:
        raise ValueError(f"lora.rank must be a positive integer, got {rank!r}; try lora.rank=16")
    init_weights: str | bool = {"default": True, "true": True, "false": False}.get(str(init).lower(), init)
    return LoraConfig(
        r=rank,
        lora_alpha=float(alpha if alpha is not None else rank),
        lora_dropout=float(dropout),
        init_lora_weights=init_weights,
        target_modules=target_regex(list(target_modules)),
    )


def attach_lora(transformer: torch.nn.Module, config: LoraConfig) -> int:
    """Freeze the transformer, add the adapter; returns the number of trainable parameters."""
    transformer.requires_grad_(False)
    transformer.add_adapter(config)  # diffusers' PeftAdapterMixin: only lora_A / lora_B require grad
    matched = sum(1 for name, _ in transformer.named_modules() if name.endswith(".lora_A"))
    if matched == 0:
        raise ValueError(f"lora.target_modules matched no module of {type(transformer).__name__}")
    return sum(p.numel() for p in transformer.parameters() if p.requires_grad)


def keep_lora_fp32(transformer: torch.nn.Module) -> None:
    """Adapters train in fp32 while the frozen base may be bf16 (model.dtype=bfloat16, as diffusers' FLUX LoRA
    scripts do): AdamW on bf16 weights loses small updates. peft casts a layer's input to its adapter's dtype."""
    for param in transformer.parameters():
        if param.requires_grad and param.dtype != torch.float32:
            param.data = param.data.float()


def lora_state_dict(transformer: torch.nn.Module) -> dict[str, torch.Tensor]:
    """peft-format LoRA weights of the transformer (``...to_q.lora_A.weight``), whole, detached, contiguous, on the
    CPU. Sharded (FSDP2 DTensor) tensors are gathered from every rank, so under FSDP2 every rank must call this."""
    return {k: (v.full_tensor() if hasattr(v, "full_tensor") else v).detach().cpu().contiguous()
            for k, v in get_peft_model_state_dict(transformer).items()}


def save_lora(directory: str | Path, transformer: torch.nn.Module, metadata: dict[str, str] | None = None,
              formats: Sequence[str] = ("diffusers",), state_dict: dict[str, torch.Tensor] | None = None,
              name: str = LORA_FILE) -> Path:
    """Write the transformer's LoRA to ``directory`` in each of ``formats``; returns the first file written.

    ``diffusers`` (default): ``name`` (``pytorch_lora_weights.safetensors`` unless given, e.g. the EMA export's
    ``pytorch_lora_weights_ema.safetensors``), keys ``transformer.<module>.lora_A.weight``; the
    safetensors header carries diffusers' ``lora_adapter_metadata`` (rank, alpha, targets, so diffusers rebuilds
    the exact adapter) plus gridgen's own ``metadata`` entries.
    ``kohya``: ``pytorch_lora_weights_kohya.safetensors`` in the ``lora_unet_*`` naming that ComfyUI and kohya's
    sd-scripts share for FLUX (:func:`kohya_state_dict`), with gridgen's ``metadata``.

    ``state_dict`` (optional): peft-format LoRA tensors to write instead of reading them from ``transformer``
    (whose adapter config is still used), e.g. full tensors gathered from FSDP2 shards on every rank.

    Every tensor is checked first: a non-finite one raises :class:`NonFiniteLoraError` and nothing is written.
    Files are written to a temporary name and moved into place, so a crash leaves the previous file intact.
    """
    formats = check_export_formats(formats)
    directory = Path(directory)
    # state_dict: the LoRA gathered elsewhere (FSDP2: full tensors collected from every rank's shards)
    peft_state = lora_state_dict(transformer) if state_dict is None else state_dict
    check_finite(peft_state, directory)
    kohya = kohya_state_dict(peft_state, *kohya_inputs(transformer)) if "kohya" in formats else None
    if kohya is not None:
        check_finite(kohya, directory)
    gridgen_header = {k: str(v) for k, v in (metadata or {}).items()}

    paths = []
    for fmt in formats:
        if fmt == "diffusers":
            adapter_metadata = transformer.peft_config["default"].to_dict()
            adapter_metadata = {k: (sorted(v) if isinstance(v, set) else v) for k, v in adapter_metadata.items()}
            header = {
                "format": "pt",
                LORA_ADAPTER_METADATA_KEY: json.dumps(
                    _pack_dict_with_prefix(adapter_metadata, FluxPipeline.transformer_name), indent=2, sort_keys=True
                ),
                **gridgen_header,
            }
            FluxPipeline.save_lora_weights(
                directory, transformer_lora_layers=peft_state, weight_name=name,
                save_function=lambda weights, filename, header=header: _save_atomically(weights, filename, header),
            )
            paths.append(directory / name)
        else:  # kohya: no diffusers adapter metadata, which would make diffusers scale by alpha / rank twice
            directory.mkdir(parents=True, exist_ok=True)
            _save_atomically(kohya, directory / KOHYA_LORA_FILE, {"format": "pt", **gridgen_header})
            paths.append(directory / KOHYA_LORA_FILE)
    return paths[0]


def check_export_formats(formats: str | Sequence[str]) -> list[str]:
    """``lora.export_formats`` -> a list of known, distinct format names (a single string is one format)."""
    formats = [formats] if isinstance(formats, str) else [str(f) for f in formats]
    unknown = [f for f in formats if f not in EXPORT_FORMATS]
    if unknown or not formats or len(set(formats)) != len(formats):
        raise ValueError(f"lora.export_formats must list distinct formats from {sorted(EXPORT_FORMATS)}, got "
                         f"{formats}; e.g. lora.export_formats=[diffusers,kohya]")
    return formats


def check_finite(tensors: dict[str, torch.Tensor], destination: str | Path, what: str = "LoRA") -> None:
    """Raise :class:`NonFiniteLoraError` naming the first tensor with NaN/inf values and how many (``what``: whose
    tensors, ``LoRA`` or ``transformer``)."""
    bad = {k: int((~torch.isfinite(v)).sum()) for k, v in tensors.items() if not torch.isfinite(v).all()}
    if bad:
        name, count = next(iter(bad.items()))
        raise NonFiniteLoraError(
            f"{what} tensor '{name}' has {count} non-finite (NaN/inf) of {tensors[name].numel()} values and "
            f"{len(bad)} of {len(tensors)} tensors have some; nothing was written to '{destination}': the training "
            "diverged, lower optim.lr or export an earlier checkpoint"
        )


def _save_atomically(weights: dict[str, torch.Tensor], filename: str | Path, header: dict[str, str]) -> None:
    with atomic_path(filename) as tmp:  # a crash mid-write leaves the previous file intact
        safetensors.torch.save_file(weights, str(tmp), metadata=header)
        os.chmod(tmp, default_file_mode())  # safetensors creates its files 0600; exports are shared like checkpoints


# ---- kohya / ComfyUI naming --------------------------------------------------------------------------
# The inverse of what diffusers' ``_convert_kohya_flux_lora_to_diffusers`` reads for the FLUX blocks
# (diffusers/loaders/lora_conversion_utils.py), i.e. the original BFL module names with "." -> "_".
# Modules outside the blocks (embedders, final layer) are not written: the converter maps them to keys without
# the "transformer." prefix, which FluxPipeline.load_lora_weights then drops, so they would not round-trip.
KOHYA_DOUBLE = {  # transformer_blocks.<i>.<module> -> lora_unet_double_blocks_<i>_<name>
    "attn.to_out.0": "img_attn_proj",
    "ff.net.0.proj": "img_mlp_0",
    "ff.net.2": "img_mlp_2",
    "norm1.linear": "img_mod_lin",
    "attn.to_add_out": "txt_attn_proj",
    "ff_context.net.0.proj": "txt_mlp_0",
    "ff_context.net.2": "txt_mlp_2",
    "norm1_context.linear": "txt_mod_lin",
}
KOHYA_SINGLE = {  # single_transformer_blocks.<i>.<module> -> lora_unet_single_blocks_<i>_<name>
    "proj_out": "linear2",
    "norm.linear": "modulation_lin",
}
# Projections that BFL's FLUX computes as one Linear and diffusers as several (rows stacked in this order).
KOHYA_DOUBLE_FUSED = {
    "img_attn_qkv": ("attn.to_q", "attn.to_k", "attn.to_v"),
    "txt_attn_qkv": ("attn.add_q_proj", "attn.add_k_proj", "attn.add_v_proj"),
}
KOHYA_SINGLE_FUSED = {"linear1": ("attn.to_q", "attn.to_k", "attn.to_v", "proj_mlp")}
_BLOCK = re.compile(r"(transformer_blocks|single_transformer_blocks)\.(\d+)\.(.+)")


def kohya_state_dict(state: dict[str, torch.Tensor], scalings: dict[str, float],
                     out_features: dict[str, int] | None = None) -> dict[str, torch.Tensor]:
    """peft LoRA weights of a FLUX transformer -> kohya/ComfyUI keys (``lora_unet_<name>.lora_down.weight``,
    ``.lora_up.weight``, ``.alpha``), the same ``W + (alpha / rank) * up @ down`` update.

    Args:
        state: ``<module>.lora_A.weight (r, in)`` and ``<module>.lora_B.weight (out, r)`` (:func:`lora_state_dict`).
        scalings: module -> the adapter's scale (``lora_alpha / r``).
        out_features: module -> output size, needed for the members of a fused projection that the LoRA does not
            adapt (they get zero blocks).

    A fused projection (``img_attn_qkv``, ``txt_attn_qkv``, ``linear1``) gets one LoRA of rank ``n * r`` that is
    exactly the separate ones: ``[B_q A_q; B_k A_k; ...] = blockdiag(B_q, B_k, ...) @ [A_q; A_k; ...]``, with
    ``alpha = scale * n * r`` so that ``alpha / rank`` stays the scale. diffusers' converter recognises the
    block-diagonal ``up`` as "sparse" and splits it back exactly (it assumes FLUX.1-dev's widths for ``linear1``).
    """
    modules: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}
    for key in state:
        module, _, tail = key.rpartition(".lora_")
        if tail not in ("A.weight", "B.weight"):
            raise ValueError(f"LoRA tensor '{key}' has no kohya equivalent (only lora_A/lora_B weights are written)")
        modules[module] = (state[f"{module}.lora_A.weight"], state[f"{module}.lora_B.weight"])

    out: dict[str, torch.Tensor] = {}
    fused: dict[str, tuple[str, tuple[str, ...]]] = {}  # kohya name -> (module prefix, members)

    def put(name: str, down: torch.Tensor, up: torch.Tensor, scale: float) -> None:
        out[f"{name}.lora_down.weight"] = down.contiguous()
        out[f"{name}.lora_up.weight"] = up.contiguous()
        out[f"{name}.alpha"] = torch.tensor(scale * down.shape[0], dtype=torch.float32)

    for module, (down, up) in modules.items():
        match = _BLOCK.fullmatch(module)
        if match is None:
            raise ValueError(f"LoRA on '{module}' cannot be exported in kohya format (only modules inside FLUX "
                             "blocks round-trip through it); drop it from the targets or export diffusers only")
        blocks, index, inner = match.groups()
        double = blocks == "transformer_blocks"
        name = f"lora_unet_{'double' if double else 'single'}_blocks_{index}_"
        single_names, fused_names = (KOHYA_DOUBLE, KOHYA_DOUBLE_FUSED) if double else (KOHYA_SINGLE, KOHYA_SINGLE_FUSED)
        if inner in single_names:
            put(name + single_names[inner], down, up, scalings[module])
            continue
        group = next((g for g, members in fused_names.items() if inner in members), None)
        if group is None:
            raise ValueError(f"LoRA on '{module}' has no kohya/ComfyUI name (BFL FLUX has no such layer); drop it "
                             "from the targets or export diffusers only")
        fused[name + group] = (f"{blocks}.{index}.", fused_names[group])

    for name, (prefix, members) in fused.items():
        present = [m for m in members if prefix + m in modules]
        ranks = {modules[prefix + m][0].shape[0] for m in present}
        if len(ranks) != 1:
            raise ValueError(f"'{name}' fuses {', '.join(prefix + m for m in present)} with different ranks "
                             f"{sorted(ranks)}; kohya format needs one rank per fused projection")
        rank = ranks.pop()
        scales = {scalings[prefix + m] for m in present}
        # one common scale goes into alpha; otherwise each member's scale is folded into its up block
        common = scales.pop() if len(scales) == 1 else None
        reference = modules[prefix + present[0]][0]
        downs, ups = [], []
        for member in members:
            if prefix + member in modules:
                down, up = modules[prefix + member]
                downs.append(down)
                ups.append(up if common is not None else up * scalings[prefix + member])
            else:  # not adapted: a zero block of its height
                if out_features is None or prefix + member not in out_features:
                    raise ValueError(f"'{name}' needs the output size of '{prefix + member}', which the LoRA does not adapt")
                downs.append(torch.zeros_like(reference))
                ups.append(reference.new_zeros(out_features[prefix + member], rank))
        put(name, torch.cat(downs), torch.block_diag(*ups), 1.0 if common is None else common)  # (n r, in), (sum out, n r)
    return out


def kohya_inputs(transformer: torch.nn.Module) -> tuple[dict[str, float], dict[str, int]]:
    """Per adapted module its LoRA scale, and every linear layer's output size (zero blocks of fused projections)."""
    scalings, out_features = {}, {}
    for name, module in transformer.named_modules():
        if isinstance(module, LoraLayer) and "default" in module.scaling:
            scalings[name] = float(module.scaling["default"])
        if isinstance(module, (torch.nn.Linear, LoraLayer)) and hasattr(module, "out_features"):
            out_features[name] = int(module.out_features)
    return scalings, out_features


# ---- reading ----------------------------------------------------------------------------------------------
@dataclass
class LoraWeights:
    """A LoRA read from a file: peft-format tensors (``<module>.lora_A.weight``), its adapter config and metadata.

    ``config`` is the file's own adapter (rank, alpha, targets): diffusers' adapter metadata, a checkpoint's
    ``lora`` hyper-parameters, or for a plain file rank and modules read from the shapes (None if those are mixed).
    ``metadata``: the safetensors header, or ``gridgen_model``/``gridgen_step`` of a checkpoint.
    """

    path: Path
    state: dict[str, torch.Tensor]
    config: LoraConfig | None
    metadata: dict[str, str]


def find_lora(path: str | Path) -> Path:
    """A LoRA file, a ``.ckpt``, a folder holding the LoRA file or a training run folder (``lora/`` export, else
    ``checkpoints/last.ckpt``) -> the file to read."""
    source = Path(str(path)).expanduser()
    candidates = [source] if source.is_file() else [
        source / LORA_FILE, source / "lora" / LORA_FILE, source / "checkpoints" / "last.ckpt"]
    for candidate in candidates:
        if candidate.is_file():
            return candidate
    raise FileNotFoundError(
        f"LoRA '{path}' is not a LoRA file, a .ckpt or a training run folder (looked for {LORA_FILE}, "
        f"lora/{LORA_FILE}, checkpoints/last.ckpt); point it at a run folder under outputs/runs/"
    )


def _unreadable(path: Path, err: Exception) -> LoraFileError:
    reason = (str(err).strip().splitlines() or [type(err).__name__])[0]
    return LoraFileError(f"LoRA file '{path}' is not a readable safetensors file ({reason}); expected the {LORA_FILE} "
                         "that gridgen training writes under <run>/lora/ (or diffusers' save_lora_weights)")


def read_lora_header(path: str | Path) -> dict[str, str]:
    """The safetensors header metadata of a LoRA file (or its folder), without reading the tensors."""
    path = find_lora(path)
    try:
        with safetensors.safe_open(str(path), framework="pt") as f:
            return f.metadata() or {}
    except safetensors.SafetensorError as err:
        raise _unreadable(path, err) from err


def check_lora_file(path: str | Path) -> Path:
    """:func:`find_lora`, then a cheap look at the file (safetensors header and keys, or checkpoint zip), so that
    a missing, corrupt or foreign LoRA stops with one line before any model loads; returns the file."""
    source = find_lora(path)
    if source.suffix == ".ckpt":
        _check_checkpoint_zip(source)
        return source
    try:
        with safetensors.safe_open(str(source), framework="pt") as f:
            _check_lora_keys(list(f.keys()), source)
    except safetensors.SafetensorError as err:
        raise _unreadable(source, err) from err
    return source


def _check_lora_keys(keys: list[str], path: Path) -> None:
    if any(".lora_down." in k or k.startswith("lora_unet_") for k in keys):
        raise LoraFileError(f"LoRA file '{path}' is in kohya/ComfyUI format (lora_unet_* keys); gridgen reads the "
                            f"diffusers-format {LORA_FILE} written next to it")
    if not any(".lora_A." in k or ".lora_B." in k for k in keys):
        example = keys[0] if keys else "nothing"
        raise LoraFileError(f"LoRA file '{path}' holds no LoRA weights (first key '{example}', expected "
                            "'transformer.<module>.lora_A.weight'); is it a model file rather than a LoRA?")
    other = next((k for k in keys if ".lora_A." not in k and ".lora_B." not in k), None)
    if other is not None:
        raise LoraFileError(f"LoRA file '{path}' holds other tensors than LoRA weights (e.g. '{other}')")


def _check_checkpoint_zip(path: Path) -> None:
    # torch.save writes zip archives; anything else would go to the legacy pickle reader, which we never use
    if not zipfile.is_zipfile(path):
        raise LoraFileError(f"checkpoint '{path}' is not a PyTorch zip checkpoint; expected a gridgen training "
                            "checkpoint such as <run>/checkpoints/last.ckpt, or a LoRA .safetensors file")


def load_lora(path: str | Path) -> LoraWeights:
    """Read a LoRA from a diffusers-format file, a gridgen training checkpoint or a folder holding either
    (:func:`find_lora`). Checkpoints are read as tensors and plain containers only, never unpickled."""
    source = check_lora_file(path)
    return _lora_from_checkpoint(source) if source.suffix == ".ckpt" else _lora_from_file(source)


def _lora_from_file(path: Path) -> LoraWeights:
    header = read_lora_header(path)
    try:
        state = safetensors.torch.load_file(str(path))
    except safetensors.SafetensorError as err:
        raise _unreadable(path, err) from err
    prefix = f"{FluxPipeline.transformer_name}."
    state = {k.removeprefix(prefix): v for k, v in state.items()}
    if LORA_ADAPTER_METADATA_KEY in header:  # diffusers' adapter config: rank, alpha, targets
        meta = json.loads(header[LORA_ADAPTER_METADATA_KEY])
        config = LoraConfig(**{k.removeprefix(prefix): v for k, v in meta.items() if k.startswith(prefix)})
    else:  # a plain LoRA file: rank from the shapes, scale 1, exactly the modules it holds
        ranks = {v.shape[0] for k, v in state.items() if ".lora_A." in k}
        modules = sorted({k.rsplit(".lora_", 1)[0] for k in state})
        rank = ranks.pop() if len(ranks) == 1 else None
        config = None if rank is None else LoraConfig(r=rank, lora_alpha=rank, target_modules=modules)
    return LoraWeights(path, state, config, header)


def _lora_from_checkpoint(path: Path) -> LoraWeights:
    expected = "expected a gridgen training checkpoint such as <run>/checkpoints/last.ckpt"
    try:  # tensors and plain containers only: a checkpoint from elsewhere is never unpickled
        ckpt = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # noqa: BLE001 - torch raises many types for foreign archives; all mean "not ours"
        reason = (str(err).strip().splitlines() or [type(err).__name__])[0]
        raise LoraFileError(f"checkpoint '{path}' cannot be read as tensors only ({type(err).__name__}: {reason}); "
                            f"{expected}") from err
    hparams = ckpt.get("hyper_parameters", {}) if isinstance(ckpt, dict) else {}
    lora = hparams.get("lora") if isinstance(hparams, dict) else None
    keys = ("rank", "alpha", "dropout", "init", "target_modules")
    if not isinstance(lora, dict) or not all(k in lora for k in keys) or not isinstance(ckpt.get("state_dict"), dict):
        raise LoraFileError(f"checkpoint '{path}' was not written by gridgen training (no LoRA hyper-parameters); "
                            f"{expected}")
    config = build_lora_config(**{k: lora[k] for k in keys})
    # "transformer.<module>.lora_A.default.weight" -> peft's "<module>.lora_A.weight"
    state = {k.removeprefix("transformer.").replace(".default.", "."): v for k, v in ckpt["state_dict"].items()
             if ".lora_" in k}
    info = {"gridgen_model": str(hparams.get("model", {}).get("name", "")), "gridgen_step": str(ckpt.get("global_step"))}
    return LoraWeights(path, state, config, info)


def read_lora_file(path: str | Path) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """A gridgen/diffusers LoRA file (or a folder holding one) -> (peft state dict, header metadata)."""
    lora = load_lora(path)
    return lora.state, lora.metadata


# ---- loading into a transformer ---------------------------------------------------------------------------
def _targets(keys: Iterable[str]) -> list[str]:
    """``transformer_blocks.3.attn.to_q.lora_A.weight`` -> ``attn.to_q``: the target names, as in lora.target_modules."""
    modules = (k.rsplit(".lora_", 1)[0] for k in keys)
    return sorted({match.group(3) if (match := _BLOCK.fullmatch(m)) else m for m in modules})


def _ranks(state: dict[str, torch.Tensor]) -> str:
    return "/".join(str(r) for r in sorted({v.shape[0] for k, v in state.items() if ".lora_A." in k}))


def check_lora_fits(state: dict[str, torch.Tensor], expected: dict[str, torch.Tensor], label: str,
                    model: str = "this model", settings: bool = False) -> None:
    """Raise :class:`LoraFileError` unless ``state`` has exactly ``expected``'s keys and shapes.

    ``label`` names the LoRA in the message (``init LoRA '<path>'``); ``settings``: the adapter was built from
    ``lora.*`` (training), so a different rank or target list is named first, with the setting to change.
    """
    if settings:
        file_rank, model_rank = _ranks(state), _ranks(expected)
        if file_rank != model_rank:
            raise LoraFileError(f"{label} has rank {file_rank}, lora.rank={model_rank}: set "
                                f"lora.rank={file_rank} or pick a LoRA of rank {model_rank}")
        file_targets, model_targets = _targets(state), _targets(expected)
        if file_targets != model_targets:
            raise LoraFileError(f"{label} adapts [{','.join(file_targets)}], lora.target_modules adapts "
                                f"[{','.join(model_targets)}]: set lora.target_modules=[{','.join(file_targets)}] or "
                                "pick a LoRA trained with these targets")
    for key in sorted(set(expected) | set(state)):
        if key not in state or key not in expected:
            side = "the model has no" if key not in expected else "the file lacks"
            raise LoraFileError(
                f"{label} was trained for another model: {side} '{key}' ({len(set(state) - set(expected))} "
                f"unexpected, {len(set(expected) - set(state))} missing keys); use a LoRA trained on "
                f"model.pretrained={model}"
            )
        if state[key].shape != expected[key].shape:
            raise LoraFileError(f"{label} was trained for another model: '{key}' has shape {tuple(state[key].shape)}, "
                                f"this model's is {tuple(expected[key].shape)}")


def load_lora_weights_into(transformer: torch.nn.Module, path: str | Path) -> dict[str, str]:
    """Load a saved LoRA into the transformer's existing (trainable) adapter (``stage.init_lora``).

    Rank, targets, keys and shapes must match the adapter that ``lora.*`` built; each mismatch is one line that
    names both sides and the setting to change. Returns the file's metadata.
    """
    lora = load_lora(path)
    check_lora_fits(lora.state, lora_state_dict(transformer), f"init LoRA '{path}'", _model_name(transformer),
                    settings=True)
    set_peft_model_state_dict(transformer, lora.state)
    return lora.metadata


def apply_lora(transformer: torch.nn.Module, path: str | Path, scale: float = 1.0) -> dict[str, Any]:
    """Attach the LoRA in ``path`` (file, run folder or checkpoint) to a frozen ``transformer`` at ``scale``.

    The adapter is rebuilt from the file's own config (rank, alpha, targets) and every key and shape is checked
    against the model first: a LoRA trained for another model fails with one line naming the first mismatch.
    Returns what the generation manifest records.
    """
    if "default" in (getattr(transformer, "peft_config", None) or {}):
        raise ValueError("this transformer already carries a LoRA adapter; load a fresh pipeline to apply another")
    lora = load_lora(path)
    if lora.config is None:
        ranks = sorted({v.shape[0] for k, v in lora.state.items() if ".lora_A." in k})
        raise LoraFileError(f"LoRA file '{lora.path}' has no adapter metadata and mixed ranks {ranks}")
    transformer.requires_grad_(False)
    try:
        transformer.add_adapter(lora.config)
    except ValueError as e:  # peft: target modules not found in the model
        raise LoraFileError(f"LoRA '{lora.path}' does not fit this model: {str(e).splitlines()[0]}") from e
    expected = lora_state_dict(transformer)
    try:
        check_lora_fits(lora.state, expected, f"LoRA '{lora.path}'", _model_name(transformer))
    except LoraFileError:
        transformer.delete_adapters("default")
        raise
    set_peft_model_state_dict(transformer, {k: v.to(expected[k].dtype) for k, v in lora.state.items()})
    for module in transformer.modules():
        if isinstance(module, LoraLayer):
            module.set_scale("default", float(scale))  # scaling = scale * alpha / rank
    transformer.eval()
    info = {k: v for k, v in lora.metadata.items() if k.startswith("gridgen_")}
    return {"path": str(lora.path), "scale": float(scale), "rank": int(lora.config.r),
            "alpha": float(lora.config.lora_alpha), **info}


def _model_name(transformer: torch.nn.Module) -> str:
    return getattr(getattr(transformer, "config", None), "_name_or_path", "") or "this model"
