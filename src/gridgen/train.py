"""Training entry point: ``python -m gridgen.train [overrides]`` (thin ``@hydra.main`` around ``train``)."""

from __future__ import annotations

import csv
import logging
import os
import shutil
from pathlib import Path
from typing import Any

import hydra
import lightning as L
import torch
from hydra.core.hydra_config import HydraConfig
from hydra.utils import instantiate
from lightning.pytorch.callbacks import ProgressBar
from lightning.pytorch.utilities import rank_zero_only
from omegaconf import DictConfig, OmegaConf, open_dict

from gridgen.config import CONF_DIR, exit_on_user_error, register_resolvers
from gridgen.models.attention import resolve_attention_backend
from gridgen.models.lora import LORA_FILE, read_lora_header
from gridgen.training.callbacks import LoraExport, config_hash
from gridgen.training.ema import LoraEMA
from gridgen.training.module import GridModule

log = logging.getLogger("gridgen.train")
register_resolvers()


class CheckpointError(ValueError):
    """A checkpoint that cannot be resumed from: unreadable, truncated, or not a gridgen checkpoint."""


def _skip_reason(header: dict[str, str], want: dict[str, str], debug_run: bool, run: Path) -> str | None:
    """Why a coarse LoRA does not fit the current run (None: it fits)."""
    for key, label in (("gridgen_stage", "stage"), ("gridgen_task", "task"), ("gridgen_model", "model")):
        if header.get(key) != want[key]:
            return f"{label} {header.get(key, '?')}"
    if str(header.get("gridgen_rank")) != want["gridgen_rank"]:
        return f"rank {header.get('gridgen_rank', '?')}"
    if header.get("gridgen_debug") == "true" and not debug_run:
        return "debug run"
    if not (run / "summary.json").is_file() or (run / "FAILED").exists():
        return "unfinished run"
    return None


def find_coarse_lora(output_root: Path, task: str, model: str, rank: int, debug_run: bool = False) -> Path:
    """The newest LoRA exported by a finished coarse run of this task, model and rank under ``output_root``
    (debug runs only when this run is one); logs which file was taken and why the others were passed over."""
    want = {"gridgen_stage": "coarse", "gridgen_task": task, "gridgen_model": model, "gridgen_rank": str(rank)}
    candidates, passed_over = [], {}
    for path in output_root.glob(f"**/lora/{LORA_FILE}"):
        try:
            header = read_lora_header(path)  # metadata only: coarse runs' LoRAs can be large
        except ValueError:
            passed_over.setdefault("unreadable", []).append(path)
            continue
        reason = _skip_reason(header, want, debug_run, path.parent.parent)
        if reason is None:
            candidates.append(path)
        else:
            passed_over.setdefault(reason, []).append(path)
    others = "; ".join(f"{len(p)} of {r} (e.g. {p[0]})" for r, p in sorted(passed_over.items())
                       if not r.startswith(("stage", "task")))
    if not candidates:
        raise FileNotFoundError(
            f"stage=fine needs a finished coarse LoRA of task={task} model={model} rank={rank}, and none was found "
            f"under '{output_root}'" + (f" (passed over: {others})" if others else "") +
            f"; run `make curriculum task={task}` (coarse then fine), or `make train stage=coarse task={task}` "
            "first, or set stage.init_lora=<path>"
        )
    chosen = max(candidates, key=lambda p: p.stat().st_mtime)
    log.info("stage=fine starts from %s (the newest finished coarse LoRA of task=%s model=%s rank=%d)%s", chosen,
             task, model, rank, f"; passed over: {others}" if others else "")
    return chosen


def resolve_init_lora(cfg: DictConfig) -> str | None:
    init = cfg.stage.get("init_lora")
    if init in (None, "", "none"):
        return None
    if init == "auto":
        return str(find_coarse_lora(Path(cfg.paths.output_root), cfg.task.name, cfg.model.name, int(cfg.lora.rank),
                                    bool(cfg.get("debug_run", False))))
    path = Path(str(init)).expanduser()
    if not (path.is_file() or (path / LORA_FILE).is_file()):
        raise FileNotFoundError(
            f"stage.init_lora '{init}' does not exist; point it at a {LORA_FILE} (or its folder) from a "
            "coarse run, e.g. outputs/runs/<date>/<time>_coarse-<task>-<model>/lora"
        )
    return str(path)


def resolve_ckpt_path(ckpt: str | None) -> tuple[str | None, int | None]:
    """A run folder: its ``checkpoints/last.ckpt``; else the file. The file is read once here with
    ``weights_only=True`` (never unpickled) so that a truncated or foreign file is one line, not a traceback."""
    if ckpt in (None, ""):
        return None, None
    path = Path(ckpt).expanduser()
    if path.is_dir():
        path = path / "checkpoints" / "last.ckpt"
    if not path.is_file():
        raise FileNotFoundError(f"ckpt_path '{ckpt}' is not a checkpoint file or a run folder with checkpoints/last.ckpt")
    try:
        checkpoint = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except Exception as err:  # zip/pickle errors of every kind: truncated, garbage, a foreign pickle
        raise CheckpointError(
            f"ckpt_path '{path}' cannot be read as a checkpoint ({type(err).__name__}: {str(err).splitlines()[0][:160]}); "
            "it is truncated, corrupt or not a gridgen/Lightning checkpoint: resume from an earlier "
            "checkpoints/step*.ckpt of the run"
        ) from None
    if not isinstance(checkpoint, dict) or "state_dict" not in checkpoint or "global_step" not in checkpoint:
        raise CheckpointError(f"ckpt_path '{path}' is not a Lightning checkpoint (no state_dict/global_step); "
                              "point it at a run folder or its checkpoints/*.ckpt")
    return str(path), int(checkpoint["global_step"])


