"""One cell of the miniature's ablation: a grid LoRA trained with one variant's settings and seed, then evaluated on
the held-out combinations; and the base model prompted for grids without a LoRA (the reference of the FVD target).

    <out>/<variant>/seed<k>/run/        gridgen.train experiment=mini + the variant's overrides (LoRA, metrics.csv)
    <out>/<variant>/seed<k>/eval/       gridgen.evaluate: one grid generated per test clip (its caption, seed k),
                                        world metrics + FVD against the test clips -> <task>.json; config.yaml
    <out>/<variant>/seed<k>/grids/      NNNN.png (the generated grid) + NNNN.json (prompt, shape, colour, motion)
    <out>/<variant>/seed<k>/done.json   the figures the report reads
"""

from __future__ import annotations

import json
import logging
import os
import time
from pathlib import Path
from typing import Any

from omegaconf import DictConfig, OmegaConf

from gridgen.mini.steps import compose, guider_overrides, write_done

log = logging.getLogger("gridgen.mini")

BASE = "base_without_lora"
EVAL_CONFIG = "config.yaml"  # <cell>/eval/config.yaml: the evaluation's composed config


def lora_overrides(build: Path, variant: list[str], seed: int, extra: list[str]) -> list[str]:
    """``gridgen.train`` overrides of one run: the preset, the build's base and latent caches, the variant, the seed."""
    cache = build / "cache_clips"
    return ["experiment=mini", f"model.pretrained={build / 'base'}", "data.cached=true",
            f"data.train_shards={cache}", f"data.val_shards={cache}", f"seed={seed}", *variant, *extra]


def held_out_losses(run: Path) -> dict[str, float]:
    """The last validation's held-out losses (``val/*``: fixed t and noise, ``loss.val_timesteps``) of a run."""
    from gridgen.reporting import read_metrics

    return {key: points[-1][1] for key, points in read_metrics(run).items() if key.startswith("val/") and points}


def eval_overrides(cfg: DictConfig, build: Path, folder: Path, seed: int, lora: Path | None) -> list[str]:
    """``gridgen.evaluate`` overrides of one cell's evaluation (``folder``: where the cell is written)."""
    from gridgen.embedded.mini_data import clips_layout

    overrides = ["task=mini", "model=flux_mini", f"model.pretrained={build / 'base'}", "eval.generate=true",
                 f"eval.real={build / 'data' / 'clips' / 'test-000000.tar'}", f"eval.out={folder / 'eval'}",
                 f"eval.metrics=[{','.join(cfg.eval.metrics)}]", "eval.device=cpu",
                 f"eval.progress={str(bool(cfg.eval.progress)).lower()}", f"seed={seed * 1000}",
                 f"generate.steps={int(cfg.eval.steps)}", f"generate.batch_size={int(cfg.eval.batch_size)}",
                 f"generate.true_cfg_scale={float(cfg.eval.true_cfg_scale)}",
                 "generate.device=cpu", "generate.progress=false", "export.mp4=false", "export.gif=false",
                 "export.frames=false", f"generate.height={clips_layout().height}"]  # the test clips' size
    overrides += guider_overrides(cfg.eval)
    return overrides + ([f"lora={lora}"] if lora is not None else [])


