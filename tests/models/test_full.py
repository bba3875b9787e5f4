"""Full fine-tuning of the transformer (adapter=full): what trains, checkpoints and exact resume, the transformer
export and its EMA, model.transformer for generation and training, a pipeline folder around it, FSDP2, and the
refusals. The tiny embedded FLUX, a few steps.

Run as a script, this file is the FSDP2 worker of ``test_fsdp2_two_processes_match_one_process`` (Lightning starts
the second rank by running it again):
    python tests/models/test_full.py <devices> <per-process batch size> <out folder>
"""

from __future__ import annotations

import csv
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from diffusers import FluxPipeline, FluxTransformer2DModel
from hydra import compose, initialize_config_dir
from safetensors.torch import load_file, save_file

from gridgen.config import CONF_DIR, USER_ERRORS, exit_on_user_error, register_resolvers
from gridgen.embedded import TINY_FLUX_CONFIG, ensure_tiny_flux
from gridgen.files import default_file_mode

DECAY = 0.5
STEPS = 6
# 6 samples per epoch, batch 2: 3 batches per epoch; step 4's checkpoint is one batch into epoch 1
COMMON = ["adapter=full", f"trainer.max_steps={STEPS}", "optim.lr=1e-3", "data.samples_per_epoch=6",
          "callbacks.checkpoint.every_n_train_steps=1", "optim.scheduler=cosine", f"callbacks.ema.decay={DECAY}",
          "trainer.log_every_n_steps=1", f"trainer.val_check_interval={STEPS}", "trainer.limit_val_batches=1",
          "callbacks.samples.steps=2"]


def make_cfg(tmp: Path, *overrides: str):
    """The real configs composed as a command line would, with the run folder in ``tmp``."""
    register_resolvers()
    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        return compose("train", overrides=[f"paths.root_dir={tmp}", f"paths.output_dir={tmp}/run",
                                           "logger=csv", "trainer.enable_progress_bar=false", *overrides])


def base_transformer() -> FluxTransformer2DModel:
    return FluxTransformer2DModel.from_pretrained(ensure_tiny_flux(), subfolder="transformer")


def checkpoint(path: Path) -> dict:
    return torch.load(path, map_location="cpu", weights_only=True)  # tensors and plain values only


def transformer_of(ckpt: dict) -> dict[str, torch.Tensor]:
    return {k.removeprefix("transformer."): v for k, v in ckpt["state_dict"].items()}


def losses(run: Path) -> dict[int, float]:
    with (run / "metrics" / "metrics.csv").open(newline="") as file:
        return {int(r["step"]): float(r["train/loss"]) for r in csv.DictReader(file) if r.get("train/loss")}


@pytest.fixture(scope="module")
def full_run(tmp_path_factory):
    from gridgen.train import train

    tmp = tmp_path_factory.mktemp("full")
    cfg = make_cfg(tmp, *COMMON)
    metrics = train(cfg)
    return tmp / "run", cfg, metrics


# ---- what trains ------------------------------------------------------------------------------------------
def test_every_transformer_parameter_trains_and_nothing_else(tmp_path, full_run):
    from gridgen.training.module import GridModule

    run, cfg, _ = full_run
    base = base_transformer()
    total = sum(p.numel() for p in base.parameters())
    module = GridModule(model=cfg.model, lora=cfg.lora, optim=cfg.optim, loss=cfg.loss, seed=0)
    module.configure_model()
    trainable = {n for n, p in module.named_parameters() if p.requires_grad}
    assert trainable == {f"transformer.{n}" for n, _ in base.named_parameters()}  # no LoRA, nothing left out
    assert module.num_trainable == total == sum(p.numel() for p in module.trainable_parameters())
    assert all(p.dtype == torch.float32 for p in module.trainable_parameters())
    for part in (module.pipe.vae, module.pipe.text_encoder, module.pipe.text_encoder_2):
        assert not any(p.requires_grad for p in part.parameters())
    assert json.loads((run / "summary.json").read_text())["trainable_parameters"] == total

    # lora.train_modules restricts it: the double blocks and the output projection only
    restricted = make_cfg(tmp_path, "adapter=full", "lora.train_modules=[transformer_blocks.*,proj_out]")
    module = GridModule(model=restricted.model, lora=restricted.lora, optim=restricted.optim, loss=restricted.loss)
    module.configure_model()
    want = {n for n, _ in base.named_parameters() if n.startswith(("transformer_blocks.", "proj_out."))}
    assert {n.removeprefix("transformer.") for n, p in module.named_parameters() if p.requires_grad} == want
    assert module.num_trainable == sum(p.numel() for n, p in base.named_parameters() if n in want) < total


