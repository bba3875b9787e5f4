"""Quantized frozen FLUX base (model.quantization): close to the full-precision output, LoRA trains on top.

What runs on CPU: every scheme in memory (torchao int8 weight-only; bitsandbytes >= 0.45 LLM.int8 and NF4 have
CPU kernels), and the ``from_pretrained`` path for torchao. diffusers' bitsandbytes loader needs a CUDA device,
so that path is skipped on CPU machines.
"""

import copy

import pytest
import torch
from diffusers import FluxPipeline

from gridgen.embedded import ensure_tiny_flux
from gridgen.models.loading import load_flux_pipeline
from gridgen.models.lora import attach_lora, build_lora_config
from gridgen.models.quantization import BITS, SCHEMES, QuantizationError, is_quantized, quantize_transformer
from gridgen.training.module import GridModule
from tests.helpers.flux import transformer_inputs
from tests.helpers.train import make_cfg

NEEDS = {"int8_weight_only": "torchao", "bnb_int8": "bitsandbytes", "bnb_nf4": "bitsandbytes"}
TARGETS = ["attn.to_q", "attn.to_k", "attn.to_v", "attn.to_out.0", "ff.net.2", "proj_out"]


def needs(scheme: str) -> None:
    pytest.importorskip(NEEDS[scheme], reason=f"{scheme} needs {NEEDS[scheme]} (pip install -e '.[quant]')")


@pytest.fixture(scope="module")
def base():
    return load_flux_pipeline(ensure_tiny_flux(), load_vae=False, load_text_encoders=False).transformer.eval()


def cosine(a: torch.Tensor, b: torch.Tensor) -> float:
    return torch.nn.functional.cosine_similarity(a.flatten().double(), b.flatten().double(), dim=0).item()


def linear_weight_bytes(model: torch.nn.Module) -> int:
    """Storage of the Linear weights as held (int8 / packed 4-bit + scales for quantized ones)."""
    total = 0
    for mod in model.modules():
        if isinstance(mod, torch.nn.Linear) and not hasattr(mod, "lora_A"):
            w = mod.weight
            inner = [getattr(w, n) for n in ("qdata", "scale") if torch.is_tensor(getattr(w, n, None))]
            total += sum(t.numel() * t.element_size() for t in (inner or [w]))
    return total


@pytest.mark.parametrize("scheme", SCHEMES)
def test_quantized_output_is_close_and_weights_are_small(base, scheme):
    needs(scheme)
    inputs = transformer_inputs()
    with torch.no_grad():
        ref = base(**inputs)[0]
        quantized = quantize_transformer(copy.deepcopy(base), scheme)
        out = quantized(**inputs)[0]
    assert is_quantized(quantized) and not is_quantized(base)
    assert cosine(out, ref) >= 0.99, scheme
    assert not torch.equal(out, ref)  # really quantized, not a copy
    # weights stored in `bits` bits: at least 3x (8-bit) / 6x (4-bit) smaller than fp32
    ratio = linear_weight_bytes(base) / linear_weight_bytes(quantized)
    assert ratio > (3.0 if BITS[scheme] == 8 else 6.0), (scheme, ratio)


@pytest.mark.parametrize("scheme", SCHEMES)
def test_lora_trains_on_a_quantized_base(base, scheme):
    needs(scheme)
    transformer = quantize_transformer(copy.deepcopy(base), scheme)
    attach_lora(transformer, build_lora_config(4, 4, 0.0, "gaussian", TARGETS))
    transformer.train()
    params = {n: p for n, p in transformer.named_parameters() if p.requires_grad}
    assert params and all("lora_" in n for n in params)
    start = {n: p.detach().clone() for n, p in params.items()}
    opt = torch.optim.AdamW(params.values(), lr=1e-2)
    inputs = transformer_inputs()
    target = torch.randn(2, 64, 64, generator=torch.Generator().manual_seed(1))
    losses = []
    for step in range(5):
        loss = torch.nn.functional.mse_loss(transformer(**inputs)[0], target)
        opt.zero_grad()
        loss.backward()
        grads = {n: p.grad for n, p in params.items()}
        if step == 0:  # B starts at zero: the first gradient reaches every lora_B
            assert all(grads[n] is not None and grads[n].abs().max() > 0 for n in grads if "lora_B" in n)
        opt.step()
        losses.append(loss.item())
    assert all(b < a for a, b in zip(losses, losses[1:], strict=False)), losses
    assert all((params[n] - start[n]).abs().max() > 0 for n in params)  # A moves too once B is non-zero
    frozen = [p for n, p in transformer.named_parameters() if not p.requires_grad]
    assert frozen and all(p.grad is None for p in frozen)


