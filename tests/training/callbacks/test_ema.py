"""EMA of the LoRA (callbacks.ema): a plain reference loop, exact resume, diffusers export, validation."""

import pytest
import torch
from diffusers import FluxPipeline
from peft.utils import get_peft_model_state_dict

from gridgen.embedded import ensure_tiny_flux
from gridgen.models.lora import read_lora_file
from gridgen.train import train
from gridgen.training.callbacks.ema import EMA_FILE, LoraEMA
from gridgen.training.module import GridModule
from tests.helpers.probes import ValidationProbe
from tests.helpers.train import make_cfg

DECAY = 0.75
COMMON = ["trainer.max_steps=4", "optim.lr=1e-2", "lora.rank=4", "callbacks.checkpoint.every_n_train_steps=1",
          f"callbacks.ema.decay={DECAY}"]


def ema_state(ckpt_path) -> dict[str, torch.Tensor]:
    ckpt = torch.load(ckpt_path, map_location="cpu", weights_only=True)  # plain tensors: safe to load
    return ckpt["callbacks"]["LoraEMA"]["ema"]


def lora_weights(ckpt_path) -> dict[str, torch.Tensor]:
    return torch.load(ckpt_path, map_location="cpu", weights_only=True)["state_dict"]


def peft_key(module_key: str) -> str:
    """``transformer.<m>.lora_A.default.weight`` (module parameter) -> ``<m>.lora_A.weight`` (LoRA file key)."""
    return module_key.removeprefix("transformer.").replace(".default.weight", ".weight")


@pytest.fixture(scope="module")
def ema_run(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("ema")
    cfg = make_cfg(tmp, *COMMON)
    train(cfg)
    return tmp / "run", cfg


def test_ema_equals_a_plain_reference_loop(ema_run):
    run, cfg = ema_run
    # w_0: the LoRA's initial weights (the same seeded init the run started from)
    module = GridModule(model=cfg.model, lora=cfg.lora, optim=cfg.optim, loss=cfg.loss, seed=cfg.seed)
    module.configure_model()
    weights = [{n: p.detach().clone() for n, p in module.named_parameters() if p.requires_grad}]
    weights += [lora_weights(run / "checkpoints" / f"step{k:06d}.ckpt") for k in range(1, 5)]  # w_1 .. w_4
    reference = dict(weights[0])
    for w in weights[1:]:
        reference = {n: DECAY * reference[n] + (1 - DECAY) * w[n] for n in reference}
    ema = ema_state(run / "checkpoints" / "last.ckpt")
    assert set(ema) == set(reference) and len(ema) > 0
    for name in reference:
        torch.testing.assert_close(ema[name], reference[name], rtol=1e-5, atol=1e-7, msg=name)
    # the average lags behind the trained weights: it is not the raw LoRA
    assert max((ema[n] - weights[-1][n]).abs().max() for n in ema) > 1e-4


def test_resume_gives_the_uninterrupted_ema(ema_run, tmp_path):
    run, _ = ema_run
    train(make_cfg(tmp_path, *COMMON, f"ckpt_path={run / 'checkpoints' / 'step000002.ckpt'}"))
    resumed = ema_state(tmp_path / "run" / "checkpoints" / "last.ckpt")
    straight = ema_state(run / "checkpoints" / "last.ckpt")
    assert set(resumed) == set(straight)
    for name in straight:
        torch.testing.assert_close(resumed[name], straight[name], rtol=0, atol=1e-6, msg=name)


def test_export_loads_in_diffusers_and_holds_the_ema(ema_run):
    run, _ = ema_run
    ema = {peft_key(k): v for k, v in ema_state(run / "checkpoints" / "last.ckpt").items()}
    state, header = read_lora_file(run / "lora" / EMA_FILE)
    assert set(state) == set(ema) and float(header["gridgen_ema_decay"]) == DECAY
    assert header["gridgen_stage"] == "coarse" and header["gridgen_rank"] == "4"  # the raw export's metadata
    raw, _ = read_lora_file(run / "lora")  # the raw LoRA is still exported, unchanged by the swap
    final = {peft_key(k): v for k, v in lora_weights(run / "checkpoints" / "last.ckpt").items()}
    for key in raw:
        torch.testing.assert_close(raw[key], final[key], rtol=0, atol=0)

    pipe = FluxPipeline.from_pretrained(ensure_tiny_flux())
    pipe.load_lora_weights(run / "lora", weight_name=EMA_FILE, adapter_name="ema")
    loaded = get_peft_model_state_dict(pipe.transformer, adapter_name="ema")
    assert set(loaded) == set(ema)
    for key in ema:
        torch.testing.assert_close(loaded[key], ema[key], rtol=0, atol=0, msg=key)


def test_validation_uses_the_ema_weights(tmp_path):
    ValidationProbe.seen = []
    cfg = make_cfg(tmp_path, "trainer.max_steps=2", "optim.lr=1e-2", "lora.rank=4", f"callbacks.ema.decay={DECAY}",
                   "trainer.limit_val_batches=1", "trainer.val_check_interval=2", "~callbacks.samples",
                   "+callbacks.probe._target_=tests.helpers.probes.ValidationProbe")
    train(cfg)
    assert len(ValidationProbe.seen) == 1
    seen = ValidationProbe.seen[0]
    for name, ema in seen["ema"].items():
        torch.testing.assert_close(seen["during"][name], ema, rtol=0, atol=0)
    # the trained weights come back afterwards, and they differ from the average
    final = lora_weights(tmp_path / "run" / "checkpoints" / "last.ckpt")
    for name, value in seen["after"].items():
        torch.testing.assert_close(value, final[name], rtol=0, atol=0)
    assert max((seen["after"][n] - seen["ema"][n]).abs().max() for n in seen["ema"]) > 1e-4


def test_decay_off_by_default_and_checked(tmp_path):
    assert make_cfg(tmp_path).callbacks.ema.decay is None  # off unless asked for
    assert not LoraEMA(decay=None).enabled and LoraEMA(decay=None).state_dict() == {}
    with pytest.raises(ValueError, match="callbacks.ema.decay must be null .off. or in .0, 1., got 1.5"):
        LoraEMA(decay=1.5)
