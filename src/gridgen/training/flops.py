"""Floating-point operations of a FLUX LoRA (or full fine-tuning) training step and of sampling, from a documented
formula.

A matmul ``(T, d_in) @ (d_in, d_out)`` costs ``2 * d_in * d_out * T`` FLOPs (one multiply + one add per MAC).
For a batch of ``B`` grids of ``N`` image tokens and ``S`` text tokens, ``T = N + S`` per sample:

* **Frozen linears**: forward ``2 * P * t`` and backward to the activations ``2 * P * t`` (the "4 P T" rule:
  a frozen weight needs no weight gradient), where ``P = d_in * d_out`` and ``t`` is the number of tokens
  the layer sees. FLUX's double blocks keep two streams, so their image weights (``attn.to_q``, ``ff`` ...)
  see ``N`` tokens and their text weights (``attn.add_q_proj``, ``ff_context`` ...) see ``S``; the single
  blocks see ``T``; the adaLN modulation linears (``norm1.linear``, ``norm.linear``, ``norm_out.linear``) and
  the time/guidance/pooled-text embedders see one vector per sample. A plain ``2 * P_frozen * T`` would count
  the double blocks twice.
* **LoRA**: ``6 * P_lora * t`` (forward, weight gradient, input gradient) per adapter matrix, with ``t`` of
  the layer it adapts.
* **Attention**: ``4 * T**2 * d_model`` forward per block (``Q K^T`` and ``A V``, ``d_model = heads x
  head_dim``), twice that backward (``dQ, dK`` from ``dS`` and ``dA, dV`` from ``dO``), in all
  ``num_layers + num_single_layers`` blocks (both kinds attend over the joint sequence).
* **Full fine-tuning** (``adapter=full``, ``full=True``): every linear whose weight trains also computes its weight
  gradient, ``2 * P * t`` (the "6 P T" rule), and input gradients flow through every linear except those fed by
  data alone: ``x_embedder`` (latents), ``context_embedder`` (T5 states) and the first linear of each time,
  guidance and pooled-text embedder. (With ``lora.train_modules`` restricting the trained weights, input gradients
  are counted as for the whole transformer: an upper bound below the lowest trained layer.)
* **Gradient checkpointing** (diffusers checkpoints each block): one more forward of the blocks.

Where autograd computes no input gradient, none is counted: layers below the first block that carries a
LoRA (embedders, and the modulation linears, whose input is the time embedding), and that block's input
projections (``to_q/k/v``, ``add_*_proj``, single blocks' ``proj_mlp``), whose input is the normalised
block input, not a function of any adapter. Not counted (elementwise, O(T * d) against O(T * d^2)):
norms, RoPE, softmax, activations, residual adds, the loss. The bias adds are elementwise too.

Plain Python on the module's structure (``named_modules``): works on a transformer built on the ``meta``
device, and needs no Lightning.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

import torch

# dense (no sparsity) peak FLOP/s of cards that Lightning's table lacks or lists with sparsity;
# matched before Lightning's ``_CUDA_FLOPS`` (substring of the lower-cased device name -> dtype -> FLOP/s).
DENSE_PEAK_FLOPS: dict[str, dict[str, float]] = {
    # Lightning's "h200 sxm1" / "h200 nvl1" rows are the datasheet's "with sparsity" figures and torch reports
    # "NVIDIA H200", which its parser does not map. H200 SXM has H100 SXM's tensor cores and clocks; the NVL
    # cards (H100 NVL per GPU, H200 NVL) list 1,671 TFLOP/s bf16 with sparsity, half of it dense.
    "h100 nvl": {"bfloat16": 835.5e12, "float16": 835.5e12, "tfloat32": 417.5e12, "float32": 60e12},
    "h200 nvl": {"bfloat16": 835.5e12, "float16": 835.5e12, "tfloat32": 417.5e12, "float32": 60e12},
    "h200": {"bfloat16": 989.4e12, "float16": 989.4e12, "tfloat32": 494.7e12, "float32": 66.9e12},
}
_DTYPE_NAMES = {"bfloat16": "bfloat16", "bf16": "bfloat16", "bf16-mixed": "bfloat16", "bf16-true": "bfloat16",
                "float16": "float16", "fp16": "float16", "16-mixed": "float16", "half": "float16",
                "float32": "float32", "fp32": "float32", "32-true": "float32", "tfloat32": "tfloat32",
                "tf32": "tfloat32", "int8": "int8"}


@dataclass(frozen=True)
class LinearCost:
    """Multiply-accumulates of one linear layer for one sample, and whether it gets an input gradient."""

    name: str
    macs: int  # d_in * d_out * tokens it sees
    trainable: bool
    input_grad: bool
    in_blocks: bool  # recomputed under gradient checkpointing


# ---------------------------------------------------------------------------------------------- structure
_ADAPTER = re.compile(r"\.(base_layer|lora_[AB]\.[^.]+)$")
_BLOCK = re.compile(r"^(transformer_blocks|single_transformer_blocks)\.(\d+)\.(.+)$")
_DOUBLE_INPUTS = ("attn.to_q", "attn.to_k", "attn.to_v", "attn.add_q_proj", "attn.add_k_proj", "attn.add_v_proj")
_SINGLE_INPUTS = ("attn.to_q", "attn.to_k", "attn.to_v", "proj_mlp")


def _tokens(layer: str, n: int, s: int) -> int:
    """Tokens one sample feeds through the linear ``layer`` (adapter suffixes stripped)."""
    match = _BLOCK.match(layer)
    if match is None:  # outside the blocks
        if layer in ("x_embedder", "proj_out"):
            return n
        if layer == "context_embedder":
            return s
        if layer.startswith(("time_text_embed.", "norm_out.")):
            return 1
        raise ValueError(f"flops: unknown FLUX transformer layer {layer!r}; extend gridgen.training.flops._tokens")
    kind, inner = match[1], match[3]
    if inner.startswith("norm"):  # adaLN modulation: one embedding vector per sample
        return 1
    if kind == "single_transformer_blocks":
        return n + s
    if inner.startswith(("attn.add_", "attn.to_add_out", "ff_context.")):
        return s
    return n


def _block_position(layer: str, num_double: int) -> int | None:
    """Index of the block in execution order (double blocks, then single), None outside the blocks."""
    match = _BLOCK.match(layer)
    if match is None:
        return None
    return int(match[2]) + (num_double if match[1] == "single_transformer_blocks" else 0)


def _is_block_input(layer: str) -> bool:
    match = _BLOCK.match(layer)
    assert match is not None
    return match[3] in (_DOUBLE_INPUTS if match[1] == "transformer_blocks" else _SINGLE_INPUTS)


def _is_lora(name: str) -> bool:
    """peft's adapter matrices (``...to_q.lora_A.default``): the trained weights; all others are frozen."""
    return ".lora_A." in name or ".lora_B." in name


