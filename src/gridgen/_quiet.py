"""Drop known-harmless messages of the libraries gridgen uses, at the logger or warning they come from, so every
command's output says what matters. Each filter matches one message (not a level, not a whole library), with
the reason it cannot matter to a gridgen user; every other message of those libraries still shows.
"""

from __future__ import annotations

import logging
import warnings
from collections.abc import Iterator
from contextlib import contextmanager

# logger name -> message fragments dropped
_HARMLESS: dict[str, tuple[str, ...]] = {
    "torchao": ("_C_mxfp8", "_C_cutlass"),  # CUDA kernel libraries of torchao on a CPU-only torch
    "torchao.kernel.intmm": ("Detected no triton",),
    "torch.utils._pytree": ("is an Enum subclass and is now natively supported",),  # torchao's registrations
    "bitsandbytes.backends.cpu.ops": ("from kernels-community",),
    "diffusers.quantizers.torchao.torchao_quantizer": ("Unable to import `torchao` Tensor objects",),
    "transformers.utils.import_utils": ("requires torchvision (not installed)",),
    # printed for every guider made (one per sampled batch with generate.guider); pyproject pins diffusers' range
    # and tests/inference/test_sampler.py runs every guider gridgen allows (the interval against a plain Euler loop)
    "diffusers.guiders.guider_utils": ("Guiders are currently an experimental feature",),
    # an advertisement printed by every Trainer without a LitLogger; TPUs, which FLUX training never runs on
    "lightning.pytorch.utilities.rank_zero": ("try installing [litlogger]", "TPU available:"),
}

# (message regex, category, why): Python warnings raised inside libraries, not by anything the user set
_HARMLESS_WARNINGS: tuple[tuple[str, type[Warning], str], ...] = (
    (r"`isinstance\(treespec, LeafSpec\)` is deprecated", FutureWarning,
     "Lightning's own pytree helper uses torch's deprecated LeafSpec on every fit; nothing a user can change"),
)


class _Drop(logging.Filter):
    def __init__(self, fragments: tuple[str, ...]) -> None:
        super().__init__()
        self.fragments = fragments

    def filter(self, record: logging.LogRecord) -> bool:
        message = record.getMessage()
        return not any(fragment in message for fragment in self.fragments)


def quiet_optional_imports() -> None:
    for message, category, _why in _HARMLESS_WARNINGS:
        warnings.filterwarnings("ignore", message=message, category=category)
    for name, fragments in _HARMLESS.items():
        logger = logging.getLogger(name)
        if not any(isinstance(f, _Drop) for f in logger.filters):
            logger.addFilter(_Drop(fragments))


@contextmanager
def library_progress_bars_off() -> Iterator[None]:
    """diffusers' and transformers' loading/saving bars (one per component and weight file) off: the run shows one
    bar, its own; the log line before the load says what is loading."""
    import diffusers.utils.logging as diffusers_logging
    import transformers.utils.logging as transformers_logging

    saved = [(lib, lib.is_progress_bar_enabled()) for lib in (diffusers_logging, transformers_logging)]
    for lib, _ in saved:
        lib.disable_progress_bar()
    try:
        yield
    finally:
        for lib, was_enabled in saved:
            if was_enabled:
                lib.enable_progress_bar()
