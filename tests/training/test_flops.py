"""FLOPs formula of gridgen.training.flops: a hand-computed case, and torch's FlopCounterMode on a LoRA'd tiny FLUX."""

from __future__ import annotations

import pytest
import torch
from diffusers import FluxTransformer2DModel
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.utils.flop_counter import FlopCounterMode

from gridgen.embedded import TINY_FLUX_CONFIG
from gridgen.layout import GridLayout
from gridgen.models.lora import attach_lora, build_lora_config
from gridgen.training.flops import generation_flops, peak_flops, training_flops_per_batch

TARGETS = ["attn.to_q", "attn.to_k", "attn.to_v", "attn.to_out.0", "attn.add_q_proj", "attn.add_k_proj",
           "attn.add_v_proj", "attn.to_add_out", "ff.net.0.proj", "ff.net.2", "ff_context.net.0.proj",
           "ff_context.net.2", "proj_mlp", "proj_out"]  # conf/adapter/lora.yaml

# 1 double + 1 single block, width D = 1 head x 8, latent channels C = 4, text J = 4, pooled 4.
HAND_CONFIG = {**TINY_FLUX_CONFIG, "num_layers": 1, "num_single_layers": 1, "num_attention_heads": 1,
               "attention_head_dim": 8, "in_channels": 4, "joint_attention_dim": 4, "pooled_projection_dim": 4,
               "axes_dims_rope": (2, 2, 4)}


def test_formula_on_a_hand_computed_case():
    transformer = FluxTransformer2DModel(**HAND_CONFIG)
    D, C, J, P, N, S = 8, 4, 4, 4, 4, 2  # noqa: N806
    T = N + S  # noqa: N806
    # multiply-accumulates per sample of every linear, by the tokens it sees
    embed = (256 * D + D * D) * 2 + (P * D + D * D)  # timestep + guidance + pooled text: one vector each
    x_in, txt_in = C * D * N, J * D * S
    modulation = D * 6 * D * 2 + D * 3 * D + D * 2 * D  # norm1 + norm1_context, single norm, norm_out
    double_inputs = 3 * D * D * N + 3 * D * D * S  # to_q/k/v on image tokens, add_q/k/v on text tokens
    double_rest = (D * D + 2 * D * 4 * D) * N + (D * D + 2 * D * 4 * D) * S  # out + ff, per stream
    single = (3 * D * D + D * 4 * D + 5 * D * D) * T  # q, k, v, proj_mlp, proj_out (attention + mlp -> D)
    out = D * C * N
    forward_macs = embed + x_in + txt_in + modulation + double_inputs + double_rest + single + out
    attention = 2 * 4 * T * T * D  # 2 blocks, Q K^T and A V
    assert generation_flops(transformer, 1, N, S) == 2 * forward_macs + attention == 32192
    assert generation_flops(transformer, 3, N, S, steps=5) == 15 * 32192

    # backward to activations: the output projection, the double block past its input projections, the single
    # block; LoRA counted from a number on a bare transformer: 6 * P_lora * T
    backward_macs = out + double_rest + single
    lora = 6 * 10 * T
    expected = 2 * forward_macs + 2 * backward_macs + lora + 3 * attention
    assert training_flops_per_batch(transformer, 1, N, S, lora_params=10) == expected == 53544
    assert training_flops_per_batch(transformer, 2, N, S, lora_params=10) == 2 * expected
    recompute = 2 * (modulation - D * 2 * D + double_inputs + double_rest + single) + attention + 2 * 10 * T
    assert training_flops_per_batch(transformer, 1, N, S, lora_params=10, gradient_checkpointing=True) == \
        expected + recompute == 76320


def _lora_transformer(gradient_checkpointing: bool) -> FluxTransformer2DModel:
    torch.manual_seed(0)
    transformer = FluxTransformer2DModel(**TINY_FLUX_CONFIG).train()
    attach_lora(transformer, build_lora_config(4, None, 0.0, "gaussian", TARGETS))
    if gradient_checkpointing:
        transformer.enable_gradient_checkpointing()
    return transformer


