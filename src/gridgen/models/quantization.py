"""Quantized frozen FLUX base for LoRA training (QLoRA-style): the frozen weights are stored in 8 or 4 bits,
the LoRA adapters on top stay in full precision and train as usual.

Schemes (``model.quantization=<scheme>``):

| scheme             | library                  | weights                                   | runs on        |
| ------------------ | ------------------------ | ----------------------------------------- | -------------- |
| ``int8_weight_only`` | torchao ``Int8WeightOnlyConfig`` | int8, per-channel scale             | CPU and CUDA   |
| ``bnb_int8``         | bitsandbytes LLM.int8 (``Linear8bitLt``) | int8 + fp outliers (threshold 6) | CUDA; CPU in memory only |
| ``bnb_nf4``          | bitsandbytes ``Linear4bit`` NF4, double quant | 4-bit NormalFloat, blocks of 64 | CUDA; CPU in memory only |

Two entry points use the same schemes:
- ``quantization_configs(scheme, dtype)``: diffusers' own ``quantization_config`` objects for
  ``from_pretrained`` (what ``load_flux_pipeline(..., quantization=...)`` passes; the weights are quantized
  while they load, so the full-precision transformer never sits in memory). diffusers' bitsandbytes loader
  needs a CUDA device.
- ``quantize_transformer(transformer, scheme)``: an already built transformer, in place (tests, notebooks,
  benchmarks). Every ``nn.Linear`` is quantized, as diffusers' torchao loader does; norms and the rotary
  embedding keep their dtype.

torchao's int4 schemes are not offered: peft cannot attach LoRA to torchao int4 weights (int8 only).
"""

from __future__ import annotations

from typing import Any

import torch

SCHEMES: tuple[str, ...] = ("int8_weight_only", "bnb_int8", "bnb_nf4")
BITS: dict[str, int] = {"int8_weight_only": 8, "bnb_int8": 8, "bnb_nf4": 4}
_EXTRAS_HINT = 'pip install -e ".[quant]"'


class QuantizationError(ValueError):
    """An unknown scheme or a missing quantization library; the message says what to set or install."""


def check_scheme(scheme: str) -> str:
    if scheme not in SCHEMES:
        raise QuantizationError(f"model.quantization must be null or one of {', '.join(SCHEMES)}, got {scheme!r}")
    return scheme


def check_compile(scheme: str | None) -> None:
    """``model.compile=true`` with a quantized base: torch.compile cannot yet differentiate through torchao's
    int8 tensor subclass once LoRA wraps it (AOTAutograd refuses aliased subclass outputs); bitsandbytes'
    layers compile (checked in tests/models/test_builder.py)."""
    if scheme == "int8_weight_only":
        raise QuantizationError(
            "model.compile=true cannot train through torchao's int8 weights (torch.compile refuses aliased "
            "tensor-subclass outputs under autograd); use model.compile=false, or model.quantization=bnb_int8 on CUDA"
        )


def _require(module: str) -> Any:
    try:
        return __import__(module)
    except ImportError as e:
        raise QuantizationError(f"model.quantization needs the '{module}' package: {_EXTRAS_HINT}") from e


def _torchao_int8_config() -> Any:
    _require("torchao")
    from torchao.quantization import Int8WeightOnlyConfig

    return Int8WeightOnlyConfig()