def test_one_step_changes_every_trainable_tensor_and_no_frozen_one(full_run):
    from gridgen.data.datamodule import GridDataModule
    from gridgen.training.module import GridModule

    _, cfg, _ = full_run
    module = GridModule(model=cfg.model, lora=cfg.lora, optim=cfg.optim, loss=cfg.loss, seed=0, max_steps=STEPS)
    module.configure_model()
    frozen = {f"{name}.{k}": v.clone() for name in ("vae", "text_encoder", "text_encoder_2")
              for k, v in getattr(module.pipe, name).state_dict().items()}
    before = {n: p.detach().clone() for n, p in module.named_parameters()}
    data = GridDataModule(train_shards=cfg.data.train_shards, val_shards=cfg.data.train_shards, batch_size=2)
    data.setup("fit")
    optimizer = module.configure_optimizers()["optimizer"]
    module.compute_losses(next(iter(data.val_dataset())))["loss"].backward()
    assert all(p.grad is not None for p in module.parameters())  # every weight takes part in the loss
    optimizer.step()
    unchanged = [n for n, p in module.named_parameters() if torch.equal(p, before[n])]
    assert not unchanged, unchanged[:5]
    after = {f"{name}.{k}": v for name in ("vae", "text_encoder", "text_encoder_2")
             for k, v in getattr(module.pipe, name).state_dict().items()}
    assert after.keys() == frozen.keys() and all(torch.equal(after[k], frozen[k]) for k in frozen)


def test_flops_of_a_full_step_match_torch_flop_counter():
    """The full fine-tuning formula (weight gradients of every linear, input gradients above the embedders)
    against torch's FlopCounterMode on a real forward + backward (math SDPA: attention as counted matmuls)."""
    from torch.nn.attention import SDPBackend, sdpa_kernel
    from torch.utils.flop_counter import FlopCounterMode

    from gridgen.layout import GridLayout
    from gridgen.training.flops import training_flops_per_batch

    for checkpointing in (False, True):
        torch.manual_seed(0)
        transformer = FluxTransformer2DModel(**TINY_FLUX_CONFIG).train()
        if checkpointing:
            transformer.enable_gradient_checkpointing()
        layout, text_tokens, batch, c = GridLayout(2, 2, 32, 32), 8, 2, transformer.config
        gen = torch.Generator().manual_seed(0)
        inputs = dict(hidden_states=torch.randn(batch, layout.num_tokens, c.in_channels, generator=gen),
                      encoder_hidden_states=torch.randn(batch, text_tokens, c.joint_attention_dim, generator=gen),
                      pooled_projections=torch.randn(batch, c.pooled_projection_dim, generator=gen),
                      timestep=torch.rand(batch, generator=gen), guidance=torch.full((batch,), 3.5),
                      img_ids=layout.image_ids(torch.device("cpu"), torch.float32), txt_ids=torch.zeros(text_tokens, 3))
        with FlopCounterMode(display=False) as counter, sdpa_kernel(SDPBackend.MATH):
            transformer(**inputs, return_dict=False)[0].square().mean().backward()
        full = training_flops_per_batch(transformer, batch, layout.num_tokens, text_tokens,
                                        gradient_checkpointing=checkpointing, full=True)
        assert full == counter.get_total_flops()
        # more than a LoRA step's frozen-base cost: every weight gradient is counted
        assert full > training_flops_per_batch(transformer, batch, layout.num_tokens, text_tokens, lora_params=0,
                                               gradient_checkpointing=checkpointing)


