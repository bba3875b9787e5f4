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
from collections.abc import Iterable, Sequence
from pathlib import Path

import safetensors.torch
import torch
from diffusers import FluxPipeline
from diffusers.loaders.lora_base import LORA_ADAPTER_METADATA_KEY, _pack_dict_with_prefix
from peft import LoraConfig
from peft.tuners.lora import LoraLayer
from peft.utils import get_peft_model_state_dict, set_peft_model_state_dict

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


def lora_state_dict(transformer: torch.nn.Module) -> dict[str, torch.Tensor]:
    """peft-format LoRA weights of the transformer (``...to_q.lora_A.weight``), detached and contiguous."""
    return {k: v.detach().contiguous() for k, v in get_peft_model_state_dict(transformer).items()}


def save_lora(directory: str | Path, transformer: torch.nn.Module, metadata: dict[str, str] | None = None,
              formats: Sequence[str] = ("diffusers",), state_dict: dict[str, torch.Tensor] | None = None) -> Path:
    """Write the transformer's LoRA to ``directory`` in each of ``formats``; returns the first file written.

    ``diffusers`` (default): ``pytorch_lora_weights.safetensors``, keys ``transformer.<module>.lora_A.weight``; the
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
                directory, transformer_lora_layers=peft_state,
                save_function=lambda weights, filename, header=header: _save_atomically(weights, filename, header),
            )
        else:  # kohya: no diffusers adapter metadata, which would make diffusers scale by alpha / rank twice
            directory.mkdir(parents=True, exist_ok=True)
            _save_atomically(kohya, directory / KOHYA_LORA_FILE, {"format": "pt", **gridgen_header})
        paths.append(directory / EXPORT_FORMATS[fmt])
    return paths[0]


def check_export_formats(formats: str | Sequence[str]) -> list[str]:
    """``lora.export_formats`` -> a list of known, distinct format names (a single string is one format)."""
    formats = [formats] if isinstance(formats, str) else [str(f) for f in formats]
    unknown = [f for f in formats if f not in EXPORT_FORMATS]
    if unknown or not formats or len(set(formats)) != len(formats):
        raise ValueError(f"lora.export_formats must list distinct formats from {sorted(EXPORT_FORMATS)}, got "
                         f"{formats}; e.g. lora.export_formats=[diffusers,kohya]")
    return formats


def check_finite(tensors: dict[str, torch.Tensor], destination: str | Path) -> None:
    """Raise :class:`NonFiniteLoraError` naming the first tensor with NaN/inf values and how many."""
    bad = {k: int((~torch.isfinite(v)).sum()) for k, v in tensors.items() if not torch.isfinite(v).all()}
    if bad:
        name, count = next(iter(bad.items()))
        raise NonFiniteLoraError(
            f"LoRA tensor '{name}' has {count} non-finite (NaN/inf) of {tensors[name].numel()} values and "
            f"{len(bad)} of {len(tensors)} tensors have some; nothing was written to '{destination}': the training "
            "diverged, lower optim.lr or export an earlier checkpoint"
        )


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def _save_atomically(weights: dict[str, torch.Tensor], filename: str | Path, header: dict[str, str]) -> None:
    tmp = f"{filename}.tmp-{os.getpid()}"
    try:
        safetensors.torch.save_file(weights, tmp, metadata=header)
        os.chmod(tmp, 0o666 & ~_umask())  # safetensors creates its files 0600; exports are shared like checkpoints
        os.replace(tmp, filename)  # a crash mid-write leaves the previous file intact
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


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
def _lora_path(path: str | Path) -> Path:
    path = Path(path)
    if path.is_dir():
        path = path / LORA_FILE
    if not path.is_file():
        raise FileNotFoundError(
            f"LoRA file '{path}' does not exist; point to a pytorch_lora_weights.safetensors written by "
            "gridgen (runs write it under <run>/lora/)"
        )
    return path


def _unreadable(path: Path, err: Exception) -> LoraFileError:
    reason = (str(err).strip().splitlines() or [type(err).__name__])[0]
    return LoraFileError(f"LoRA file '{path}' is not a readable safetensors file ({reason}); expected the {LORA_FILE} "
                         "that gridgen training writes under <run>/lora/ (or diffusers' save_lora_weights)")


def read_lora_header(path: str | Path) -> dict[str, str]:
    """The safetensors header metadata of a LoRA file (or its folder), without reading the tensors."""
    path = _lora_path(path)
    try:
        with safetensors.safe_open(str(path), framework="pt") as f:
            return f.metadata() or {}
    except safetensors.SafetensorError as err:
        raise _unreadable(path, err) from err


def check_lora_file(path: str | Path) -> dict[str, str]:
    """Header metadata of a LoRA file after checking, from the header alone, that it is a diffusers-format LoRA."""
    path = _lora_path(path)
    try:
        with safetensors.safe_open(str(path), framework="pt") as f:
            _check_lora_keys(list(f.keys()), path)
            return f.metadata() or {}
    except safetensors.SafetensorError as err:
        raise _unreadable(path, err) from err


def _check_lora_keys(keys: list[str], path: Path) -> None:
    if any(".lora_down." in k or k.startswith("lora_unet_") for k in keys):
        raise LoraFileError(f"LoRA file '{path}' is in kohya/ComfyUI format (lora_unet_* keys); gridgen reads the "
                            f"diffusers-format {LORA_FILE} written next to it")
    if not any(".lora_A." in k or ".lora_B." in k for k in keys):
        example = keys[0] if keys else "nothing"
        raise LoraFileError(f"LoRA file '{path}' holds no LoRA weights (first key '{example}', expected "
                            "'transformer.<module>.lora_A.weight'); is it a model file rather than a LoRA?")


def read_lora_file(path: str | Path) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """A gridgen/diffusers LoRA file (or a folder holding one) -> (peft state dict, header metadata)."""
    path = _lora_path(path)
    header = check_lora_file(path)
    try:
        state = safetensors.torch.load_file(str(path))
    except safetensors.SafetensorError as err:
        raise _unreadable(path, err) from err
    prefix = f"{FluxPipeline.transformer_name}."
    return {k.removeprefix(prefix): v for k, v in state.items()}, header


def _targets(keys: Iterable[str]) -> list[str]:
    """``transformer_blocks.3.attn.to_q.lora_A.weight`` -> ``attn.to_q``: the target names, as in lora.target_modules."""
    modules = (k.rsplit(".lora_", 1)[0] for k in keys)
    return sorted({match.group(3) if (match := _BLOCK.fullmatch(m)) else m for m in modules})


def _ranks(state: dict[str, torch.Tensor]) -> str:
    return "/".join(str(r) for r in sorted({v.shape[0] for k, v in state.items() if ".lora_A." in k}))


def load_lora_weights_into(transformer: torch.nn.Module, path: str | Path) -> dict[str, str]:
    """Load a saved LoRA into the transformer's existing (trainable) adapter (``stage.init_lora``).

    Rank, targets, keys and shapes must match the adapter that ``lora.*`` built; each mismatch is one line that
    names both sides and the setting to change.
    """
    state, header = read_lora_file(path)
    expected = lora_state_dict(transformer)
    file_rank, model_rank = _ranks(state), _ranks(expected)
    if file_rank != model_rank:
        raise LoraFileError(f"init LoRA '{path}' has rank {file_rank}, lora.rank={model_rank}: set "
                            f"lora.rank={file_rank} or pick a LoRA of rank {model_rank}")
    file_targets, model_targets = _targets(state), _targets(expected)
    if file_targets != model_targets:
        raise LoraFileError(f"init LoRA '{path}' adapts [{','.join(file_targets)}], lora.target_modules adapts "
                            f"[{','.join(model_targets)}]: set lora.target_modules=[{','.join(file_targets)}] or "
                            "pick a LoRA trained with these targets")
    missing = sorted(set(expected) - set(state))
    unexpected = sorted(set(state) - set(expected))
    if missing or unexpected:
        example = (missing or unexpected)[0]
        raise LoraFileError(
            f"init LoRA '{path}' does not fit this model: {len(missing)} missing and {len(unexpected)} "
            f"unexpected keys (e.g. '{example}'); was it trained on another model.pretrained?"
        )
    for key, value in state.items():
        if value.shape != expected[key].shape:
            raise LoraFileError(
                f"init LoRA '{path}': '{key}' has shape {tuple(value.shape)}, the model expects "
                f"{tuple(expected[key].shape)}; was it trained on another model.pretrained?"
            )
    set_peft_model_state_dict(transformer, state)
    return header
