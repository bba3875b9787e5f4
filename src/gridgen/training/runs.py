"""What a training run needs around ``trainer.fit``: the fine stage's coarse LoRA, the checkpoint to resume
from (read safely and checked against the config), loggers that continue a resumed run, and a run folder that a
failed command leaves as it was."""

from __future__ import annotations

import csv
import json
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import hydra
import torch
from hydra.core.hydra_config import HydraConfig
from hydra.utils import instantiate
from lightning.pytorch.utilities import rank_zero_only
from omegaconf import DictConfig, OmegaConf

from gridgen.config import resumes_in_place, run_folder_of_checkpoint
from gridgen.models.full import adapter_mode, check_adapter_settings
from gridgen.models.lora import LORA_FILE, read_lora_header
from gridgen.runtime import wandb_offline

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


def _command_line_keys() -> set[str]:
    """The keys this command set on its command line (empty outside ``@hydra.main``)."""
    if not HydraConfig.initialized():
        return set()
    return {o.partition("=")[0].lstrip("+~") for o in HydraConfig.get().overrides.task}


def check_run_settings(cfg: DictConfig) -> None:
    """Settings that could not act are refused before anything runs: LoRA settings in a full fine-tuning and the
    reverse (:func:`gridgen.models.full.check_adapter_settings`), a step count that trains nothing or never ends (the
    alpha ramp and the LR schedule need a finite run), validation asked for but never reached."""
    check_adapter_settings(cfg.lora, cfg.model, cfg.stage.get("init_lora"))
    max_steps = cfg.trainer.get("max_steps")
    if not isinstance(max_steps, int) or max_steps <= 0:
        raise ValueError(f"trainer.max_steps={max_steps} trains nothing or never ends (the alpha ramp and the LR "
                         "schedule need a finite run); set a positive number of optimizer steps, e.g. trainer.max_steps=40")
    interval, batches = cfg.trainer.get("val_check_interval"), cfg.trainer.get("limit_val_batches", 1.0)
    if cfg.data.get("val_shards") is None or not batches or not isinstance(interval, int) or interval <= max_steps:
        return
    asked = _command_line_keys() & {"trainer.val_check_interval", "trainer.limit_val_batches"}
    message = (f"trainer.val_check_interval={interval} is beyond trainer.max_steps={max_steps}: this run would never "
               f"validate (no val losses, no sample grids)")
    if asked:
        raise ValueError(f"{message}; set trainer.val_check_interval={max_steps} or less, or "
                         "trainer.limit_val_batches=0 to train without validation")
    log.warning("%s; set trainer.val_check_interval=%d to validate at its end", message, max_steps)


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


@dataclass(frozen=True)
class ResumePoint:
    """A checkpoint to resume from, read once (never unpickled): where it is, its step, what it was trained
    with, and the folder the resume writes to."""

    path: str
    step: int
    hparams: dict[str, Any]
    lora_shapes: dict[str, tuple[int, ...]]
    parent: Path | None  # the run folder the checkpoint belongs to (None: a loose .ckpt file)
    in_place: bool  # an unfinished run continued from its last checkpoint in its own folder
    adapter: str = "lora"  # what its weights are: lora | full (the transformer's own weights, adapter=full)


def read_checkpoint(ckpt: str | None, output_dir: Path) -> ResumePoint | None:
    """``ckpt_path`` (a run folder: its ``checkpoints/last.ckpt``; else the file), read with
    ``weights_only=True`` so that a truncated or foreign file is one line, not a traceback."""
    if ckpt in (None, ""):
        return None
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
    parent = run_folder_of_checkpoint(ckpt)
    in_place = parent is not None and output_dir.resolve() == parent
    if in_place and resumes_in_place(ckpt) is None:
        raise ValueError(f"ckpt_path '{ckpt}': the run '{parent}' finished or has a later checkpoint, so it is not "
                         "continued in its own folder; leave hydra.run.dir / paths.output_dir unset and the resume "
                         "writes a new run folder that records its parent")
    shapes = {k: tuple(v.shape) for k, v in checkpoint["state_dict"].items() if ".lora_" in k}
    hparams = dict(checkpoint.get("hyper_parameters") or {})
    # the recorded mode; a checkpoint from before adapter=full records none, and holds LoRA tensors (or, stripped
    # of its hyperparameters, shows what it holds)
    recorded = (hparams.get("lora") or {}).get("mode")
    adapter = adapter_mode({"mode": recorded}) if recorded else \
        ("lora" if shapes or not checkpoint["state_dict"] else "full")
    return ResumePoint(str(path), int(checkpoint["global_step"]), hparams, shapes, parent, in_place, adapter)