# ---- checkpoints and exact resume --------------------------------------------------------------------------
def test_checkpoint_holds_the_transformer_and_its_optimizer_state(full_run):
    run, _, _ = full_run
    ckpt = checkpoint(run / "checkpoints" / "last.ckpt")
    base = base_transformer().state_dict()
    state = transformer_of(ckpt)
    assert state.keys() == base.keys() and all(state[k].shape == base[k].shape for k in base)  # nothing else
    assert all(v.dtype == torch.float32 for v in state.values())
    assert len(ckpt["optimizer_states"][0]["state"]) == len(base)
    assert ckpt["hyper_parameters"]["lora"]["mode"] == "full" and ckpt["global_step"] == STEPS


def test_resume_mid_epoch_ends_with_the_uninterrupted_transformer(tmp_path, full_run):
    """From step 4 (one batch into epoch 1) a resumed run logs the same losses at steps 4 and 5 and ends with the
    same transformer and EMA as the uninterrupted one."""
    from gridgen.train import train

    run, _, _ = full_run
    train(make_cfg(tmp_path, *COMMON, f"ckpt_path={run / 'checkpoints' / 'step000004.ckpt'}"))
    resumed, straight = tmp_path / "run", run
    assert checkpoint(resumed / "checkpoints" / "last.ckpt")["global_step"] == STEPS
    straight_losses, resumed_losses = losses(straight), losses(resumed)
    assert {4, 5} <= straight_losses.keys() and {4, 5} <= resumed_losses.keys()
    assert [resumed_losses[s] for s in (4, 5)] == [straight_losses[s] for s in (4, 5)]
    for folder in ("transformer", "transformer_ema"):
        a = load_file(straight / folder / "diffusion_pytorch_model.safetensors")
        b = load_file(resumed / folder / "diffusion_pytorch_model.safetensors")
        assert a.keys() == b.keys()
        for key in a:
            torch.testing.assert_close(b[key], a[key], rtol=0, atol=0, msg=f"{folder}: {key}")


# ---- export --------------------------------------------------------------------------------------------------
def test_export_reloads_in_diffusers_with_the_trained_weights(full_run):
    run, _, _ = full_run
    export = run / "transformer"
    assert sorted(p.name for p in export.iterdir()) == ["config.json", "diffusion_pytorch_model.safetensors"]
    assert all(p.stat().st_mode & 0o777 == default_file_mode() for p in export.iterdir())
    assert not list(run.glob(".transformer*"))  # the temporary folder is gone
    loaded = FluxTransformer2DModel.from_pretrained(export, use_safetensors=True).state_dict()
    final = transformer_of(checkpoint(run / "checkpoints" / "last.ckpt"))
    base = base_transformer().state_dict()
    assert loaded.keys() == final.keys()
    for key in final:
        assert torch.equal(loaded[key], final[key]), key
    assert all(not torch.equal(final[k], base[k]) for k in base)  # it trained


def test_ema_export_equals_a_plain_reference_loop(full_run):
    """e_0 = w_0 (the base transformer), e_k = d e_(k-1) + (1 - d) w_k with w_k from each step's checkpoint."""
    run, _, _ = full_run
    reference = {k: v.float() for k, v in base_transformer().state_dict().items()}
    for step in range(1, STEPS + 1):
        w = transformer_of(checkpoint(run / "checkpoints" / f"step{step:06d}.ckpt"))
        reference = {k: DECAY * reference[k] + (1 - DECAY) * w[k] for k in reference}
    ema = FluxTransformer2DModel.from_pretrained(run / "transformer_ema", use_safetensors=True).state_dict()
    raw = transformer_of(checkpoint(run / "checkpoints" / "last.ckpt"))
    assert ema.keys() == reference.keys()
    for key in reference:
        torch.testing.assert_close(ema[key], reference[key], rtol=1e-5, atol=1e-7, msg=key)
    assert max((ema[k] - raw[k]).abs().max() for k in raw) > 1e-5  # the average, not the raw weights
    assert all(p.stat().st_mode & 0o777 == default_file_mode() for p in (run / "transformer_ema").iterdir())


