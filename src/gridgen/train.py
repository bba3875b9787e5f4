"""Training entry point: ``python -m gridgen.train [overrides]`` (thin ``@hydra.main`` around ``train``)."""

from __future__ import annotations

import logging
import os
import signal
from pathlib import Path
from typing import Any

import hydra
import lightning as L
from hydra.utils import get_object, instantiate
from lightning.pytorch.callbacks import LearningRateMonitor, ProgressBar
from lightning.pytorch.utilities import rank_zero_only
from lightning.pytorch.utilities.exceptions import SIGTERMException
from omegaconf import DictConfig, OmegaConf, open_dict

from gridgen.config import CONF_DIR, check_added_keys, exit_on_user_error, register_resolvers
from gridgen.files import config_hash
from gridgen.models.attention import resolve_attention_backend
from gridgen.models.full import adapter_mode
from gridgen.models.loading import EMBEDDED_TINY_NAMES, check_model_source, check_transformer_folder
from gridgen.run_folder import RunFolderGuard, hydra_files_of_this_command
from gridgen.runtime import resolve_device, tune_cpu_process
from gridgen.training.callbacks import LoraExport, TransformerExport
from gridgen.training.callbacks.ema import LoraEMA
from gridgen.training.module import GridModule
from gridgen.training.runs import (
    build_loggers,
    check_resume,
    check_run_settings,
    failure_text,
    finish_wandb,
    read_checkpoint,
    record_parent,
    resolve_init_lora,
    wandb_run_line,
)

log = logging.getLogger("gridgen.train")
register_resolvers()


def run_device_type(cfg: DictConfig) -> str:
    """``cuda`` or ``cpu``: where a training run of ``cfg`` computes on this machine (``trainer.accelerator``)."""
    accelerator = str(cfg.trainer.get("accelerator", "cpu"))
    auto = resolve_device("auto", "trainer.accelerator").type
    return {"gpu": "cuda", "cuda": "cuda", "auto": auto}.get(accelerator, "cpu")


def run_attention_backend(cfg: DictConfig) -> str:
    """The attention kernel a training run of ``cfg`` uses on this machine (``model.attention_backend``, ``auto``
    resolved for ``trainer.accelerator``'s device), as its ``config.yaml`` records it."""
    return resolve_attention_backend(cfg.model.get("attention_backend"), run_device_type(cfg))


def train(cfg: DictConfig) -> dict[str, float]:
    """Instantiate everything from ``cfg``, fit, export the LoRA (``adapter=full``: the transformer); returns the
    final metrics.

    Everything that can be checked is checked before the first file is written; a command that fails before
    training a step leaves the run folder as it was (a new one is removed), and ``FAILED`` (with the reason) marks
    only a run that trained at least one step."""
    output_dir = Path(cfg.paths.output_dir)
    guard = RunFolderGuard(output_dir, hydra_files_of_this_command(output_dir), root=Path(cfg.paths.root_dir))
    state: dict[str, Any] = {"trainer": None, "start_step": 0}
    try:
        return _train(cfg, output_dir, state)
    except BaseException as err:
        trainer = state["trainer"]
        step = trainer.global_step if trainer is not None else state["start_step"]
        if rank_zero_only.rank == 0:
            if step > state["start_step"]:
                if not isinstance(err, KeyboardInterrupt):
                    (output_dir / "FAILED").write_text(failure_text(err, step, output_dir))
            else:
                guard.restore()
        if isinstance(err, SIGTERMException):  # Lightning's exits 0; a scheduler should see the signal
            raise SystemExit(128 + signal.SIGTERM) from err
        raise