def quantization_configs(scheme: str, dtype: torch.dtype = torch.bfloat16,
                         text_encoder: bool = False) -> dict[str, Any]:
    """``{component: quantization_config}`` for ``FluxPipeline.from_pretrained`` through diffusers'
    ``PipelineQuantizationConfig(quant_mapping=...)``: diffusers' config for the transformer and, with
    ``text_encoder=True``, transformers' config of the same scheme for T5 (``text_encoder_2``)."""
    check_scheme(scheme)
    if scheme == "int8_weight_only":
        import diffusers
        import transformers

        configs = {"transformer": diffusers.TorchAoConfig(_torchao_int8_config())}
        if text_encoder:
            configs["text_encoder_2"] = transformers.TorchAoConfig(_torchao_int8_config())
        return configs
    _require("bitsandbytes")
    if not torch.cuda.is_available():
        raise QuantizationError(
            f"model.quantization={scheme} loads through diffusers' bitsandbytes loader, which needs a CUDA GPU; "
            "on this machine use model.quantization=int8_weight_only (torchao, CPU and GPU)"
        )
    if scheme == "bnb_int8":
        kwargs: dict[str, Any] = {"load_in_8bit": True}
    else:  # bnb_nf4: the QLoRA recipe (NF4, double quantization, compute in the model's dtype)
        kwargs = {"load_in_4bit": True, "bnb_4bit_quant_type": "nf4", "bnb_4bit_use_double_quant": True,
                  "bnb_4bit_compute_dtype": dtype}
    import diffusers
    import transformers

    configs = {"transformer": diffusers.BitsAndBytesConfig(**kwargs)}
    if text_encoder:
        configs["text_encoder_2"] = transformers.BitsAndBytesConfig(**kwargs)
    return configs


def pipeline_quantization_config(scheme: str, dtype: torch.dtype = torch.bfloat16,
                                 text_encoder: bool = False) -> Any:
    """diffusers' ``PipelineQuantizationConfig`` for ``FluxPipeline.from_pretrained(quantization_config=...)``."""
    from diffusers.quantizers import PipelineQuantizationConfig

    return PipelineQuantizationConfig(quant_mapping=quantization_configs(scheme, dtype, text_encoder))


def _bnb_linear(linear: torch.nn.Linear, scheme: str) -> torch.nn.Module:
    """One ``nn.Linear`` -> bitsandbytes' layer of the scheme, quantized on the linear's device."""
    bnb = _require("bitsandbytes")
    device, dtype = linear.weight.device, linear.weight.dtype
    has_bias = linear.bias is not None
    if scheme == "bnb_int8":
        layer = bnb.nn.Linear8bitLt(linear.in_features, linear.out_features, bias=has_bias,
                                    has_fp16_weights=False, threshold=6.0, device="meta")
        layer.weight = bnb.nn.Int8Params(linear.weight.data.detach().cpu(), requires_grad=False,
                                         has_fp16_weights=False)
    else:
        layer = bnb.nn.Linear4bit(linear.in_features, linear.out_features, bias=has_bias, compute_dtype=dtype,
                                  quant_type="nf4", compress_statistics=True, device="meta")
        layer.weight = bnb.nn.Params4bit(linear.weight.data.detach().cpu(), requires_grad=False, quant_type="nf4",
                                         compress_statistics=True)
    if has_bias:
        layer.bias = torch.nn.Parameter(linear.bias.data.detach().clone(), requires_grad=False)
    # bitsandbytes quantizes Int8Params / Params4bit when they are moved to a device
    return layer.to(device)


def quantize_transformer(transformer: torch.nn.Module, scheme: str) -> torch.nn.Module:
    """Quantize every ``nn.Linear`` of an in-memory transformer, in place.

    Call before attaching LoRA (peft then wraps the quantized layers). Returns the transformer.
    """
    check_scheme(scheme)
    transformer.requires_grad_(False)
    if scheme == "int8_weight_only":
        from torchao.quantization import quantize_

        quantize_(transformer, _torchao_int8_config(), filter_fn=lambda mod, name: type(mod) is torch.nn.Linear)
        return transformer
    targets = [name for name, mod in transformer.named_modules()
               if type(mod) is torch.nn.Linear]
    for name in targets:
        parent_name, _, child = name.rpartition(".")
        parent = transformer.get_submodule(parent_name)
        setattr(parent, child, _bnb_linear(getattr(parent, child), scheme))
    return transformer


def is_quantized(module: torch.nn.Module) -> bool:
    """True if any weight of ``module`` is stored in a bitsandbytes or torchao quantized form."""
    for param in module.parameters():
        if type(param).__module__.startswith("bitsandbytes") or type(param.data).__module__.startswith("torchao"):
            return True
    return False