def test_a_non_finite_transformer_is_never_written(tmp_path):
    from gridgen.models.full import save_transformer
    from gridgen.models.lora import NonFiniteLoraError

    base = base_transformer()
    state = {k: v.clone() for k, v in base.state_dict().items()}
    save_transformer(tmp_path / "export", base.config, state)
    before = {p.name: p.read_bytes() for p in (tmp_path / "export").iterdir()}
    state["proj_out.weight"][0, 0] = float("nan")
    with pytest.raises(NonFiniteLoraError, match=r"transformer tensor 'proj_out.weight' has 1 non-finite"):
        save_transformer(tmp_path / "export", base.config, state)
    assert {p.name: p.read_bytes() for p in (tmp_path / "export").iterdir()} == before  # the old export, intact
    assert sorted(p.name for p in tmp_path.iterdir()) == ["export"]


# ---- model.transformer: generation, training, a pipeline folder ------------------------------------------------
def gen_cfg(tmp: Path, *overrides: str):
    register_resolvers()
    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        return compose("generate", overrides=[f"paths.root_dir={tmp}", f"paths.output_dir={tmp}/run",
                                              f"generate.out={tmp}/out", "generate.progress=false", *overrides])


def test_generate_with_model_transformer_equals_flux_pipeline_with_it(tmp_path, full_run):
    from gridgen.generate import generate

    run, _, _ = full_run
    prompt, seed, steps = "a red circle moves from left to right", 3, 4
    args = [f"prompt='{prompt}'", f"seed={seed}", f"generate.steps={steps}", "export.latents=true", "export.mp4=false",
            "export.gif=false", "export.frames=false"]
    manifest = generate(gen_cfg(tmp_path, *args, f"model.transformer={run / 'transformer'}"))
    assert manifest["model"]["transformer"] == str(run / "transformer")
    sample = manifest["samples"][0]
    ours = load_file(tmp_path / "out" / sample["files"]["latents"])["latents"][None]

    transformer = FluxTransformer2DModel.from_pretrained(run / "transformer", use_safetensors=True)
    pipe = FluxPipeline.from_pretrained(ensure_tiny_flux(), transformer=transformer)
    pipe.set_progress_bar_config(disable=True)
    theirs = pipe(sample["caption"], height=128, width=128, num_inference_steps=steps, guidance_scale=3.5,
                  generator=torch.Generator().manual_seed(seed), max_sequence_length=32, output_type="latent").images
    torch.testing.assert_close(ours, theirs, rtol=0, atol=1e-6)
    base = generate(gen_cfg(tmp_path / "base", *args))
    base_latents = load_file(tmp_path / "base" / "out" / base["samples"][0]["files"]["latents"])["latents"][None]
    assert (base_latents - ours).abs().max() > 1e-3  # the trained transformer is the one that sampled


def test_a_run_starts_from_model_transformer(tmp_path, full_run):
    """A LoRA on the fine-tuned transformer (its frozen base) and a full run continuing it (its initial weights)."""
    from gridgen.training.module import GridModule

    run, _, _ = full_run
    export = load_file(run / "transformer" / "diffusion_pytorch_model.safetensors")
    for adapter in ("lora", "full"):
        cfg = make_cfg(tmp_path, f"adapter={adapter}", f"model.transformer={run / 'transformer'}")
        module = GridModule(model=cfg.model, lora=cfg.lora, optim=cfg.optim, loss=cfg.loss, seed=0)
        module.configure_model()
        weights = {k.replace(".base_layer", ""): v for k, v in module.transformer.state_dict().items()
                   if "lora_" not in k}
        assert weights.keys() == export.keys()
        assert all(torch.equal(weights[k], export[k]) for k in export)
        assert module.mode == adapter