def _counted(transformer: FluxTransformer2DModel, batch: int, layout: GridLayout, text_tokens: int) -> int:
    """forward + backward FLOPs of one step as torch counts them (math SDPA: attention as counted matmuls)."""
    c = transformer.config
    gen = torch.Generator().manual_seed(0)
    inputs = {
        "hidden_states": torch.randn(batch, layout.num_tokens, c.in_channels, generator=gen),
        "encoder_hidden_states": torch.randn(batch, text_tokens, c.joint_attention_dim, generator=gen),
        "pooled_projections": torch.randn(batch, c.pooled_projection_dim, generator=gen),
        "timestep": torch.rand(batch, generator=gen),
        "guidance": torch.full((batch,), 3.5),
        "img_ids": layout.image_ids(torch.device("cpu"), torch.float32),
        "txt_ids": torch.zeros(text_tokens, 3),
    }
    with FlopCounterMode(display=False) as counter, sdpa_kernel(SDPBackend.MATH):
        transformer(**inputs, return_dict=False)[0].square().mean().backward()
    return counter.get_total_flops()


@pytest.mark.parametrize("checkpointing", [False, True])
def test_formula_matches_torch_flop_counter(checkpointing):
    """The counter counts matmuls (mm/addmm/bmm) only, like the formula; what differs is stated below."""
    transformer = _lora_transformer(checkpointing)
    layout, text_tokens, batch = GridLayout(2, 2, 32, 32), 8, 2  # 8x8 = 64 image tokens
    counted = _counted(transformer, batch, layout, text_tokens)
    formula = training_flops_per_batch(transformer, batch, layout.num_tokens, text_tokens,
                                       gradient_checkpointing=checkpointing)
    # Exact: the math SDPA backend runs Q K^T and A V as two counted bmm (backward: 4); norms, RoPE, softmax and
    # the sinusoidal embeddings are elementwise, uncounted by both. (The CPU's fused SDPA kernel is not in the
    # counter's registry: with it the counter would miss 3 * 4 T^2 d per block.)
    assert formula == counted


def test_formula_tracks_tokens_and_batch():
    transformer = _lora_transformer(False)
    small = training_flops_per_batch(transformer, 1, 64, 8)
    assert training_flops_per_batch(transformer, 3, 64, 8) == 3 * small
    assert training_flops_per_batch(transformer, 1, 256, 8) > 3 * small  # linear terms x4, attention x~15
    with pytest.raises(ValueError, match="lora_params=1 but the transformer's adapters have"):
        training_flops_per_batch(transformer, 1, 64, 8, lora_params=1)
    with pytest.raises(ValueError, match="batch_size must be >= 1, got 0"):
        training_flops_per_batch(transformer, 0, 64, 8)


def test_peak_flops():
    assert peak_flops("NVIDIA H200", torch.bfloat16) == 989.4e12  # dense; Lightning's row is with sparsity
    assert peak_flops("NVIDIA H200 NVL", "bf16-mixed") == 835.5e12
    assert peak_flops("NVIDIA H100 80GB HBM3", "bfloat16") == 989.4e12  # Lightning's "h100 sxm"
    assert peak_flops("NVIDIA A100-SXM4-80GB", torch.bfloat16) == 312e12
    assert peak_flops("NVIDIA A100-SXM4-80GB", "tfloat32") == 156e12
    assert peak_flops("NVIDIA GeForce RTX 4080 SUPER", "bfloat16") == 52.2e12  # not plain "rtx 4080"
    assert peak_flops("NVIDIA L40S", torch.bfloat16) is None  # not in either table: no guess from "l40"
    assert peak_flops("Tesla V100-SXM2-16GB", torch.float16) == 125e12
    assert peak_flops("NVIDIA L4", torch.bfloat16) == 121e12
    assert peak_flops("Tesla T4", torch.bfloat16) is None  # T4 has no bf16 tensor cores
    assert peak_flops("AMD EPYC 7B13", torch.float32) is None
    with pytest.raises(ValueError, match="unknown dtype 'float8'"):
        peak_flops("NVIDIA H200", "float8")
