"""Which attention kernel FLUX runs: ``model.attention_backend`` for training, generation and evaluation.

Two mechanisms, both the libraries' own (no attention code is patched):

- torch's scaled-dot-product-attention backend flags (``torch.backends.cuda.enable_*_sdp``), which decide the
  kernel behind diffusers' default ``native`` dispatch. ``auto`` on CUDA allows flash, memory-efficient and
  math but never cuDNN: cuDNN's SDPA backward gives NaN gradients (and illegal memory accesses at FLUX.1-dev
  size) on Hopper since torch 2.11 for some shapes, measured on an H200 with gridgen's tiny and dev-sized
  models. On CPU ``auto`` leaves torch's choice alone.
- diffusers' attention dispatcher (``ModelMixin.set_attention_backend``) for kernels from other packages
  (``flash`` = flash-attn 2, ``_flash_3``, ``sage``, ``xformers``, ``flex`` ...): any name diffusers knows.

The flags are process-global and persist, so every entry point applies the backend once per process (Lightning
starts one process per device, and each runs ``GridModule.on_fit_start``).
"""

from __future__ import annotations

import logging

import torch

log = logging.getLogger(__name__)

# name -> (flash, efficient, math, cudnn) SDPA kernels allowed
SDPA_BACKENDS: dict[str, tuple[bool, bool, bool, bool]] = {
    "sdpa": (True, True, True, True),  # torch's own choice, cuDNN included
    "sdpa_flash": (True, False, False, False),
    "sdpa_efficient": (False, True, False, False),
    "sdpa_math": (False, False, True, False),
    "sdpa_cudnn": (False, False, False, True),
}
_NO_CUDNN = (True, True, True, False)


def _diffusers_backends() -> set[str]:
    from diffusers.models.attention_dispatch import AttentionBackendName

    return {b.value for b in AttentionBackendName}


def resolve_attention_backend(name: str | None, device_type: str) -> str:
    """The backend ``name`` stands for on ``device_type`` (``cuda``/``cpu``): ``auto`` becomes ``sdpa`` on CPU
    and ``sdpa_no_cudnn`` on CUDA; anything else is checked and returned as is."""
    name = (name or "auto").strip()
    if name == "auto":
        return "sdpa_no_cudnn" if device_type == "cuda" else "sdpa"
    if name in SDPA_BACKENDS or name == "sdpa_no_cudnn":
        return name
    if name in _diffusers_backends():
        return name
    raise ValueError(
        f"model.attention_backend={name!r} is unknown; use auto, {', '.join(SDPA_BACKENDS)}, or a diffusers "
        f"attention backend ({', '.join(sorted(b for b in _diffusers_backends() if not b.startswith('_')))})"
    )


def set_sdpa_kernels(flash: bool, efficient: bool, math: bool, cudnn: bool) -> None:
    torch.backends.cuda.enable_flash_sdp(flash)
    torch.backends.cuda.enable_mem_efficient_sdp(efficient)
    torch.backends.cuda.enable_math_sdp(math)
    torch.backends.cuda.enable_cudnn_sdp(cudnn)


def sdpa_kernels() -> tuple[bool, bool, bool, bool]:
    """The SDPA kernels torch may pick now: (flash, efficient, math, cudnn)."""
    b = torch.backends.cuda
    return b.flash_sdp_enabled(), b.mem_efficient_sdp_enabled(), b.math_sdp_enabled(), b.cudnn_sdp_enabled()


def _dispatched(transformer: torch.nn.Module) -> bool:
    """Whether a diffusers attention backend was set on some of ``transformer``'s attention processors."""
    return any(getattr(getattr(m, "processor", None), "_attention_backend", None) is not None
               for m in transformer.modules())


def apply_attention_backend(name: str | None, device_type: str, transformer: torch.nn.Module | None = None) -> str:
    """Select the attention kernel for this process (and ``transformer``); returns the resolved name."""
    resolved = resolve_attention_backend(name, device_type)
    if resolved in SDPA_BACKENDS or resolved == "sdpa_no_cudnn":
        set_sdpa_kernels(*SDPA_BACKENDS.get(resolved, _NO_CUDNN))
        if transformer is not None and _dispatched(transformer):
            transformer.reset_attention_backend()  # back to diffusers' `native` dispatch: torch SDPA under the flags
    else:
        set_sdpa_kernels(*_NO_CUDNN)  # whatever diffusers falls back to, never cuDNN SDPA
        if transformer is None:
            raise ValueError(f"model.attention_backend={resolved} needs the transformer to set it on")
        transformer.set_attention_backend(resolved)
    log.info("attention backend: %s", resolved)
    return resolved