def test_pipeline_folder_with_the_trained_transformer(tmp_path, full_run):
    from gridgen.models.builder import build_flux
    from gridgen.models.full import save_pipeline_with_transformer

    run, _, _ = full_run
    out = save_pipeline_with_transformer("embedded:tiny", run / "transformer", tmp_path / "base")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["base"]  # written beside, renamed: nothing left over
    tiny = ensure_tiny_flux()
    for name in ("vae", "text_encoder", "text_encoder_2", "tokenizer", "tokenizer_2", "scheduler"):
        for file in (tiny / name).rglob("*"):
            if file.is_file():
                assert (out / name / file.relative_to(tiny / name)).read_bytes() == file.read_bytes(), file
    pipe, _ = build_flux({"pretrained": str(out), "dtype": "float32"})  # model.pretrained=<out>
    export = load_file(run / "transformer" / "diffusion_pytorch_model.safetensors")
    loaded = pipe.transformer.state_dict()
    assert loaded.keys() == export.keys() and all(torch.equal(loaded[k], export[k]) for k in export)
    assert pipe.text_encoder_2 is not None and pipe.vae is not None
    with pytest.raises(ValueError, match="exists; a pipeline folder is written once"):
        save_pipeline_with_transformer("embedded:tiny", run / "transformer", out)


def test_readme_python_block_writes_a_pipeline_folder(tmp_path, full_run, monkeypatch):
    """The README's ```python block of this section, as printed, with ``<full run>`` the run's folder."""
    import re

    readme = (Path(__file__).resolve().parents[2] / "README.md").read_text()
    (block,) = [b for b in re.findall(r"^```python\n(.*?)^```", readme, re.S | re.M)
                if "save_pipeline_with_transformer" in b]
    run, _, _ = full_run
    monkeypatch.chdir(tmp_path)
    exec(compile(block.replace("<full run>", str(run)), "README.md", "exec"), {})  # noqa: S102
    pipe = FluxPipeline.from_pretrained(tmp_path / "outputs" / "models" / "base")
    export = load_file(run / "transformer" / "diffusion_pytorch_model.safetensors")
    assert all(torch.equal(pipe.transformer.state_dict()[k], export[k]) for k in export)


def test_untrusted_or_unfitting_transformer_folders_are_one_line(tmp_path, full_run):
    from gridgen.models.full import save_pipeline_with_transformer
    from gridgen.models.loading import TransformerFolderError, load_flux_pipeline

    run, _, _ = full_run
    pickled = tmp_path / "pickled"
    pickled.mkdir()
    shutil.copy(run / "transformer" / "config.json", pickled)
    (pickled / "diffusion_pytorch_model.bin").write_bytes(b"not to be unpickled")
    nan = tmp_path / "nan"
    shutil.copytree(run / "transformer", nan)
    weights = load_file(nan / "diffusion_pytorch_model.safetensors")
    weights["x_embedder.weight"][0, 0] = float("inf")
    save_file(weights, nan / "diffusion_pytorch_model.safetensors", metadata={"format": "pt"})
    narrow = tmp_path / "narrow"
    FluxTransformer2DModel(**{**TINY_FLUX_CONFIG, "joint_attention_dim": 16}).save_pretrained(narrow)
    cases = [(pickled, r"has no .safetensors weights \(gridgen never unpickles"),
             (tmp_path / "missing", "is not a folder"),
             (ensure_tiny_flux(), "is a whole pipeline folder"),
             (narrow, "does not fit model.pretrained: its joint_attention_dim is 16, the T5 text encoder's d_model is 32")]
    for folder, message in cases:
        with pytest.raises(TransformerFolderError, match=message) as info:
            load_flux_pipeline(ensure_tiny_flux(), transformer=folder)
        assert "\n" not in str(info.value)
    for folder, message in [*cases[:2], (narrow, "its joint_attention_dim is 16"),
                            (nan, "transformer tensor 'x_embedder.weight' has 1 non-finite")]:
        with pytest.raises(USER_ERRORS, match=message):  # exit code 2 at an entry point
            save_pipeline_with_transformer("embedded:tiny", folder, tmp_path / "out")
        assert not (tmp_path / "out").exists() and not list(tmp_path.glob(".out*"))


