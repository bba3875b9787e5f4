"""GridModule pieces without a Trainer: conditioning seam, gradient checkpointing, LR schedule."""

import pytest
import torch

from gridgen.data.datamodule import GridDataModule
from gridgen.models.flux import encode_images, encode_prompts
from gridgen.training.module import GridModule
from tests.helpers.train import make_cfg


def build(tmp_path, *overrides):
    cfg = make_cfg(tmp_path, "lora.rank=4", *overrides)
    module = GridModule(model=cfg.model, lora=cfg.lora, optim=cfg.optim, loss=cfg.loss, seed=0,
                        max_steps=cfg.trainer.max_steps)
    module.configure_model()
    return module, cfg


@pytest.fixture(scope="module")
def batch(tmp_path_factory):
    cfg = make_cfg(tmp_path_factory.mktemp("b"), "data.batch_size=2")
    dm = GridDataModule(train_shards=cfg.data.train_shards, val_shards=cfg.data.train_shards, batch_size=2)
    dm.setup("fit")
    return next(iter(dm.val_dataset()))


def lora_grads(module, batch):
    module.zero_grad(set_to_none=True)
    out = module.compute_losses(batch)
    out["loss"].backward()
    return out, {n: p.grad.clone() for n, p in module.named_parameters() if p.requires_grad}


def test_cached_conditioning_equals_encoders(tmp_path, batch):
    """A batch that carries latents and text embeddings (the cache seam) trains exactly like raw images."""
    module, cfg = build(tmp_path)
    module.alpha = 0.5
    raw = module.compute_losses(batch)
    embeds, pooled, _ = encode_prompts(module.pipe, batch["caption"], cfg.model.max_sequence_length)
    cached = {"latents": encode_images(module.pipe.vae, batch["pixel_values"]), "prompt_embeds": embeds,
              "pooled_prompt_embeds": pooled, "layout": batch["layout"], "__key__": batch["__key__"],
              "caption": batch["caption"]}
    out = module.compute_losses(cached)
    for key in ("loss", "loss_base", "loss_flow"):
        torch.testing.assert_close(out[key], raw[key])
    assert raw["loss_flow"].item() > 0
    assert raw["loss"].item() == pytest.approx((raw["loss_base"] + 0.5 * raw["loss_flow"]).item())


def test_gradient_checkpointing_same_gradients(tmp_path, batch):
    plain, _ = build(tmp_path)
    ckpt, _ = build(tmp_path, "model.gradient_checkpointing=true")
    assert ckpt.transformer.gradient_checkpointing and not plain.transformer.gradient_checkpointing
    out_a, grads_a = lora_grads(plain, batch)
    out_b, grads_b = lora_grads(ckpt, batch)
    torch.testing.assert_close(out_a["loss"], out_b["loss"])
    assert grads_a.keys() == grads_b.keys() and any(g.abs().max() > 0 for g in grads_a.values())
    for name in grads_a:
        torch.testing.assert_close(grads_a[name], grads_b[name], rtol=1e-4, atol=1e-7)


def test_warmup_cosine_schedule(tmp_path):
    module, _ = build(tmp_path, "optim.scheduler=cosine", "optim.warmup_steps=2", "optim.min_lr_ratio=0.1",
                      "trainer.max_steps=12", "optim.lr=1e-3")
    conf = module.configure_optimizers()
    opt, sched = conf["optimizer"], conf["lr_scheduler"]["scheduler"]
    lrs = []
    for _ in range(12):
        lrs.append(opt.param_groups[0]["lr"])
        opt.step()
        sched.step()
    assert lrs[0] == pytest.approx(5e-4) and lrs[1] == pytest.approx(1e-3)  # linear warmup over 2 steps
    assert lrs[2] == pytest.approx(1e-3) and lrs[7] == pytest.approx(1e-4 + 0.9e-3 * 0.5)  # halfway down
    assert all(a >= b for a, b in zip(lrs[2:-1], lrs[3:], strict=True)) and lrs[-1] > 1e-4
    assert sum(p.numel() for g in opt.param_groups for p in g["params"]) == module.num_trainable


def test_validation_loss_fixed_noise_and_t(tmp_path, batch):
    """Held-out losses use fixed t and noise: the same at any step, and they move with the model."""
    module, _ = build(tmp_path)
    first = module.compute_losses(batch, fixed_t=0.5)
    again = module.compute_losses(batch, fixed_t=0.5)
    torch.testing.assert_close(first["loss_base"], again["loss_base"])
    other_t = module.compute_losses(batch, fixed_t=0.9)
    assert not torch.allclose(first["loss_base"], other_t["loss_base"])
    # training draws depend on the step; validation draws do not
    train_a = module.compute_losses(batch)["loss_base"]
    with torch.no_grad():
        for name, p in module.named_parameters():
            if "lora_B" in name:
                p.add_(0.05)  # B starts at zero: move the adapter
    moved = module.compute_losses(batch, fixed_t=0.5)
    assert not torch.allclose(first["loss_base"], moved["loss_base"])
    assert torch.isfinite(train_a)


def test_training_with_validation_logs_val_losses(tmp_path):
    from gridgen.train import train

    cfg = make_cfg(tmp_path, "trainer.max_steps=2", "lora.rank=4", "data.val_shards=${data.train_shards}",
                   "trainer.val_check_interval=2",
                   "trainer.limit_val_batches=1")
    metrics = train(cfg)
    for key in ("val/loss_base", "val/loss_flow", "val/loss_base_t0.25", "val/loss_flow_t0.75"):
        assert key in metrics and metrics[key] > 0
    samples = tmp_path / "run" / "samples" / "step000002"  # fixed-seed sample grids of the t2v prompts
    assert len(list(samples.glob("*_grid.png"))) == len(cfg.task.sample_prompts)
    assert len(list((samples / "00" / "frames").glob("*.png"))) == 16 and (samples / "00" / "frames.mp4").is_file()