def check_resume(cfg: DictConfig, resume: ResumePoint) -> None:
    """Refuse, before anything is written, a resume whose checkpoint cannot continue this config: a finished
    step count, another adapter (a LoRA checkpoint in a full fine-tuning or the reverse), another LoRA (rank,
    alpha, targets) or other trained weights (``lora.train_modules``), another model, task or layout."""
    max_steps = int(cfg.trainer.max_steps)
    if resume.step >= max_steps:
        raise ValueError(f"ckpt_path '{resume.path}' is at step {resume.step} and trainer.max_steps={max_steps}: "
                         f"nothing to train; set trainer.max_steps above {resume.step} to continue it")
    mode = adapter_mode(cfg.lora)
    if resume.adapter != mode:
        held = {"lora": "a LoRA", "full": "the transformer's own weights (adapter=full)"}
        start = "start a full fine-tuning without ckpt_path" if mode == "full" else \
            "start a LoRA on the fine-tuned transformer with model.transformer=<run>/transformer"
        raise ValueError(f"ckpt_path '{resume.path}' holds {held[resume.adapter]} and this run trains "
                         f"{held[mode]}; resume it with adapter={resume.adapter}, or {start}")

    def saved(section: str, key: str, kind: Any = str) -> Any:
        value = (resume.hparams.get(section) or {}).get(key)
        return None if value is None else kind(value)

    def nullable(value: Any, kind: Any = str) -> Any:
        return "null" if value is None else kind(value)

    def recorded(section: str, key: str, kind: Any = str) -> Any:
        """A key whose null is a setting: "null" when the checkpoint holds null, None when it does not hold it."""
        values = resume.hparams.get(section) or {}
        return nullable(values[key], kind) if key in values else None

    # setting: (now, in the checkpoint); None in the checkpoint: not recorded there (an older checkpoint)
    pairs = {
        "model.name": (str(cfg.model.name), saved("model", "name")),
        "model.pretrained": (str(cfg.model.pretrained), saved("model", "pretrained")),
        "model.transformer": (nullable(cfg.model.get("transformer")), recorded("model", "transformer")),
        "task.name": (str(cfg.task.name), saved("run", "task")),
        "task.sample_layout": (str(cfg.task.get("sample_layout")), saved("run", "layout")),
    }
    if mode == "full":  # which weights train (and so which stay as model.pretrained / model.transformer has them)
        pairs["lora.train_modules"] = (nullable(cfg.lora.get("train_modules"), list),
                                       recorded("lora", "train_modules", list))
    else:
        pairs.update({
            "lora.rank": (int(cfg.lora.rank), saved("lora", "rank", int)),
            "lora.alpha": (float(cfg.lora.alpha), saved("lora", "alpha", float)),
            "lora.target_modules": (sorted(cfg.lora.target_modules), saved("lora", "target_modules", sorted)),
        })
        # the LoRA tensors themselves: lora_A is (rank, in), lora_B is (out, rank)
        ranks = {shape[0] if ".lora_A" in key else shape[-1] for key, shape in resume.lora_shapes.items()}
        if ranks and ranks != {pairs["lora.rank"][0]}:
            pairs["lora.rank"] = (pairs["lora.rank"][0], sorted(ranks)[0])
    now = {k: v[0] for k, v in pairs.items()}
    then = {k: v[1] for k, v in pairs.items()}
    differ = [k for k in now if then[k] is not None and then[k] != now[k]]
    if differ:
        pairs = ", ".join(f"{k}={_override_value(then[k])} in the checkpoint, {_override_value(now[k])} now"
                          for k in differ)
        fix = " ".join(f"{k}={_override_value(then[k])}" for k in differ)
        start = "a new run from its LoRA with stage=fine stage.init_lora=<run>/lora" if mode == "lora" else \
            "a new run from its export with model.transformer=<run>/transformer"
        raise ValueError(f"ckpt_path '{resume.path}' cannot continue this config ({pairs}); resume with {fix}, or start "
                         f"{start}")


def _override_value(value: Any) -> str:
    return "[" + ",".join(map(str, value)) + "]" if isinstance(value, list) else str(value)