# ---- refusals: one line, exit code 2, nothing written ----------------------------------------------------------
REFUSALS = [
    (["adapter=full", "lora.rank=8"], "lora.rank=8 is a LoRA setting, and adapter=full trains the transformer's own"),
    (["adapter=full", "lora.alpha=4"], "lora.alpha=4 is a LoRA setting"),
    (["adapter=full", "lora.dropout=0.1"], "lora.dropout=0.1 is a LoRA setting"),
    (["adapter=full", "lora.init=gaussian"], "lora.init=gaussian is a LoRA setting"),
    (["adapter=full", "lora.target_modules=[attn.to_q]"], r"lora.target_modules=\[attn.to_q\] is a LoRA setting"),
    (["adapter=full", "lora.export_formats=[diffusers,kohya]"], "lora.export_formats=.diffusers,kohya. is a LoRA"),
    (["adapter=full", "stage=fine"], "stage.init_lora=auto starts from a LoRA, and adapter=full trains none"),
    (["adapter=full", "model.quantization=int8_weight_only"], "model.quantization=int8_weight_only quantizes the"),
    (["adapter=full", "lora.train_modules=[]"], "must be null .every weight trains. or a non-empty list"),
    (["adapter=full", "lora.train_modules=[transformer_blockz.*]"], "'transformer_blockz.\\*' matches no parameter"),
    (["lora.train_modules=[proj_out]"], r"lora.train_modules=\[proj_out\] chooses the weights of a full fine-tuning"),
    (["adapter=full", "model.transformer=/nowhere"], "model.transformer '/nowhere' is not a folder"),
]


def refusal_line(cfg, capsys) -> str:
    from gridgen.train import train

    with pytest.raises(SystemExit) as info, exit_on_user_error("train"):
        train(cfg)
    assert info.value.code == 2
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("gridgen.train: error: "), lines
    return lines[0]


@pytest.mark.parametrize("overrides, message", REFUSALS, ids=[" ".join(o) for o, _ in REFUSALS])
def test_settings_that_cannot_act_are_refused(tmp_path, capsys, overrides, message):
    import re

    line = refusal_line(make_cfg(tmp_path, "trainer.max_steps=1", *overrides), capsys)
    assert re.search(message, line), line
    assert not (tmp_path / "run").exists()  # refused before anything was written (or removed again)


def test_resume_across_adapters_is_refused(tmp_path, capsys, full_run):
    from gridgen.train import train

    run, _, _ = full_run
    train(make_cfg(tmp_path / "lora", "trainer.max_steps=1", "lora.rank=4"))
    lora_ckpt = tmp_path / "lora" / "run" / "checkpoints" / "last.ckpt"
    line = refusal_line(make_cfg(tmp_path / "a", "adapter=full", "trainer.max_steps=4", f"ckpt_path={lora_ckpt}"),
                        capsys)
    assert "holds a LoRA and this run trains the transformer's own weights (adapter=full); resume it with " \
           "adapter=lora" in line
    line = refusal_line(make_cfg(tmp_path / "b", "trainer.max_steps=8", f"ckpt_path={run}/checkpoints/step000002.ckpt"),
                        capsys)
    assert "holds the transformer's own weights (adapter=full) and this run trains a LoRA; resume it with " \
           "adapter=full, or start a LoRA on the fine-tuned transformer with model.transformer=<run>/transformer" in line
    line = refusal_line(make_cfg(tmp_path / "c", *COMMON[:1], "trainer.max_steps=8", "lora.train_modules=[proj_out]",
                                 f"ckpt_path={run}/checkpoints/step000002.ckpt"), capsys)
    assert "lora.train_modules=null in the checkpoint, [proj_out] now); resume with lora.train_modules=null" in line
    assert not any((tmp_path / k / "run").exists() for k in "abc")


