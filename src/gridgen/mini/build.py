"""The miniature's build: the world's shards, the VAE, the base model and the latent caches, made once and cached
under ``paths.cache_dir/mini-v8`` (a non-default build config: ``mini-v8-<hash>``), each step in a folder that
appears only when complete (a rerun reuses it, a killed one redoes only the unfinished step).

    <build>/data/        clips (4x4 grids: train, val, test), frames, scenes (1x1) shards    prepare
    <build>/vae/         AutoencoderKL + figures (held-out PSNR, shift/scale)
    <build>/init/        FluxPipeline: mini VAE, embedded text encoders, a new transformer
    <build>/cache_base/  latents of frames + scenes by init's encoders                      gridgen.cache
    <build>/base_run/    gridgen.train experiment=mini_base (adapter=full)                  gridgen.train
    <build>/base/        FluxPipeline: init + the trained transformer = `model=flux_mini`
    <build>/cache_clips/ latents of the clips' train + val grids by base's encoders         gridgen.cache
    <build>/base_eval/   the base drawing held-out prompts as single frames, scored          gridgen.evaluate
"""

from __future__ import annotations

import json
import logging
import time
from pathlib import Path
from typing import Any

import numpy as np
from omegaconf import DictConfig

from gridgen.embedded.mini_model import DEFAULT_BUILD
from gridgen.files import config_hash
from gridgen.mini.steps import (
    Progress,
    compose,
    guider_overrides,
    is_done,
    plain,
    read_done,
    step_folder,
    without_nulls,
    write_done,
)

log = logging.getLogger("gridgen.mini")

BUILD_STEPS = {"data": 0.5, "vae": 7.9, "init": 0.1, "cache_base": 0.3, "base_run": 13.4, "base": 0.1,
               "cache_clips": 0.8, "base_eval": 0.1}  # minutes of mini-v8 on 2 cores (RESULTS-13): the ETA's weights


def build_folder(cfg: DictConfig, default_build: Any) -> Path:
    """``<cache>/mini-v8`` for the default build config, ``mini-v8-<hash>`` for any other."""
    mine = {"build": plain(cfg.build), "seed": int(cfg.seed)}
    name = DEFAULT_BUILD
    if mine != {"build": plain(default_build), "seed": 0}:
        name += f"-{config_hash(mine)[:8]}"
    return Path(str(cfg.paths.cache_dir)).expanduser() / name


def base_eval_folder(cfg: DictConfig, default_eval: Any) -> str:
    """The base model's evaluation samples with ``eval.steps``, ``eval.true_cfg_scale`` and ``eval.guider``:
    ``base_eval`` for the default ones, ``base_eval-<hash>`` for others, so that a cached evaluation is never read for
    other settings."""
    keys = ("steps", "true_cfg_scale", "guider")  # nulls dropped: the folders made before eval.guider keep their names
    mine, default = (without_nulls({k: plain(c).get(k) for k in keys}) for c in (cfg.eval, default_eval))
    return "base_eval" if mine == default else f"base_eval-{config_hash(mine)[:8]}"


def run_build(cfg: DictConfig, folder: Path, progress: Progress, base_eval: str = "base_eval") -> dict[str, Any]:
    """Every build step not yet done; returns the build's figures (also ``<build>/build.json``). ``base_eval``: the
    folder of the base model's evaluation (:func:`base_eval_folder`)."""
    folder.mkdir(parents=True, exist_ok=True)
    steps = {"data": _data, "vae": _vae, "init": _init, "cache_base": _cache_base, "base_run": _base_run,
             "base": _base, "cache_clips": _cache_clips, "base_eval": _base_eval}
    folders = {name: folder / (base_eval if name == "base_eval" else name) for name in steps}
    for name in steps:
        if is_done(folders[name]):
            progress.skip(name)
    figures: dict[str, Any] = {}
    for name, step in steps.items():
        target = folders[name]
        if not is_done(target):
            progress.start(name, f"build {name} -> {target}")
            with step_folder(target) as tmp:
                started = time.perf_counter()
                record = step(cfg, folder, tmp)
                record["seconds"] = round(time.perf_counter() - started, 1)
                write_done(tmp, record)
            progress.finish()
        figures[name] = read_done(target)
    (folder / "build.json").write_text(json.dumps(figures, indent=2) + "\n")
    return figures