def _wandb_run_id(output_dir: Path) -> str | None:
    """The id of the W&B run already in a run folder (``wandb/[offline-]run-<time>-<id>``), for resume."""
    runs = sorted(output_dir.glob("wandb/*run-*-*"), key=lambda p: p.stat().st_mtime)
    return runs[-1].name.rsplit("-", 1)[-1] if runs else None


def _metrics_before(path: Path, step: int) -> list[dict[str, str]]:
    """Rows of a run's metrics.csv logged before ``step``: a resumed run keeps them and re-logs the rest."""
    if not path.is_file():
        return []
    with path.open(newline="") as file:
        return [row for row in csv.DictReader(file) if row.get("step", "").isdigit() and int(row["step"]) < step]


def build_loggers(cfg: DictConfig, resume_step: int | None = None) -> list[Any]:
    """The configured loggers; ``resume_step``: a resumed run continues its W&B run and its metrics.csv."""
    from lightning.pytorch.loggers import CSVLogger

    output_dir = Path(cfg.paths.output_dir)
    loggers = []
    for name, logger_cfg in (cfg.get("logger") or {}).items():
        if name == "wandb":
            logger_cfg = OmegaConf.to_container(logger_cfg, resolve=True)
            if logger_cfg.get("offline") is None:
                logger_cfg["offline"] = not (os.environ.get("WANDB_API_KEY") or os.environ.get("WANDB_MODE") == "online")
            if logger_cfg.get("group") is None and HydraConfig.initialized() and \
                    HydraConfig.get().mode == hydra.types.RunMode.MULTIRUN:
                logger_cfg["group"] = Path(HydraConfig.get().sweep.dir).name  # one W&B group per sweep
            if resume_step is not None and logger_cfg.get("id") is None and (run_id := _wandb_run_id(output_dir)):
                logger_cfg.update(id=run_id, resume="allow")
            logger = instantiate(logger_cfg)
            # All train metrics share the optimizer-step axis.
            logger.experiment.define_metric("trainer/global_step")
            logger.experiment.define_metric("train/*", step_metric="trainer/global_step")
            loggers.append(logger)
        else:
            logger = instantiate(logger_cfg)
            if resume_step is not None and isinstance(logger, CSVLogger):
                # Lightning's CSV writer deletes metrics.csv when it is created (first use of .experiment): read
                # the rows logged before the checkpoint first, then hand them to the new writer.
                kept = _metrics_before(Path(logger.log_dir) / "metrics.csv", resume_step)
                rows = getattr(logger.experiment, "metrics", None)  # a no-op stand-in on ranks other than 0
                if isinstance(rows, list):
                    rows.extend(kept)
            loggers.append(logger)
    return loggers


def _finish_wandb(loggers: list[Any]) -> None:
    """Close the W&B run: in a multirun the next job would otherwise log into this one."""
    from lightning.pytorch.loggers import WandbLogger

    if any(isinstance(logger, WandbLogger) for logger in loggers):
        import wandb

        wandb.finish()


def _keep_or_mark_failed(output_dir: Path, err: BaseException, fit_started: bool) -> None:
    """A run that failed in ``trainer.fit`` is marked ``FAILED`` (``stage.init_lora=auto`` passes over it); a new
    run that failed before it holds only Hydra's own files and is removed. A folder with anything else in it (a
    resumed run that failed before fitting, a folder the user named) is left as it was."""
    if not output_dir.is_dir():
        return
    if fit_started:
        (output_dir / "FAILED").write_text(f"{type(err).__name__}: {err}\n")
        return
    leftovers = [p for p in output_dir.rglob("*") if p.is_file() and ".hydra" not in p.parts
                 and p.suffix != ".log"]  # Hydra's own files, the job log
    if not leftovers:
        shutil.rmtree(output_dir, ignore_errors=True)


def train(cfg: DictConfig) -> dict[str, float]:
    """Instantiate everything from ``cfg``, fit, export the LoRA; returns the final metrics."""
    output_dir = Path(cfg.paths.output_dir)
    progress = {"fit_started": False}
    try:
        return _train(cfg, output_dir, progress)
    except BaseException as err:
        if not isinstance(err, KeyboardInterrupt) and rank_zero_only.rank == 0:
            _keep_or_mark_failed(output_dir, err, progress["fit_started"])
        raise


def _train(cfg: DictConfig, output_dir: Path, progress: dict[str, bool]) -> dict[str, float]:
    L.seed_everything(cfg.seed, workers=True)
    init_lora = resolve_init_lora(cfg)
    ckpt_path, resume_step = resolve_ckpt_path(cfg.get("ckpt_path"))
    output_dir.mkdir(parents=True, exist_ok=True)
    (output_dir / "FAILED").unlink(missing_ok=True)  # a resumed run starts clean

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
    try:
        trainer.fit(module, datamodule=datamodule, ckpt_path=ckpt_path, weights_only=True)
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