def _train(cfg: DictConfig, output_dir: Path, state: dict[str, Any]) -> dict[str, float]:
    if str(cfg.model.pretrained).lower() in EMBEDDED_TINY_NAMES:
        log.info("model=%s is a tiny FLUX with random weights: it checks the mechanics end to end, and its sample "
                 "grids are colour noise by design (`make mini` trains a model that learns, on the CPU)", cfg.model.name)
    check_added_keys(cfg, "train")
    check_run_settings(cfg)
    L.seed_everything(cfg.seed, workers=True, verbose=False)
    init_lora = resolve_init_lora(cfg)
    resume = read_checkpoint(cfg.get("ckpt_path"), output_dir)
    if resume is not None:
        check_resume(cfg, resume)
        state["start_step"] = resume.step
    check_model_source(cfg.model.pretrained, revision=cfg.model.get("revision"))
    if cfg.model.get("transformer"):
        check_transformer_folder(cfg.model.transformer)
    mode = adapter_mode(cfg.lora)

    tune_cpu_process(run_device_type(cfg))  # glibc's malloc (gridgen.runtime.tune_malloc): the first steps, eager steps
    # The attention kernel this run will use, recorded in config.yaml and the loggers' hyperparameters.
    with open_dict(cfg):
        cfg.model.attention_backend = run_attention_backend(cfg)

    datamodule = instantiate(cfg.data)
    if "LOCAL_RANK" not in os.environ:  # one process (or the launcher of DDP's processes): check the data now,
        datamodule.prepare_data()  # before any logger or file (Lightning's setup skips what is done)
        datamodule.setup("fit")
    module = GridModule(model=cfg.model, lora=cfg.lora, optim=cfg.optim, loss=cfg.loss, init_lora=init_lora,
                        seed=cfg.seed, max_steps=cfg.trainer.max_steps, nonfinite=cfg.get("nonfinite"),
                        run={"task": cfg.task.name, "layout": str(cfg.task.get("sample_layout"))})

    callbacks = []
    for name, callback_cfg in (cfg.get("callbacks") or {}).items():
        if _adapter_of(callback_cfg) not in (None, mode):
            continue  # the export of the other adapter (LoRA file | transformer folder)
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

    output_dir.mkdir(parents=True, exist_ok=True)
    loggers = build_loggers(cfg, resume)
    if not loggers:  # logger=none: Lightning refuses an LR monitor without a logger, and it would have nowhere to write
        callbacks = [c for c in callbacks if not isinstance(c, LearningRateMonitor)]
    trainer: L.Trainer = instantiate(cfg.trainer, callbacks=callbacks, logger=loggers or False)
    state["trainer"] = trainer
    if trainer.is_global_zero:  # a run resumed in place keeps the config it started with
        in_place = resume is not None and resume.in_place
        name = f"config.resume-step{resume.step}.yaml" if in_place else "config.yaml"
        (output_dir / name).write_text(OmegaConf.to_yaml(cfg, resolve=True))
        if resume is not None and not in_place:
            record_parent(output_dir, resume)
    (output_dir / "FAILED").unlink(missing_ok=True)  # a resumed run that fits again is no longer a failed one
    try:
        trainer.fit(module, datamodule=datamodule, ckpt_path=resume and resume.path, weights_only=True)
    finally:
        wandb_line = wandb_run_line(loggers)
        finish_wandb(loggers)

    metrics = {k: float(v) for k, v in trainer.callback_metrics.items() if v.numel() == 1}
    if trainer.is_global_zero:
        export = next((c.path for c in callbacks if isinstance(c, LoraExport | TransformerExport)), None)
        checkpoints = cfg.callbacks.get("checkpoint", {}).get("dirpath")
        lines = [f"run folder     {output_dir}", f"config         {output_dir / 'config.yaml'}"]
        if resume is not None and not resume.in_place:
            lines.append(f"resumed from   {resume.path} (step {resume.step}; that run is unchanged, see parent.json)")
        if (output_dir / "metrics" / "metrics.csv").exists():
            lines.append(f"metrics        {output_dir / 'metrics' / 'metrics.csv'}")
        if wandb_line:
            lines.append(wandb_line)
        trained = "LoRA" if mode == "lora" else "transformer"
        if checkpoints:
            lines.append(f"checkpoints    {checkpoints} ({trained} + optimiser state; last.ckpt to resume)")
        if export:
            lines.append(f"{trained + ' export':<14} {export}")
        if ema := next((c.path for c in callbacks if isinstance(c, LoraEMA) and c.path), None):
            lines.append(f"{'EMA ' + trained:<14} {ema}")
        lines.append("final          " + "  ".join(f"{k}={v:.4g}" for k, v in sorted(metrics.items())
                                                   if k.startswith("train/loss") or k == "train/alpha"))
        print("\n".join(lines), flush=True)  # the entry point's answer to the user
    return metrics


def _adapter_of(callback_cfg: Any) -> str | None:
    """The adapter mode a callback serves (``adapter`` of its ``_target_`` class: the exports), None: any."""
    target = callback_cfg.get("_target_") if isinstance(callback_cfg, DictConfig) else None
    try:
        return getattr(get_object(target), "adapter", None) if target else None
    except Exception:  # noqa: BLE001 - instantiate() reports a bad _target_ with Hydra's own message
        return None


@hydra.main(version_base="1.3", config_path=str(CONF_DIR), config_name="train")
def main(cfg: DictConfig) -> float | None:
    with exit_on_user_error("train"):
        metrics = train(cfg)
    return metrics.get("train/loss")  # lets Hydra sweepers optimise over runs


if __name__ == "__main__":
    main()