def _fed_by_data(layer: str) -> bool:
    """Linears whose input is the batch itself (latents, text states, sinusoidal time, pooled text): no input
    gradient even when every weight trains."""
    return layer in ("x_embedder", "context_embedder") or (layer.startswith("time_text_embed.")
                                                          and layer.endswith(".linear_1"))


def linear_costs(transformer: torch.nn.Module, image_tokens: int, text_tokens: int,
                 full: bool = False) -> list[LinearCost]:
    """Every ``nn.Linear`` of a (LoRA-attached or bare) FLUX transformer with its per-sample MACs; ``full``: the
    transformer's own weights train (``trainable``: the weight requires a gradient)."""
    config = transformer.config
    num_double = int(config.num_layers)
    linears = [(name, m) for name, m in transformer.named_modules() if isinstance(m, torch.nn.Linear)]
    positions = [_block_position(_ADAPTER.sub("", name), num_double) for name, _ in linears if _is_lora(name)]
    # autograd needs input gradients from the first block that carries an adapter on; a bare transformer
    # (LoRA counted from a number) is taken to carry one in its first block, as the default targets do.
    first = min((p for p in positions if p is not None), default=0)
    costs = []
    for name, module in linears:
        layer = _ADAPTER.sub("", name)
        position = _block_position(layer, num_double)
        trainable = _is_lora(name)
        if full:
            macs = module.in_features * module.out_features * _tokens(layer, image_tokens, text_tokens)
            costs.append(LinearCost(name, macs, module.weight.requires_grad, not _fed_by_data(layer),
                                    position is not None))
            continue
        if position is None:
            input_grad = layer == "proj_out"  # the output projection; embedders are below every adapter
        elif position < first or layer.split(".")[2].startswith("norm"):
            input_grad = False
        elif position == first and _is_block_input(layer):
            # the block's input is no function of an adapter; lora_B's input (lora_A's output) is
            input_grad = ".lora_B." in name
        else:
            input_grad = True
        macs = module.in_features * module.out_features * _tokens(layer, image_tokens, text_tokens)
        costs.append(LinearCost(name, macs, trainable, input_grad, position is not None))
    return costs


