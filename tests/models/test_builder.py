"""build_flux: a saved LoRA applied for generation or as the start of training, and model.compile (diffusers'
regional compilation of the FLUX blocks) giving eager's losses and grids with no recompiles.

The fast compile checks use the ``aot_eager`` backend (Dynamo capture + AOTAutograd, the part that decides
graphs, guards and recompiles, no code generation); the inductor check (C++ code generation on CPU, ~1-2 min on
two shared cores) is marked slow.
"""

from __future__ import annotations

import shutil

import pytest
import torch
from peft.tuners.lora import LoraLayer
from peft.utils import set_peft_model_state_dict
from torch._dynamo.utils import counters

from gridgen.models.builder import FrozenLora, TrainableLora, build_flux
from gridgen.models.lora import build_lora_config, lora_state_dict, save_lora
from gridgen.train import train
from tests.helpers.flux import tiny_pipe, transformer_output
from tests.helpers.lora import tiny_lora
from tests.helpers.probes import StepProbe
from tests.helpers.train import make_cfg


def test_build_flux_applies_a_saved_lora_as_generation_and_starts_training_from_it(tmp_path):
    source = tiny_lora(seed=4)
    save_lora(tmp_path, source)
    cfg = {"pretrained": "embedded:tiny"}
    pipe, built = build_flux(cfg, lora=FrozenLora(tmp_path, 0.5), load_encoders=False)
    assert pipe.vae is None and built.lora["scale"] == 0.5 and built.lora["rank"] == 4 and built.num_trainable == 0
    by_hand = tiny_pipe().transformer
    by_hand.add_adapter(build_lora_config(4, 4, 0.0, "gaussian", ["attn.to_q", "attn.to_k"]))
    set_peft_model_state_dict(by_hand, lora_state_dict(source))
    for module in by_hand.modules():
        if isinstance(module, LoraLayer):
            module.set_scale("default", 0.5)
    torch.testing.assert_close(transformer_output(pipe.transformer), transformer_output(by_hand.eval()), rtol=0, atol=0)

    config = build_lora_config(4, 4, 0.0, "gaussian", ["attn.to_q", "attn.to_k"])
    pipe, built = build_flux(cfg, lora=TrainableLora(config, seed=0, init=tmp_path), load_encoders=False)
    trained, saved = lora_state_dict(pipe.transformer), lora_state_dict(source)
    assert built.num_trainable == sum(v.numel() for v in saved.values()) and pipe.transformer.training
    assert trained.keys() == saved.keys() and all(torch.equal(trained[k], saved[k]) for k in saved)


COMMON = ["trainer.max_steps=3", "trainer.log_every_n_steps=1", "optim.lr=1e-2", "lora.rank=4",
          "callbacks.checkpoint.every_n_train_steps=0", "+callbacks.probe._target_=tests.helpers.probes.StepProbe"]


def run(tmp_path, *overrides) -> list[dict]:
    StepProbe.steps = []
    train(make_cfg(tmp_path, *COMMON, *overrides))
    return list(StepProbe.steps)


def check_compiled_run(tmp_path, overrides: list[str], tolerance: float) -> None:
    torch._dynamo.reset()
    counters.clear()
    model_overrides = [o for o in overrides if not o.startswith("model.compile_options")]
    eager = run(tmp_path / "eager", *model_overrides)
    compiled = run(tmp_path / "compiled", "model.compile=true", *overrides)
    assert len(eager) == len(compiled) == 3
    assert all(s["compiled"] for s in compiled) and not any(s["compiled"] for s in eager)
    # one graph per block class (double, single), forward and backward: nothing new after the first step
    first = compiled[0]["graphs"]
    assert first >= 2 and [s["graphs"] for s in compiled] == [first] * 3, compiled
    for a, b in zip(eager, compiled, strict=True):
        assert b["loss"] == pytest.approx(a["loss"], rel=tolerance), (eager, compiled)


