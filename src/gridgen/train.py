"""Training entry point: ``python -m gridgen.train [overrides]`` (thin ``@hydra.main`` around ``train``)."""

from __future__ import annotations

import logging
from pathlib import Path

import hydra
import lightning as L
import torch
from hydra.utils import instantiate
from lightning.pytorch.callbacks import ProgressBar
from lightning.pytorch.utilities import rank_zero_only
from omegaconf import DictConfig, OmegaConf, open_dict

from gridgen.config import CONF_DIR, exit_on_user_error, register_resolvers
from gridgen.models.attention import resolve_attention_backend
from gridgen.training.callbacks import LoraExport, config_hash
from gridgen.training.ema import LoraEMA
from gridgen.training.module import GridModule
from gridgen.training.runs import (
    build_loggers,
    finish_wandb,
    keep_or_mark_failed,
    resolve_ckpt_path,
    resolve_init_lora,
)

log = logging.getLogger("gridgen.train")
register_resolvers()


def train(cfg: DictConfig) -> dict[str, float]:
    """Instantiate everything from ``cfg``, fit, export the LoRA; returns the final metrics."""
    output_dir = Path(cfg.paths.output_dir)
    progress = {"fit_started": False}
    try:
        return _train(cfg, output_dir, progress)
    except BaseException as err:
        if not isinstance(err, KeyboardInterrupt) and rank_zero_only.rank == 0:
            keep_or_mark_failed(output_dir, err, progress["fit_started"])
        raise


def _train(cfg: DictConfig, output_dir: Path, progress: dict[str, bool]) -> dict[str, float]:
    L.seed_everything(cfg.seed, workers=True)
    init_lora = resolve_init_lora(cfg)
    ckpt_path, resume_step = resolve_ckpt_path(cfg.get("ckpt_path"))
    output_dir.mkdir(parents=True, exist_ok=True)

    # The attention kernel this run will use, recorded in config.yaml and the loggers' hyperparameters.
    accelerator = str(cfg.trainer.get("accelerator", "cpu"))
    device_type = "cuda" if accelerator in ("gpu", "cuda") or (accelerator == "auto" and torch.cuda.is_available()) else "cpu"
    with open_dict(cfg):
        cfg.model.attention_backend = resolve_attention_backend(cfg.model.get("attention_backend"), device_type)

    datamodule = instantiate(cfg.data)
    module = GridModule(model=cfg.model, lora=cfg.lora, optim=cfg.optim, loss=cfg.loss, init_lora=init_lora,
                        seed=cfg.seed, max_steps=cfg.trainer.max_steps, nonfinite=cfg.get("nonfinite"))

    callbacks = []
    for name, callback_cfg in (cfg.get("callbacks") or {}).items():
        callback = instantiate(callback_cfg)
        if isinstance(callback, ProgressBar) and not cfg.trainer.get("enable_progress_bar", True):
            continue  # Lightning refuses a progress-bar callback when the bar is switched off
        if name == "lora_export" and isinstance(callback, LoraExport):
            callback.metadata.update({
                "gridgen_stage": cfg.stage.name, "gridgen_task": cfg.task.name, "gridgen_model": cfg.model.name,
                "gridgen_rank": cfg.lora.rank, "gridgen_lora_alpha": cfg.lora.alpha,
                "gridgen_config_hash": config_hash(OmegaConf.to_container(cfg, resolve=True)),
                "gridgen_init_lora": init_lora or "", "gridgen_debug": str(bool(cfg.get("debug_run", False))).lower(),
            })
        callbacks.append(callback)

    loggers = build_loggers(cfg, resume_step)
    trainer: L.Trainer = instantiate(cfg.trainer, callbacks=callbacks, logger=loggers or False)
    if trainer.is_global_zero:  # a resumed run keeps the config it started with
        name = "config.yaml" if resume_step is None else f"config.resume-step{resume_step}.yaml"
        (output_dir / name).write_text(OmegaConf.to_yaml(cfg, resolve=True))
    progress["fit_started"] = True
    (output_dir / "FAILED").unlink(missing_ok=True)  # a resumed run that fits again is no longer a failed one
    try:
        trainer.fit(module, datamodule=datamodule, ckpt_path=ckpt_path, weights_only=True)
    finally:
        finish_wandb(loggers)

    metrics = {k: float(v) for k, v in trainer.callback_metrics.items() if v.numel() == 1}
    if trainer.is_global_zero:
        export = next((c.path for c in callbacks if isinstance(c, LoraExport)), None)
        checkpoints = cfg.callbacks.get("checkpoint", {}).get("dirpath")
        lines = [f"run folder     {output_dir}", f"config         {output_dir / 'config.yaml'}"]
        if (output_dir / "metrics" / "metrics.csv").exists():
            lines.append(f"metrics        {output_dir / 'metrics' / 'metrics.csv'}")
        if checkpoints:
            lines.append(f"checkpoints    {checkpoints} (LoRA + optimiser state; last.ckpt to resume)")
        if export:
            lines.append(f"LoRA export    {export}")
        if ema := next((c.path for c in callbacks if isinstance(c, LoraEMA) and c.path), None):
            lines.append(f"EMA LoRA       {ema}")
        lines.append("final          " + "  ".join(f"{k}={v:.4g}" for k, v in sorted(metrics.items())
                                                   if k.startswith("train/loss") or k == "train/alpha"))
        print("\n".join(lines), flush=True)  # the entry point's answer to the user
    return metrics


@hydra.main(version_base="1.3", config_path=str(CONF_DIR), config_name="train")
def main(cfg: DictConfig) -> float | None:
    with exit_on_user_error("train"):
        metrics = train(cfg)
    return metrics.get("train/loss")  # lets Hydra sweepers optimise over runs


if __name__ == "__main__":
    main()