def _attention_flops(transformer: torch.nn.Module, tokens: int) -> int:
    """Forward FLOPs of the attention products of all blocks for one sample: 4 * T^2 * d_model each."""
    config = transformer.config
    d_model = int(config.num_attention_heads) * int(config.attention_head_dim)
    blocks = int(config.num_layers) + int(config.num_single_layers)
    return blocks * 4 * tokens * tokens * d_model


def _check(batch_size: int, image_tokens: int, text_tokens: int) -> None:
    for name, value in (("batch_size", batch_size), ("image_tokens", image_tokens)):
        if int(value) < 1:
            raise ValueError(f"flops: {name} must be >= 1, got {value}")
    if int(text_tokens) < 0:
        raise ValueError(f"flops: text_tokens must be >= 0, got {text_tokens}")


# ---------------------------------------------------------------------------------------------- public
def training_flops_per_batch(transformer: torch.nn.Module, batch_size: int, image_tokens: int, text_tokens: int,
                             lora_params: int | None = None, gradient_checkpointing: bool = False,
                             full: bool = False) -> int:
    """FLOPs of forward + backward of one training batch of a FLUX transformer with LoRA, or of its own weights
    (``full``, ``adapter=full``: the linears whose weight requires a gradient train) (module docstring).

    ``lora_params``: None counts the adapters attached to ``transformer`` layer by layer; a number is for a
    bare transformer (e.g. built on ``meta`` to size a run): then LoRA costs ``6 * lora_params * (N + S)``
    per sample (every adapted layer taken to see all tokens: an upper bound). With adapters attached, a
    number must match their parameter count.
    """
    _check(batch_size, image_tokens, text_tokens)
    tokens = image_tokens + text_tokens
    if full:
        if lora_params:
            raise ValueError(f"flops: lora_params={lora_params} with full=True; a full fine-tuning has no LoRA")
        costs = linear_costs(transformer, image_tokens, text_tokens, full=True)
        attention = _attention_flops(transformer, tokens)
        forward = 2 * sum(c.macs for c in costs)
        backward = 2 * sum(c.macs for c in costs if c.input_grad) + 2 * sum(c.macs for c in costs if c.trainable)
        per_sample = forward + backward + 3 * attention
        if gradient_checkpointing:  # each block's forward runs again during the backward
            per_sample += 2 * sum(c.macs for c in costs if c.in_blocks) + attention
        return batch_size * per_sample
    costs = linear_costs(transformer, image_tokens, text_tokens)
    attached = sum(m.weight.numel() for name, m in transformer.named_modules()
                   if isinstance(m, torch.nn.Linear) and _is_lora(name))
    if lora_params is not None and attached and lora_params != attached:
        raise ValueError(f"flops: lora_params={lora_params} but the transformer's adapters have {attached} "
                         "parameters; pass lora_params=None to count them")
    frozen = [c for c in costs if not c.trainable]
    lora = [c for c in costs if c.trainable]
    forward = 2 * sum(c.macs for c in frozen)
    backward = 2 * sum(c.macs for c in frozen if c.input_grad)
    if lora:
        lora_forward = 2 * sum(c.macs for c in lora)
        lora_backward = 2 * sum(c.macs for c in lora) + 2 * sum(c.macs for c in lora if c.input_grad)
    else:
        lora_forward, lora_backward = 2 * (lora_params or 0) * tokens, 4 * (lora_params or 0) * tokens
    attention = _attention_flops(transformer, tokens)
    per_sample = forward + backward + lora_forward + lora_backward + 3 * attention
    if gradient_checkpointing:  # each block's forward runs again during the backward
        per_sample += 2 * sum(c.macs for c in costs if c.in_blocks and not c.trainable) + attention
        per_sample += 2 * sum(c.macs for c in lora if c.in_blocks) if lora else lora_forward
    return batch_size * per_sample


