"""Optimisers of the LoRA (optim.name): 8-bit AdamW tracks fp32 AdamW with a 4x smaller state; schedules."""

import math

import pytest
import torch

from gridgen.training.optim import build_optimizer, build_scheduler, lr_factor

pytest.importorskip("bitsandbytes", reason="8-bit AdamW needs bitsandbytes (pip install -e '.[quant]')")

CFG = {"lr": 1e-2, "betas": (0.9, 0.999), "weight_decay": 1e-4, "eps": 1e-8}


def regression_run(name: str, steps: int = 20) -> tuple[list[float], torch.Tensor, torch.optim.Optimizer]:
    """Least squares with a (64, 128) weight: 8192 elements, above bitsandbytes' 4096-element 8-bit threshold."""
    gen = torch.Generator().manual_seed(0)
    x, true_w = torch.randn(256, 128, generator=gen), 0.1 * torch.randn(64, 128, generator=gen)
    y = x @ true_w.T
    layer = torch.nn.Linear(128, 64)
    with torch.no_grad():
        layer.weight.copy_(0.05 * torch.randn(64, 128, generator=gen))
        layer.bias.zero_()
    opt = build_optimizer(layer.parameters(), {**CFG, "name": name})
    losses = []
    for _ in range(steps):
        loss = torch.nn.functional.mse_loss(layer(x), y)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    return losses, layer.weight.detach().clone(), opt


def state_bytes(opt: torch.optim.Optimizer) -> int:
    return sum(v.numel() * v.element_size() for s in opt.state.values() for v in s.values() if torch.is_tensor(v))


def test_adamw8bit_tracks_fp32_adamw_with_a_smaller_state():
    ref_losses, ref_w, ref_opt = regression_run("adamw")
    losses, w, opt = regression_run("adamw8bit")
    assert type(opt).__name__ == "AdamW8bit" and isinstance(ref_opt, torch.optim.AdamW)
    assert losses[-1] < 0.2 * losses[0]  # it trains
    # stated tolerance: every step's loss within 5 % of fp32 AdamW's, final weights within 5 % of their scale
    for a, b in zip(ref_losses, losses, strict=True):
        assert abs(a - b) <= 0.05 * a
    assert (w - ref_w).abs().max() <= 0.05 * ref_w.abs().max()
    assert (w - ref_w).abs().max() > 0  # really another optimiser, not fp32 AdamW under a new name
    # moments in uint8 (plus small per-block scales and the 256-entry code tables) vs two fp32 buffers
    weight_state = opt.state[opt.param_groups[0]["params"][0]]
    assert weight_state["state1"].dtype == torch.uint8 and weight_state["state2"].dtype == torch.uint8
    assert state_bytes(opt) < 0.4 * state_bytes(ref_opt)


def test_adamw8bit_state_survives_a_checkpoint_round_trip(tmp_path):
    """Lightning saves optimiser state with torch.save and resumes with weights_only loads: tensors only."""
    _, _, opt = regression_run("adamw8bit", steps=3)
    torch.save(opt.state_dict(), tmp_path / "opt.pt")
    state = torch.load(tmp_path / "opt.pt", weights_only=True)
    fresh = build_optimizer(torch.nn.Linear(128, 64).parameters(), {**CFG, "name": "adamw8bit"})
    fresh.load_state_dict(state)
    restored, saved = (o.state[o.param_groups[0]["params"][0]] for o in (fresh, opt))
    assert restored["state1"].dtype == torch.uint8
    for key in ("state1", "state2", "absmax1", "absmax2"):
        torch.testing.assert_close(restored[key], saved[key], rtol=0, atol=0)


def test_unknown_optimizer_is_one_clear_error():
    with pytest.raises(ValueError, match="optim.name must be one of adamw, adamw8bit, got 'sgd'"):
        build_optimizer([torch.nn.Parameter(torch.zeros(2))], {**CFG, "name": "sgd"})


def test_schedule_matches_a_plain_formula():
    opt = build_optimizer([torch.nn.Parameter(torch.zeros(2))], {**CFG, "name": "adamw"})
    sched = build_scheduler(opt, {"scheduler": "cosine", "warmup_steps": 3, "min_lr_ratio": 0.1}, max_steps=13)
    for step in range(13):
        if step < 3:
            expected = (step + 1) / 3
        else:
            expected = 0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * (step - 3) / 10))
        assert opt.param_groups[0]["lr"] == pytest.approx(1e-2 * expected), step
        assert lr_factor(step, "cosine", 3, 13, 0.1) == pytest.approx(expected)
        opt.step()
        sched.step()
    with pytest.raises(ValueError, match="needs trainer.max_steps > 0"):
        build_scheduler(opt, {"scheduler": "cosine"}, max_steps=None)
    with pytest.raises(ValueError, match="optim.scheduler must be constant or cosine, got 'step'"):
        build_scheduler(opt, {"scheduler": "step"}, max_steps=10)


def test_config_selects_the_8bit_optimizer_for_the_lora(tmp_path):
    from gridgen.training.module import GridModule
    from tests.helpers.train import make_cfg

    cfg = make_cfg(tmp_path, "optim.name=adamw8bit", "lora.rank=4")
    assert make_cfg(tmp_path).optim.name == "adamw"  # the default stays torch's AdamW
    module = GridModule(model=cfg.model, lora=cfg.lora, optim=cfg.optim, loss=cfg.loss, max_steps=4)
    module.configure_model()
    conf = module.configure_optimizers()
    opt = conf["optimizer"]
    assert type(opt).__module__.startswith("bitsandbytes") and type(opt).__name__ == "AdamW8bit"
    assert [p for g in opt.param_groups for p in g["params"]] == module.trainable_parameters()
    assert conf["lr_scheduler"]["interval"] == "step"
