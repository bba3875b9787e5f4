"""What a training run needs around ``trainer.fit``: the fine stage's coarse LoRA, the checkpoint to resume
from (read safely), loggers that continue a resumed run, and the run folder of a failed run."""

from __future__ import annotations

import csv
import logging
import os
import shutil
from pathlib import Path
from typing import Any

import hydra
import torch
from hydra.core.hydra_config import HydraConfig
from hydra.utils import instantiate
from omegaconf import DictConfig, OmegaConf

from gridgen.models.lora import LORA_FILE, read_lora_header

log = logging.getLogger(__name__)


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


def finish_wandb(loggers: list[Any]) -> None:
    """Close the W&B run: in a multirun the next job would otherwise log into this one."""
    from lightning.pytorch.loggers import WandbLogger

    if any(isinstance(logger, WandbLogger) for logger in loggers):
        import wandb

        wandb.finish()


def keep_or_mark_failed(output_dir: Path, err: BaseException, fit_started: bool) -> None:
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