def evaluate_grids(cfg: DictConfig, build: Path, folder: Path, seed: int, lora: Path | None) -> dict[str, Any]:
    """``gridgen.evaluate task=mini eval.generate=true`` on the test clips: one grid per clip, from its caption, then
    the world metrics and FVD against those clips; the composed config is kept as ``eval/config.yaml`` (what a
    continued ``make mini`` checks). Each grid is also kept as ``grids/NNNN.png`` with ``NNNN.json`` (prompt, seed,
    shape, colour, motion and its own world scores). Returns the metrics and the per-grid figures."""
    import numpy as np
    from PIL import Image

    from gridgen.eval.pipeline import run_evaluation
    from gridgen.eval.world_metrics import score_grid
    from gridgen.layout import GridLayout

    config = compose("evaluate", eval_overrides(cfg, build, folder, seed, lora), output_dir=folder / "eval")
    result = run_evaluation(config)
    (folder / "eval" / EVAL_CONFIG).write_text(OmegaConf.to_yaml(config, resolve=True))
    generated = folder / "eval" / "generated"
    manifest = json.loads((generated / "manifest.json").read_text())
    layout = GridLayout.parse(manifest["layout"]["name"], manifest["layout"]["cell_height"])
    grids = folder / "grids"
    grids.mkdir()
    scores = []
    for sample in manifest["samples"]:
        name = f"{sample['index']:04d}"
        os.link(generated / sample["files"]["grid"], grids / f"{name}.png")
        score = score_grid(np.asarray(Image.open(grids / f"{name}.png").convert("RGB")), layout, sample["prompt"])
        scores.append(score)
        record = {"prompt": sample["prompt"], "seed": sample["seed"], "shape": score.shape, "color": score.color,
                  "motion": score.motion, "scores": {k: v for k, v in score.to_dict().items()
                                                    if k not in ("caption", "shape", "color", "motion")}}
        (grids / f"{name}.json").write_text(json.dumps(record, indent=2) + "\n")
    metrics = dict(result.metrics)
    # Over every generated grid: a grid whose motion cannot be read (a cell without a shape) is not a correct one.
    metrics["world_identity_all"] = sum(s.identity for s in scores) / len(scores)
    metrics["world_motion_all"] = sum(bool(s.motion_correct) for s in scores) / len(scores)
    metrics["grids"] = len(scores)
    return metrics


def run_checkpointed(tmp: Path) -> bool:
    """Whether cell folder ``tmp`` holds a checkpoint of its run (what a stopped `make mini` leaves to continue)."""
    return (tmp / "run" / "checkpoints" / "last.ckpt").is_file()


def run_variant(cfg: DictConfig, build: Path, tmp: Path, variant: list[str], seed: int,
                resumed: tuple[int, bool] | None = None) -> dict[str, Any]:
    """Train and evaluate one grid LoRA into ``tmp``; returns (and writes) its record. ``resumed``: ``(step,
    finished)`` of the run in ``tmp/run`` that a stopped `make mini` left (``resume_point``): it goes on from its
    last checkpoint (its time before is not in ``train_s``), or is only evaluated when it had finished."""
    from gridgen.train import train

    started = time.perf_counter()
    overrides = lora_overrides(build, list(variant), seed, list(cfg.runs.train))
    run = tmp / "run"
    if resumed is not None and resumed[1]:  # trained to the end before: evaluate only
        train_metrics = json.loads((run / "summary.json").read_text())["metrics"]
    else:  # in place from last.ckpt: exactly the uninterrupted run (gridgen.train's resume)
        resume = [f"ckpt_path={run}"] if resumed is not None else []
        train_metrics = train(compose("train", [*overrides, *resume], output_dir=run))
    train_s = time.perf_counter() - started
    metrics = evaluate_grids(cfg, build, tmp, seed, run)
    record = {"overrides": overrides, "seed": seed, "train_s": round(train_s, 1),
              "eval_s": round(time.perf_counter() - started - train_s, 1), "train": train_metrics,
              "held_out": held_out_losses(run), "metrics": metrics}
    if resumed is not None:
        record["resumed_from_step"] = resumed[0]
    return write_done(tmp, record)


def run_base(cfg: DictConfig, build: Path, tmp: Path, seed: int) -> dict[str, Any]:
    """The base model prompted for grids (the same captions and seeds), no LoRA."""
    started = time.perf_counter()
    metrics = evaluate_grids(cfg, build, tmp, seed, None)
    return write_done(tmp, {"seed": seed, "eval_s": round(time.perf_counter() - started, 1), "metrics": metrics})