def generation_flops(transformer: torch.nn.Module, batch_size: int, image_tokens: int, text_tokens: int,
                     steps: int = 1) -> int:
    """FLOPs of ``steps`` forward passes (sampling steps of guidance-distilled FLUX: one pass each)."""
    _check(batch_size, image_tokens, text_tokens)
    linear = 2 * sum(c.macs for c in linear_costs(transformer, image_tokens, text_tokens))
    return steps * batch_size * (linear + _attention_flops(transformer, image_tokens + text_tokens))


def _lightning_chip(name: str) -> str | None:
    """The key of Lightning's ``_CUDA_FLOPS`` table for a CUDA device name, as its parser maps names."""
    from lightning.fabric.utilities.throughput import _CUDA_FLOPS

    chip = name.lower().replace("hbm3", "sxm").replace("hbm2e", "pcie").replace("-", " ")
    chip = re.sub(r"\bsxm\d", "sxm", chip)  # "A100-SXM4", "V100-SXM2"
    matches = [key for key in _CUDA_FLOPS  # whole words: "l40s" is neither "l40" nor "l4"
               if all(re.search(rf"(?<![a-z0-9]){re.escape(word)}(?![a-z0-9])", chip) for word in key.split())]
    return max(matches, key=len) if matches else None  # "rtx 4080 super" over "rtx 4080"


def peak_flops(device_name: str, dtype: torch.dtype | str) -> float | None:
    """Dense peak FLOP/s of a CUDA card (``torch.cuda.get_device_name``) for a compute dtype; None if unknown.

    ``dtype``: a torch dtype or a name (``bfloat16``/``bf16``/``bf16-mixed``, ``float16``, ``float32``,
    ``tfloat32``). float32 means true fp32 matmuls; pass ``tfloat32`` when TF32 is enabled. Cards of
    ``DENSE_PEAK_FLOPS`` first, then Lightning's table (``lightning.fabric.utilities.throughput``).
    """
    key = str(dtype).removeprefix("torch.")
    dtype_name = _DTYPE_NAMES.get(key)
    if dtype_name is None:
        raise ValueError(f"peak_flops: unknown dtype {dtype!r}; use bfloat16, float16, float32 or tfloat32")
    name = device_name.lower()
    for card, table in DENSE_PEAK_FLOPS.items():
        if all(word in name for word in card.split()):
            return table.get(dtype_name)
    chip = _lightning_chip(device_name)
    if chip is None:
        return None
    from lightning.fabric.utilities.throughput import _CUDA_FLOPS

    table = {(k if isinstance(k, str) else str(k).removeprefix("torch.")): v for k, v in _CUDA_FLOPS[chip].items()}
    value = table.get(dtype_name)
    return float(value) if value is not None else None
