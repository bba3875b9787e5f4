"""The miniature's build (gridgen.mini.build): where a build goes; the grid LoRA preset it is built for."""

from __future__ import annotations

import json

import torch
from omegaconf import OmegaConf

from gridgen.embedded.mini_model import BUILD_VERSION
from gridgen.files import config_hash
from gridgen.losses import sample_timesteps
from gridgen.mini.build import base_eval_folder, base_overrides, build_folder
from gridgen.mini.steps import compose, guider_overrides


def test_the_default_build_has_the_presets_folder_and_any_other_its_own(hydra_conf, tmp_path):
    default = compose("mini", [f"paths.cache_dir={tmp_path}"])
    assert build_folder(default, default.build) == tmp_path / "mini-v8"  # what experiment=mini / data=mini read
    preset = compose("train", ["experiment=mini", f"paths.cache_dir={tmp_path}", "paths.output_dir=x"])
    assert OmegaConf.select(preset, "data.train_shards") == str(tmp_path / "mini-v8" / "data" / "clips")
    other = compose("mini", [f"paths.cache_dir={tmp_path}", "build.vae.steps=10"])
    folder = build_folder(other, default.build)
    assert folder.parent == tmp_path and folder.name.startswith("mini-v8-") and folder != build_folder(
        compose("mini", [f"paths.cache_dir={tmp_path}", "build.vae.steps=11"]), default.build)


# The base model's training as the build composes it (experiment=mini_base and every default under it), per build
# version. A cached build is reused by its folder name alone, so a changed recipe must come with a new BUILD_VERSION.
BASE_RECIPES = {7: "fee09133fe4a2630", 8: "fee09133fe4a2630"}  # 7 -> 8: the VAE (build.vae.steps 600 -> 1200), not the base


def test_a_changed_base_recipe_comes_with_a_new_build_version(hydra_conf, tmp_path):
    """Fails when the base's composed training config changes while BUILD_VERSION stays: a `make mini` would reuse a
    base built with the old recipe as if it were the new one (build 6 -> 7 changed max_steps 3000 -> 6000)."""
    cfg = compose("train", [*base_overrides(tmp_path / "build"), "seed=0", f"paths.cache_dir={tmp_path}",
                            f"paths.output_dir={tmp_path / 'run'}"])
    recipe = OmegaConf.to_container(cfg, resolve=True)
    del recipe["paths"]  # the machine's folders; the build's own ones are replaced below
    digest = config_hash(json.loads(json.dumps(recipe).replace(str(tmp_path), "<tmp>")))[:16]
    assert BASE_RECIPES.get(BUILD_VERSION) == digest, (
        f"the mini base's training recipe changed ({digest}): bump BUILD_VERSION in gridgen/embedded/mini_model.py "
        f"and set BASE_RECIPES[{BUILD_VERSION + 1}] = {digest!r} here")


def test_the_base_evaluation_is_cached_per_sampling_settings(hydra_conf):
    """The build's base evaluation samples with eval.steps, eval.true_cfg_scale and eval.guider: other values get
    their own folder (a cached one is never read for settings it was not made with); other eval keys do not matter.
    eval.guider reaches every sampling as the generate.guider it names."""
    default = compose("mini", [])
    assert base_eval_folder(default, default.eval) == "base_eval" and guider_overrides(default.eval) == []
    assert base_eval_folder(compose("mini", ["eval.batch_size=4"]), default.eval) == "base_eval"
    interval = "eval.guider={name:ClassifierFreeGuidance,stop:0.5}"
    names = {base_eval_folder(compose("mini", [o]), default.eval)
             for o in ("eval.steps=8", "eval.true_cfg_scale=1", interval)}
    assert len(names) == 3 and all(n.startswith("base_eval-") for n in names)
    generate_cfg = compose("generate", guider_overrides(compose("mini", [interval]).eval))
    assert OmegaConf.to_container(generate_cfg.generate.guider) == {"name": "ClassifierFreeGuidance", "stop": 0.5}


def test_the_grid_lora_preset_trains_mostly_at_high_noise(hydra_conf, tmp_path):
    """experiment=mini draws t from FLUX's time shift 12 (timestep_shift_v6.md: with logit_normal the LoRAs scatter
    the shapes over the grid): three quarters of the training steps at t > 0.8, where the grid's layout is decided."""
    preset = compose("train", ["experiment=mini", f"paths.cache_dir={tmp_path}", "paths.output_dir=x"])
    t = sample_timesteps(20000, preset.loss.timestep_sampling, shift=float(preset.loss.timestep_shift),
                         logit_mean=preset.loss.logit_mean, logit_std=preset.loss.logit_std,
                         generator=torch.Generator().manual_seed(0))
    assert abs(float((t > 0.8).float().mean()) - 0.75) < 0.02