@pytest.mark.slow  # torch.compile on the CPU (~15 s each); compiled generation = eager stays in CI
@pytest.mark.parametrize("checkpointing", [False, True])  # flux_dev trains with gradient checkpointing
def test_regional_compile_same_loss_no_recompiles(tmp_path, checkpointing):
    # stated tolerance: 1e-5 relative (aot_eager runs the same ATen ops as eager)
    check_compiled_run(tmp_path, ["model.compile_options={backend:aot_eager}",
                                  f"model.gradient_checkpointing={str(checkpointing).lower()}"], tolerance=1e-5)


@pytest.mark.slow
@pytest.mark.skipif(shutil.which("g++") is None and shutil.which("c++") is None,
                    reason="inductor on CPU needs a C++ compiler (g++)")
def test_regional_compile_inductor_same_loss_no_recompiles(tmp_path):
    # stated tolerance: 1e-4 relative (inductor fuses and reorders float reductions)
    check_compiled_run(tmp_path, [], tolerance=1e-4)


@pytest.mark.slow  # ~40 s each on 2 cores; CI keeps the plain compiled run
@pytest.mark.parametrize("scheme", ["bnb_int8", "bnb_nf4"])
def test_regional_compile_on_a_bitsandbytes_base(tmp_path, scheme):
    """Compiled blocks around bitsandbytes layers + LoRA (the in-memory path of adopt_transformer): the eager
    quantized losses, and no recompiles once warm. LLM.int8 layers move their int8 weight into their matmul
    state at their first forward, which costs one recompile at the second step; NF4 compiles once."""
    pytest.importorskip("bitsandbytes", reason="needs bitsandbytes (pip install -e '.[quant]')")
    from gridgen.embedded import ensure_tiny_flux
    from gridgen.models.loading import load_flux_pipeline
    from gridgen.training.module import GridModule
    from tests.helpers.flux import transformer_inputs

    torch._dynamo.reset()
    counters.clear()
    losses, graphs = {}, []
    for compiled in (False, True):
        cfg = make_cfg(tmp_path, f"model.quantization={scheme}", f"model.compile={str(compiled).lower()}",
                       "model.compile_options={backend:aot_eager}", "lora.rank=4", "lora.init=gaussian")
        module = GridModule(model=cfg.model, lora=cfg.lora, optim=cfg.optim, loss=cfg.loss)
        module.adopt_transformer(load_flux_pipeline(ensure_tiny_flux(), load_vae=False,
                                                    load_text_encoders=False).transformer)
        opt = module.configure_optimizers()["optimizer"]
        target = torch.randn(2, 64, 64, generator=torch.Generator().manual_seed(1))
        losses[compiled] = []
        for _ in range(3):
            loss = torch.nn.functional.mse_loss(module.transformer(**transformer_inputs())[0], target)
            opt.zero_grad()
            loss.backward()
            opt.step()
            losses[compiled].append(loss.item())
            if compiled:
                graphs.append(counters["stats"]["unique_graphs"])
    warm = 1 if scheme == "bnb_int8" else 0
    assert graphs[0] >= 2 and graphs[warm:] == [graphs[warm]] * (3 - warm), graphs
    assert losses[True] == pytest.approx(losses[False], rel=1e-5)
    assert losses[True][-1] < losses[True][0]


def test_compiled_generation_equals_eager(tmp_path):
    """make generate model.compile=true: the sampler runs the regionally compiled blocks and draws the same grid."""
    import numpy as np
    from PIL import Image

    from gridgen.generate import generate
    from tests.helpers.generate import gen_cfg

    grids = {}
    for compiled in (False, True):
        out = tmp_path / str(compiled)
        manifest = generate(gen_cfg(out, "prompt=a red circle", "generate.steps=2", f"model.compile={compiled}",
                                    "model.compile_options={backend:aot_eager}", f"generate.out={out}"))
        assert manifest["model"]["compile"] is compiled
        grids[compiled] = np.asarray(Image.open(out / manifest["samples"][0]["files"]["grid"]), dtype=np.int16)
    assert np.abs(grids[True] - grids[False]).max() <= 1  # uint8 rounding of float32 differences at most