@pytest.mark.slow  # ~12 s: a process start; the in-process refusals above run the same code in CI
def test_cli_adapter_full_refuses_a_lora_setting_in_one_line(tmp_path):
    env = {**os.environ, "GRIDGEN_ROOT": str(tmp_path), "PYTHONUNBUFFERED": "1"}
    proc = subprocess.run([sys.executable, "-m", "gridgen.train", "adapter=full", "lora.rank=32"], cwd=tmp_path,
                          env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 2, proc.stderr[-3000:]
    errors = [line for line in proc.stderr.splitlines() if line.startswith("gridgen.train: error:")]
    assert errors == ["gridgen.train: error: lora.rank=32 is a LoRA setting, and adapter=full trains the transformer's "
                      "own weights (no LoRA); drop lora.rank, or use adapter=lora"], proc.stderr[-3000:]
    assert not (tmp_path / "outputs").exists() or not list((tmp_path / "outputs").rglob("*.yaml"))


# ---- FSDP2 ------------------------------------------------------------------------------------------------------
@pytest.mark.slow  # ~60 s on 2 busy cores: 2 gloo processes, then 1
def test_fsdp2_two_processes_match_one_process(tmp_path):
    """strategy=fsdp (FSDP2, gloo, 2 processes x batch 2, each holding half of every block) == 1 process x batch 4:
    the same transformer, gathered on rank 0 for the export, with gradient clipping active."""
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    for devices, batch, name in ((2, 2, "fsdp"), (1, 4, "single")):
        proc = subprocess.run([sys.executable, __file__, str(devices), str(batch), str(tmp_path / name)], env=env,
                              cwd=tmp_path, capture_output=True, text=True, timeout=300)
        assert proc.returncode == 0, proc.stderr[-3000:]
    shards = [json.loads((tmp_path / "fsdp" / f"shards-rank{r}.json").read_text()) for r in (0, 1)]
    total = sum(p.numel() for p in base_transformer().parameters())
    assert all(s["sharded"] and s["total"] == total and s["local"] < 0.6 * total for s in shards)
    assert sum(s["local"] for s in shards) == total  # each parameter held once across the two ranks
    fsdp = load_file(tmp_path / "fsdp" / "transformer" / "diffusion_pytorch_model.safetensors")
    single = load_file(tmp_path / "single" / "transformer" / "diffusion_pytorch_model.safetensors")
    base = base_transformer().state_dict()
    update = max((single[k] - base[k]).abs().max().item() for k in base)
    assert update > 1e-4 and fsdp.keys() == single.keys() == base.keys()
    for key in single:  # all-reduce sums in another order: float32 noise (measured: 1e-5 of the update)
        torch.testing.assert_close(fsdp[key], single[key], rtol=0, atol=1e-3 * update, msg=key)


@pytest.mark.slow  # ~95 s on 2 busy cores: two 2-process runs through the entry point
def test_fsdp2_checkpoint_holds_the_whole_transformer_and_resumes_exactly(tmp_path):
    common = ["adapter=full", "strategy=fsdp", "trainer.accelerator=cpu", "trainer.devices=2",
              "trainer.strategy.param_dtype=null", "optim.lr=1e-3", "callbacks.checkpoint.every_n_train_steps=2",
              "logger=csv", "trainer.enable_progress_bar=false", "trainer.max_steps=4"]
    env = {**os.environ, "GRIDGEN_ROOT": str(tmp_path), "PYTHONUNBUFFERED": "1"}

    def run_cli(*args: str) -> None:
        proc = subprocess.run([sys.executable, "-m", "gridgen.train", *common, *args], cwd=tmp_path, env=env,
                              capture_output=True, text=True, timeout=300)
        assert proc.returncode == 0, proc.stderr[-3000:]

    run_cli("hydra.run.dir=" + str(tmp_path / "straight"))
    state = transformer_of(checkpoint(tmp_path / "straight" / "checkpoints" / "step000002.ckpt"))
    base = base_transformer().state_dict()
    assert state.keys() == base.keys() and all(state[k].shape == base[k].shape for k in base)  # whole, gathered
    run_cli(f"ckpt_path={tmp_path / 'straight' / 'checkpoints' / 'step000002.ckpt'}",
            "hydra.run.dir=" + str(tmp_path / "resumed"))
    a = load_file(tmp_path / "straight" / "transformer" / "diffusion_pytorch_model.safetensors")
    b = load_file(tmp_path / "resumed" / "transformer" / "diffusion_pytorch_model.safetensors")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def _fsdp_worker(devices: int, batch_size: int, out: Path) -> None:
    """Train the full transformer 3 steps on 4 fixed grids; rank 0 exports it, every rank records its shards."""
    import lightning as L
    from hydra.utils import instantiate
    from torch.utils.data import DataLoader

    from gridgen.data.datamodule import GridDataModule, collate_grid_samples
    from gridgen.embedded import ensure_sample_shards
    from gridgen.layout import GridLayout
    from gridgen.training.callbacks import AlphaSchedule, TransformerExport
    from gridgen.training.module import GridModule

    register_resolvers()
    strategy = ["strategy=fsdp", "trainer.accelerator=cpu", f"trainer.devices={devices}",
                "trainer.strategy.param_dtype=null"] if devices > 1 else []
    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        # AdamW's eps=1e-4: float32 rounding of near-zero gradients (all-reduce order) stays rounding-sized
        cfg = compose("train", overrides=["paths.root_dir=/tmp", "paths.output_dir=/tmp", "adapter=full",
                                          "optim.lr=1e-3", "optim.eps=1e-4", "trainer.max_steps=3",
                                          "trainer.gradient_clip_val=1e-2", *strategy])
    ensure_sample_shards(cfg.data.sample_data_root)
    data = GridDataModule(train_shards=cfg.data.train_shards, val_shards=cfg.data.train_shards, batch_size=1)
    data.setup("fit")
    samples = []
    for batch in data.val_dataset():
        samples.append({"__key__": batch["__key__"][0], "caption": batch["caption"][0],
                        "layout": GridLayout(**batch["layout"]), "pixel_values": batch["pixel_values"][0]})
        if len(samples) == 4:
            break
    loader = DataLoader(samples, batch_size=batch_size, shuffle=False, collate_fn=collate_grid_samples)
    module = GridModule(model=cfg.model, lora=cfg.lora, optim=cfg.optim, loss=cfg.loss, seed=0, max_steps=3)
    trainer: L.Trainer = instantiate(cfg.trainer, logger=False, enable_checkpointing=False, enable_progress_bar=False,
                                     callbacks=[AlphaSchedule(alpha_max=0.5, ramp_steps=2),
                                                TransformerExport(str(out / "transformer"))])
    assert trainer.world_size == devices
    trainer.fit(module, train_dataloaders=loader)
    params = list(module.transformer.parameters())
    local = sum(p.to_local().numel() if hasattr(p, "to_local") else p.numel() for p in params)
    record = {"sharded": all(hasattr(p, "to_local") for p in params), "local": local,
              "total": sum(p.numel() for p in params)}
    out.mkdir(parents=True, exist_ok=True)
    (out / f"shards-rank{trainer.global_rank}.json").write_text(json.dumps(record))


if __name__ == "__main__":
    _fsdp_worker(int(sys.argv[1]), int(sys.argv[2]), Path(sys.argv[3]))
