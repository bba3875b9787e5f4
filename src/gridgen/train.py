"""Training entry point: ``python -m gridgen.train [overrides]`` (thin ``@hydra.main`` around ``train``)."""

from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Any

import hydra
import lightning as L
from hydra.core.hydra_config import HydraConfig
from hydra.utils import instantiate
from omegaconf import DictConfig, OmegaConf

from gridgen.config import CONF_DIR, exit_on_user_error, register_resolvers
from gridgen.models.lora import LORA_FILE, read_lora_header
from gridgen.training.callbacks import LoraExport, config_hash
from gridgen.training.module import GridModule

log = logging.getLogger("gridgen.train")
register_resolvers()


def find_coarse_lora(output_root: Path, task: str, model: str) -> Path:
    """The newest LoRA exported by a coarse run of this task and model under ``output_root``."""
    candidates = []
    for path in output_root.glob(f"**/lora/{LORA_FILE}"):
        header = read_lora_header(path)  # metadata only: coarse runs' LoRAs can be large
        if (header.get("gridgen_stage"), header.get("gridgen_task"), header.get("gridgen_model")) == (
            "coarse", task, model):
            candidates.append(path)
    if not candidates:
        raise FileNotFoundError(
            f"stage=fine needs a coarse LoRA, and none of task={task} model={model} was found under "
            f"'{output_root}'; run `make curriculum task={task}` (coarse then fine), or `make train "
            f"stage=coarse task={task}` first, or set stage.init_lora=<path>"
        )
    return max(candidates, key=lambda p: p.stat().st_mtime)


def resolve_init_lora(cfg: DictConfig) -> str | None:
    init = cfg.stage.get("init_lora")
    if init in (None, "", "none"):
        return None
    if init == "auto":
        path = find_coarse_lora(Path(cfg.paths.output_root), cfg.task.name, cfg.model.name)
        log.info("stage=%s starts from the coarse LoRA %s", cfg.stage.name, path)
        return str(path)
    path = Path(str(init)).expanduser()
    if not (path.is_file() or (path / LORA_FILE).is_file()):
        raise FileNotFoundError(
            f"stage.init_lora '{init}' does not exist; point it at a {LORA_FILE} (or its folder) from a "
            "coarse run, e.g. outputs/runs/<date>/<time>_coarse-<task>-<model>/lora"
        )
    return str(path)


def resolve_ckpt_path(ckpt: str | None) -> str | None:
    """``last``: Lightning's own lookup; a run folder: its ``checkpoints/last.ckpt``; else the file."""
    if ckpt in (None, "", "last"):
        return ckpt or None
    path = Path(ckpt).expanduser()
    if path.is_dir():
        path = path / "checkpoints" / "last.ckpt"
    if not path.is_file():
        raise FileNotFoundError(f"ckpt_path '{ckpt}' is not a checkpoint file or a run folder with checkpoints/last.ckpt")
    return str(path)


def build_loggers(cfg: DictConfig) -> list[Any]:
    loggers = []
    for name, logger_cfg in (cfg.get("logger") or {}).items():
        if name == "wandb":
            logger_cfg = OmegaConf.to_container(logger_cfg, resolve=True)
            if logger_cfg.get("offline") is None:
                logger_cfg["offline"] = not (os.environ.get("WANDB_API_KEY") or os.environ.get("WANDB_MODE") == "online")
            if logger_cfg.get("group") is None and HydraConfig.initialized() and \
                    HydraConfig.get().mode == hydra.types.RunMode.MULTIRUN:
                logger_cfg["group"] = Path(HydraConfig.get().sweep.dir).name  # one W&B group per sweep
            logger = instantiate(logger_cfg)
            # All train metrics share the optimizer-step axis.
            logger.experiment.define_metric("trainer/global_step")
            logger.experiment.define_metric("train/*", step_metric="trainer/global_step")
            loggers.append(logger)
        else:
            loggers.append(instantiate(logger_cfg))
    return loggers


def _finish_wandb(loggers: list[Any]) -> None:
    """Close the W&B run: in a multirun the next job would otherwise log into this one."""
    from lightning.pytorch.loggers import WandbLogger

    if any(isinstance(logger, WandbLogger) for logger in loggers):
        import wandb

        wandb.finish()


def train(cfg: DictConfig) -> dict[str, float]:
    """Instantiate everything from ``cfg``, fit, export the LoRA; returns the final metrics."""
    L.seed_everything(cfg.seed, workers=True)
    strategy = cfg.trainer.get("strategy")
    if "fsdp" in str(strategy.get("_target_", "") if isinstance(strategy, DictConfig) else strategy).lower() and \
            cfg.model.dtype not in ("float32", "fp32"):
        raise ValueError(f"strategy=fsdp needs model.dtype=float32 (one dtype per sharded block), got "
                         f"model.dtype={cfg.model.dtype}; bf16 compute comes from trainer.precision=bf16-mixed")
    output_dir = Path(cfg.paths.output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)
    init_lora = resolve_init_lora(cfg)
    ckpt_path = resolve_ckpt_path(cfg.get("ckpt_path"))

    datamodule = instantiate(cfg.data)
    module = GridModule(model=cfg.model, lora=cfg.lora, optim=cfg.optim, loss=cfg.loss, init_lora=init_lora,
                        seed=cfg.seed, max_steps=cfg.trainer.max_steps)

    callbacks = []
    for name, callback_cfg in (cfg.get("callbacks") or {}).items():
        callback = instantiate(callback_cfg)
        if name == "lora_export" and isinstance(callback, LoraExport):
            callback.metadata.update({
                "gridgen_stage": cfg.stage.name, "gridgen_task": cfg.task.name, "gridgen_model": cfg.model.name,
                "gridgen_rank": cfg.lora.rank, "gridgen_lora_alpha": cfg.lora.alpha,
                "gridgen_config_hash": config_hash(OmegaConf.to_container(cfg, resolve=True)),
                "gridgen_init_lora": init_lora or "",
            })
        callbacks.append(callback)

    loggers = build_loggers(cfg)
    trainer: L.Trainer = instantiate(cfg.trainer, callbacks=callbacks, logger=loggers or False)
    if trainer.is_global_zero:
        (output_dir / "config.yaml").write_text(OmegaConf.to_yaml(cfg, resolve=True))
    try:
        trainer.fit(module, datamodule=datamodule, ckpt_path=ckpt_path)
    finally:
        _finish_wandb(loggers)

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