def record_parent(output_dir: Path, resume: ResumePoint) -> None:
    """A resume in a new folder names the run it continues (``parent.json``); the parent itself is not touched."""
    why = "the run had finished" if (resume.parent and (resume.parent / "summary.json").exists()) else \
        "the checkpoint is not the run's last"
    record = {"parent_run": str(resume.parent) if resume.parent else None, "checkpoint": str(Path(resume.path).resolve()),
              "step": resume.step, "why_a_new_folder": why}
    (output_dir / "parent.json").write_text(json.dumps(record, indent=2) + "\n")
    log.info("resuming from step %d of %s in a new run folder %s (%s; the original is left as it is)", resume.step,
             resume.parent or resume.path, output_dir, why)


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


def build_loggers(cfg: DictConfig, resume: ResumePoint | None = None) -> list[Any]:
    """The configured loggers. A resumed run's metrics.csv starts with the rows its checkpoint's run logged
    before that step; a resume in place also continues that run's W&B run."""
    from lightning.pytorch.loggers import CSVLogger

    output_dir = Path(cfg.paths.output_dir)
    loggers = []
    for name, logger_cfg in (cfg.get("logger") or {}).items():
        if name == "wandb":
            logger_cfg = OmegaConf.to_container(logger_cfg, resolve=True)
            if logger_cfg.get("offline") is None:
                logger_cfg["offline"] = wandb_offline()
            if logger_cfg.get("group") is None and HydraConfig.initialized() and \
                    HydraConfig.get().mode == hydra.types.RunMode.MULTIRUN:
                logger_cfg["group"] = Path(HydraConfig.get().sweep.dir).name  # one W&B group per sweep
            if resume is not None and resume.in_place and logger_cfg.get("id") is None and \
                    (run_id := _wandb_run_id(output_dir)):
                logger_cfg.update(id=run_id, resume="allow")
            logger = instantiate(logger_cfg)
            # Lightning passes anonymous=None to wandb.init, which W&B >= 0.19 answers with "The anonymous setting
            # has no effect" on every run; not passing it is what W&B asks for. (A private field: if Lightning
            # renames it, the warning returns and tests/e2e/test_train.py says so; nothing breaks.)
            getattr(logger, "_wandb_init", {}).pop("anonymous", None)
            # All train metrics share the optimizer-step axis.
            logger.experiment.define_metric("trainer/global_step")
            logger.experiment.define_metric("train/*", step_metric="trainer/global_step")
            loggers.append(logger)
        else:
            logger = instantiate(logger_cfg)
            if resume is not None and isinstance(logger, CSVLogger):
                # Lightning's CSV writer deletes metrics.csv when it is created (first use of .experiment): read
                # the rows logged before the checkpoint first, then hand them to the new writer.
                source = Path(logger.log_dir) if resume.parent is None else \
                    resume.parent / Path(logger.log_dir).relative_to(output_dir)
                kept = _metrics_before(source / "metrics.csv", resume.step)
                rows = getattr(logger.experiment, "metrics", None)  # a no-op stand-in on ranks other than 0
                if isinstance(rows, list):
                    rows.extend(kept)
            loggers.append(logger)
    return loggers


def wandb_run_line(loggers: list[Any]) -> str | None:
    """Where the run's W&B data is (W&B itself prints nothing: ``settings.quiet``), and how to upload it."""
    from lightning.pytorch.loggers import WandbLogger

    for logger in loggers:
        if isinstance(logger, WandbLogger) and rank_zero_only.rank == 0:
            run = logger.experiment
            folder = Path(run.dir).parent  # <save_dir>/wandb/[offline-]run-<time>-<id>
            if run.settings.mode == "offline" or getattr(run, "offline", False):
                return f"W&B run        {folder} (offline; upload: wandb sync {folder})"
            return f"W&B run        {run.url}"
    return None


def finish_wandb(loggers: list[Any]) -> None:
    """Close the W&B run: in a multirun the next job would otherwise log into this one."""
    from lightning.pytorch.loggers import WandbLogger

    if any(isinstance(logger, WandbLogger) for logger in loggers):
        import wandb

        wandb.finish()


def failure_text(err: BaseException, step: int, output_dir: Path) -> str:
    """The ``FAILED`` marker's text: the error, or what stopped the run when the exception says nothing
    (SIGTERM from a scheduler or ``kill``), with the command that continues it."""
    message = str(err).strip()
    if not message:
        kind = "SIGTERM (a scheduler's time limit, preemption or `kill`)" if "SIGTERM" in type(err).__name__ \
            else f"{type(err).__name__} without a message"
        message = f"stopped at step {step} by {kind}"
    return f"{type(err).__name__}: {message}\nresume: python -m gridgen.train ckpt_path={output_dir}\n"
