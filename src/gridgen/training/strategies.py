"""Distributed strategies that need Python objects (block classes) rather than plain config values."""

from __future__ import annotations

from lightning.pytorch.strategies import FSDPStrategy
from torch.distributed.fsdp import CPUOffload


def flux_block_classes() -> set[type]:
    """The two FLUX transformer block types: the unit of FSDP sharding and activation checkpointing."""
    from diffusers.models.transformers.transformer_flux import (
        FluxSingleTransformerBlock,
        FluxTransformerBlock,
    )

    return {FluxTransformerBlock, FluxSingleTransformerBlock}


def flux_fsdp_strategy(sharding_strategy: str = "FULL_SHARD", activation_checkpointing: bool = True,
                       cpu_offload: bool = False, **kwargs) -> FSDPStrategy:
    """Lightning's FSDPStrategy wrapping each FLUX block; frozen and LoRA weights share one flat parameter
    per block, so ``use_orig_params`` keeps per-parameter ``requires_grad`` (only LoRA trains)."""
    blocks = flux_block_classes()
    return FSDPStrategy(
        auto_wrap_policy=blocks,
        activation_checkpointing_policy=blocks if activation_checkpointing else None,
        sharding_strategy=sharding_strategy,
        cpu_offload=CPUOffload(offload_params=True) if cpu_offload else None,
        use_orig_params=True,
        **kwargs,
    )
