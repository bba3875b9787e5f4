"""FSDP2 for FLUX: per-parameter sharding (``fully_shard``) of each transformer block through Lightning's
``ModelParallelStrategy``.

Per-parameter sharding keeps each tensor's dtype, so a bf16 frozen base and fp32 LoRA weights shard side by
side (FSDP1 flattened a block into one buffer of one dtype and needed ``model.dtype=float32``: twice the
memory for FLUX.1-dev's base). The strategy only sets up the device mesh; the module shards itself in
``configure_model`` with :func:`shard_flux_transformer`. Checkpoints hold the trained weights only (the LoRA, or
with ``adapter=full`` the whole transformer, sharded alike): frozen parameters are left
out of the gathered state dict, and rank 0 writes one file.
"""

from __future__ import annotations

from typing import Any

import torch
from lightning.pytorch.strategies import ModelParallelStrategy


def flux_block_classes() -> set[type]:
    """The two FLUX transformer block types: the unit of FSDP sharding and activation checkpointing."""
    from diffusers.models.transformers.transformer_flux import (
        FluxSingleTransformerBlock,
        FluxTransformerBlock,
    )

    return {FluxTransformerBlock, FluxSingleTransformerBlock}


class FluxFSDP2Strategy(ModelParallelStrategy):
    """Data parallel over every process with FSDP2 (no tensor parallelism); single-file checkpoints of the trained
    weights (LoRA, or the transformer with ``adapter=full``).

    Activation checkpointing is ``model.gradient_checkpointing`` (diffusers' per-block checkpointing, on by
    default for FLUX.1-dev), as for every other strategy.

    Args:
        reshard_after_forward: free each block's gathered weights after its forward (ZeRO-3; False: ZeRO-2).
        param_dtype: compute dtype of the gathered weights (``bfloat16``; None keeps each tensor's own dtype,
            which then must be uniform); gradients are reduced in ``reduce_dtype`` (float32).
    """

    def __init__(self, reshard_after_forward: bool = True, param_dtype: str | None = "bfloat16",
                 reduce_dtype: str | None = "float32", **kwargs: Any) -> None:
        super().__init__(save_distributed_checkpoint=False, **kwargs)
        self.reshard_after_forward = reshard_after_forward
        self.param_dtype = param_dtype
        self.reduce_dtype = reduce_dtype

    def setup_environment(self) -> None:
        # every process is one data-parallel rank: shard across all of them, no tensor parallelism
        self._data_parallel_size = self.num_nodes * self.num_processes
        self._tensor_parallel_size = 1
        super().setup_environment()

    def lightning_module_state_dict(self) -> dict[str, Any]:
        """The trained tensors only (LoRA, or the transformer), gathered whole on rank 0 (the frozen base is rebuilt
        from model.pretrained)."""
        from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

        options = StateDictOptions(full_state_dict=True, cpu_offload=True, ignore_frozen_params=True)
        return get_model_state_dict(self.model, options=options)


def shard_flux_transformer(transformer: torch.nn.Module, mesh: Any, strategy: FluxFSDP2Strategy) -> None:
    """``fully_shard`` each FLUX block, then the transformer (its embedders and output layers) on ``mesh``."""
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

    def dtype(name: str | None) -> torch.dtype | None:
        return getattr(torch, name) if name else None

    policy = MixedPrecisionPolicy(param_dtype=dtype(strategy.param_dtype), reduce_dtype=dtype(strategy.reduce_dtype))
    blocks = flux_block_classes()
    for module in transformer.modules():
        if type(module) in blocks:
            fully_shard(module, mesh=mesh, mp_policy=policy, reshard_after_forward=strategy.reshard_after_forward)
    fully_shard(transformer, mesh=mesh, mp_policy=policy, reshard_after_forward=strategy.reshard_after_forward)