# ---- steps: each writes into tmp (renamed to <build>/<name> when it returns) and returns its record ----------

def _data(cfg: DictConfig, build: Path, tmp: Path) -> dict[str, Any]:
    from gridgen.embedded.mini_data import write_mini_data

    return write_mini_data(tmp, seed=int(cfg.seed), scale=float(cfg.build.data_scale))


def _vae(cfg: DictConfig, build: Path, tmp: Path) -> dict[str, Any]:
    from gridgen.embedded.mini_data import cell_size
    from gridgen.embedded.mini_vae import read_cells, reconstruct, train_vae
    from gridgen.eval.shapes import describe_kept, kept_identity
    from gridgen.runtime import tune_cpu_process

    data = build / "data"
    train = np.concatenate([read_cells(sorted((data / kind).glob("train-*.tar")), cell_size(kind))
                            for kind in ("clips", "frames")])
    held_out = read_cells(sorted((data / "clips").glob("test-*.tar")), cell_size("clips"))  # unseen combinations
    vae_cfg = cfg.build.vae
    tune_cpu_process("cpu")  # train_vae computes on the CPU
    every = max(1, int(vae_cfg.steps) // 10)

    def report(step: int, losses: dict[str, float]) -> None:
        if step % every == 0:
            log.info("vae step %d/%d  mse %.4f  kl %.3f", step, int(vae_cfg.steps), losses["mse"], losses["kl"])

    vae, figures = train_vae(train, held_out, steps=int(vae_cfg.steps), batch_size=int(vae_cfg.batch_size),
                             lr=float(vae_cfg.lr), kl_weight=float(vae_cfg.kl_weight), seed=int(cfg.seed),
                             progress=report)
    vae.save_pretrained(str(tmp), safe_serialization=True)
    # PSNR alone misses what the world needs: whether a circle still reads as a circle after the VAE
    figures["kept_identity"] = kept_identity(held_out, reconstruct(vae, held_out))
    log.info("vae: held-out PSNR %.2f dB (target >= 28) on %d frames of unseen combinations; the detector reads %s "
             "of their reconstructions as the same shape and colour", figures["psnr_db"], figures["held_out_cells"],
             describe_kept(figures["kept_identity"]))
    return figures


def _init(cfg: DictConfig, build: Path, tmp: Path) -> dict[str, Any]:
    from diffusers import AutoencoderKL

    from gridgen.embedded.mini_model import MINI_TRANSFORMER_CONFIG, build_mini_pipeline

    vae = AutoencoderKL.from_pretrained(str(build / "vae"))
    tmp.rmdir()  # build_mini_pipeline writes its own folder atomically
    build_mini_pipeline(vae, tmp, seed=int(cfg.seed))
    return {"transformer": MINI_TRANSFORMER_CONFIG}


def _cache(data: str, pretrained: Path, out: Path, extra: list[str]) -> dict[str, Any]:
    from gridgen.cache import cache

    cache_cfg = compose("cache", [f"data={data}", "model=flux_mini", f"model.pretrained={pretrained}",
                                  f"cache.out={out}", "cache.device=cpu", "cache.batch_size=32", *extra], output_dir=out)
    manifests = cache(cache_cfg)
    return {name: manifest["counts"] for name, manifest in manifests.items()}


def _cache_base(cfg: DictConfig, build: Path, tmp: Path) -> dict[str, Any]:
    data = build / "data"
    return _cache("mini_base", build / "init", tmp, [f"data.sources.frames.shards={data / 'frames'}",
                                                    f"data.sources.scenes.shards={data / 'scenes'}",
                                                    f"data.val_shards={data / 'scenes'}"])


def base_overrides(build: Path) -> list[str]:
    cache = build / "cache_base"
    return ["experiment=mini_base", f"model.pretrained={build / 'init'}", "data.cached=true",
            f"data.sources.frames.shards={cache / 'frames'}", f"data.sources.scenes.shards={cache / 'scenes'}",
            f"data.val_shards={cache / 'scenes'}"]


def _base_run(cfg: DictConfig, build: Path, tmp: Path) -> dict[str, Any]:
    from gridgen.train import train

    overrides = [*base_overrides(build), f"seed={int(cfg.seed)}", *cfg.build.base]
    metrics = train(compose("train", overrides, output_dir=tmp))
    return {"overrides": overrides, "metrics": metrics}


def _base(cfg: DictConfig, build: Path, tmp: Path) -> dict[str, Any]:
    from gridgen.models.full import save_pipeline_with_transformer

    tmp.rmdir()  # written atomically by the builder
    save_pipeline_with_transformer(build / "init", build / "base_run" / "transformer", tmp)
    return {"pretrained": str(build / "init"), "transformer": str(build / "base_run" / "transformer")}


def _cache_clips(cfg: DictConfig, build: Path, tmp: Path) -> dict[str, Any]:
    return _cache("mini", build / "base", tmp, [f"data.train_shards={build / 'data' / 'clips'}"])


def _base_eval(cfg: DictConfig, build: Path, tmp: Path) -> dict[str, Any]:
    """The base model draws the shape and colour of every held-out combination as single frames (``task=t2i``,
    ``gridgen.generate``); the world's detector reads each: right when it finds exactly one blob, of the prompted
    shape and colour (target: >= 90 % of frames)."""
    from PIL import Image

    from gridgen.embedded.mini_data import cell_size
    from gridgen.embedded.world import mini_combinations, with_article
    from gridgen.eval.shapes import detect
    from gridgen.inference.pipeline import generate

    pairs = sorted({(shape, color) for shape, color, _ in mini_combinations("test")})
    per = int(cfg.build.base_eval_frames)
    asked = [pair for pair in pairs for _ in range(per)]
    prompts = tmp / "prompts.jsonl"
    prompts.write_text("".join(json.dumps({"prompt": f"{with_article(color)} {shape}", "seed": 1000 + k}) + "\n"
                               for k, (shape, color) in enumerate(asked)))
    out = tmp / "generated"
    manifest = generate(compose("generate", [
        "model=flux_mini", f"model.pretrained={build / 'base'}", "task=t2i", f"prompts_file={prompts}",
        f"generate.out={out}", f"generate.height={cell_size('frames')}", "generate.batch_size=16", "generate.progress=false",
        "generate.device=cpu", "export.mp4=false", "export.gif=false", "export.frames=false",
        f"generate.steps={int(cfg.eval.steps)}", f"generate.true_cfg_scale={float(cfg.eval.true_cfg_scale)}",
        *guider_overrides(cfg.eval)], output_dir=out))
    right = 0
    answers = []
    for sample, (shape, color) in zip(manifest["samples"], asked, strict=True):
        blobs = detect(np.asarray(Image.open(out / sample["files"]["grid"]).convert("RGB")))
        ok = len(blobs) == 1 and (blobs[0].shape, blobs[0].color) == (shape, color)
        right += ok
        answers.append({"prompt": sample["prompt"], "found": [(b.shape, b.color) for b in blobs], "right": ok})
    (tmp / "answers.json").write_text(json.dumps(answers, indent=2) + "\n")
    log.info("base model: shape and colour right in %d of %d frames for held-out prompts (target >= 90 %%)",
             right, len(asked))
    return {"frames": len(asked), "right": right, "right_fraction": right / len(asked), "pairs": len(pairs),
            "steps": int(cfg.eval.steps), "true_cfg_scale": float(cfg.eval.true_cfg_scale)}
