"""Drop known-harmless import-time warnings of optional libraries, so every command's output stays readable.

With the ``quant`` extra installed, importing diffusers imports torchao and bitsandbytes, which announce on a
CPU-only torch that their CUDA kernels cannot load, and transformers notes that torchvision is absent. None of
these affects gridgen (the messages are about kernels or processors it does not use); every other warning of
those libraries still shows. Filters match the message, not the level, so real problems are not hidden.
"""

from __future__ import annotations

import logging

# logger name -> message fragments dropped
_HARMLESS: dict[str, tuple[str, ...]] = {
    "torchao": ("_C_mxfp8", "_C_cutlass"),  # CUDA kernel libraries of torchao on a CPU-only torch
    "torchao.kernel.intmm": ("Detected no triton",),
    "torch.utils._pytree": ("is an Enum subclass and is now natively supported",),  # torchao's registrations
    "bitsandbytes.backends.cpu.ops": ("from kernels-community",),
    "diffusers.quantizers.torchao.torchao_quantizer": ("Unable to import `torchao` Tensor objects",),
    "transformers.utils.import_utils": ("requires torchvision (not installed)",),
}


class _Drop(logging.Filter):
    def __init__(self, fragments: tuple[str, ...]) -> None:
        super().__init__()
        self.fragments = fragments

    def filter(self, record: logging.LogRecord) -> bool:
        message = record.getMessage()
        return not any(fragment in message for fragment in self.fragments)


def quiet_optional_imports() -> None:
    for name, fragments in _HARMLESS.items():
        logger = logging.getLogger(name)
        if not any(isinstance(f, _Drop) for f in logger.filters):
            logger.addFilter(_Drop(fragments))