def test_from_pretrained_quantizes_while_loading(base):
    needs("int8_weight_only")
    pipe = load_flux_pipeline(ensure_tiny_flux(), quantization="int8_weight_only", quantize_text_encoder=True)
    assert is_quantized(pipe.transformer) and is_quantized(pipe.text_encoder_2) and not is_quantized(pipe.vae)
    plain = FluxPipeline.from_pretrained(ensure_tiny_flux())
    with torch.no_grad():
        assert cosine(pipe.transformer(**transformer_inputs())[0], base(**transformer_inputs())[0]) >= 0.99
        ids = pipe.tokenizer_2(["a red square moving right"], return_tensors="pt").input_ids
        assert cosine(pipe.text_encoder_2(ids)[0], plain.text_encoder_2(ids)[0]) >= 0.99


@pytest.mark.skipif(not torch.cuda.is_available(), reason="diffusers' bitsandbytes loader needs a CUDA device")
@pytest.mark.parametrize("scheme", ["bnb_int8", "bnb_nf4"])
def test_from_pretrained_bitsandbytes_on_cuda(base, scheme):
    needs(scheme)
    pipe = load_flux_pipeline(ensure_tiny_flux(), quantization=scheme, load_vae=False, load_text_encoders=False)
    assert is_quantized(pipe.transformer)
    inputs = {k: v.cuda() if torch.is_tensor(v) else v for k, v in transformer_inputs().items()}
    with torch.no_grad():
        out = pipe.transformer(**inputs)[0].float().cpu()
        assert cosine(out, base(**transformer_inputs())[0]) >= 0.99


def test_grid_module_trains_lora_on_quantized_base(tmp_path):
    """The config path: model.quantization quantizes the loaded transformer; steps on one batch lower the loss."""
    needs("int8_weight_only")
    from gridgen.data.datamodule import GridDataModule

    cfg = make_cfg(tmp_path, "model.quantization=int8_weight_only", "lora.rank=4", "optim.lr=1e-2")
    module = GridModule(model=cfg.model, lora=cfg.lora, optim=cfg.optim, loss=cfg.loss, seed=0, max_steps=5)
    module.configure_model()
    assert is_quantized(module.transformer)
    dm = GridDataModule(train_shards=cfg.data.train_shards, val_shards=cfg.data.train_shards, batch_size=2)
    dm.setup("fit")
    batch = next(iter(dm.val_dataset()))
    opt = module.configure_optimizers()["optimizer"]
    losses = []
    for _ in range(4):  # global_step stays 0: the same noise and t every step
        loss = module.compute_losses(batch)["loss"]
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < losses[0], losses


def test_unknown_scheme_is_one_clear_error(base):
    with pytest.raises(QuantizationError, match="model.quantization must be null or one of int8_weight_only"):
        quantize_transformer(copy.deepcopy(base), "int3")
    with pytest.raises(QuantizationError, match="got 'fp8'"):
        load_flux_pipeline(ensure_tiny_flux(), quantization="fp8")


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the message on machines without CUDA")
@pytest.mark.parametrize("scheme", ["bnb_int8", "bnb_nf4"])
def test_bitsandbytes_loader_without_cuda_is_one_clear_error(scheme):
    needs(scheme)
    with pytest.raises(QuantizationError, match=f"model.quantization={scheme} .* needs a CUDA GPU; .*int8_weight_only"):
        load_flux_pipeline(ensure_tiny_flux(), quantization=scheme)


def test_compile_with_torchao_int8_is_one_clear_error(tmp_path, base):
    cfg = make_cfg(tmp_path, "model.quantization=int8_weight_only", "model.compile=true", "lora.rank=4")
    module = GridModule(model=cfg.model, lora=cfg.lora, optim=cfg.optim, loss=cfg.loss)
    with pytest.raises(QuantizationError, match="model.compile=true cannot train through torchao's int8 weights"):
        module.adopt_transformer(copy.deepcopy(base))
