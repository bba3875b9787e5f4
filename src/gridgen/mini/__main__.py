"""``python -m gridgen.mini [key=value ...]`` (``make mini``): build the miniature world and its base model (cached),
train and evaluate every variant x seed of the grid LoRA, write ``<out>/report.md`` + ``report.png``.

The config is ``conf/mini.yaml``; each stage composes an entry point's own config (``train``, ``cache``,
``evaluate``, ``generate``) and calls its function in this process.
"""

from __future__ import annotations

import json
import logging
import os
import platform
import shutil
import sys
import time
from pathlib import Path
from typing import Any

from omegaconf import DictConfig, OmegaConf, open_dict

from gridgen.config import CONF_DIR, exit_on_user_error, register_resolvers
from gridgen.files import write_text_atomic
from gridgen.mini.build import BUILD_STEPS, base_eval_folder, build_folder, run_build
from gridgen.mini.steps import (
    Progress,
    compose,
    is_done,
    plain,
    read_done,
    step_folder,
    temporary_folder,
    without_nulls,
)

log = logging.getLogger("gridgen.mini")

STOPS = ("report", "build")  # stop_after=
SETTINGS = "settings.json"  # <out>/settings.json: what every run of the folder was made with
RUN_MINUTES, BASE_MINUTES = 14.0, 0.8  # ETA weights: a grid LoRA run (RESULTS-10's 2400 steps doubled, + eval), a
                                       # base eval (RESULTS-10)


def variant_folders(cfg: DictConfig, out: Path) -> list[tuple[str, int, Path]]:
    names = list(cfg.runs.variants) + (["base_without_lora"] if cfg.runs.base_without_lora else [])
    return [(name, int(seed), out / name / f"seed{int(seed)}") for name in names for seed in cfg.runs.seeds]


def run(cfg: DictConfig, default_build: Any, default_eval: Any = None) -> Path:
    from gridgen.inference.sampler import make_guider
    from gridgen.mini.report import write_report
    from gridgen.mini.runs import BASE, run_base, run_checkpointed, run_variant

    if cfg.stop_after not in STOPS:
        raise ValueError(f"stop_after must be one of {STOPS}, got {cfg.stop_after!r}")
    out = Path(str(cfg.out)).expanduser()
    if cfg.stop_after == "report" and (out / "report.md").exists():  # stop_after=build writes nothing into out
        raise ValueError(f"{out / 'report.md'} exists: a finished report is never overwritten; pass out=<new folder> "
                         "(the build is cached, only the runs are redone)")
    make_guider(plain(cfg.eval).get("guider"), cfg.eval.true_cfg_scale, section="eval")  # refused before any work
    build = build_folder(cfg, default_build)
    cells = variant_folders(cfg, out) if cfg.stop_after == "report" else []
    weights = {name: minutes for name, minutes in BUILD_STEPS.items()}
    weights.update({str(folder): BASE_MINUTES if name == BASE else RUN_MINUTES for name, _, folder in cells})
    progress = Progress(weights)
    settings = {"build": str(build), "runs": plain(cfg.runs), "eval": plain(cfg.eval)}
    if cells:  # before the build: a continued folder with other settings, or another recipe, is refused at once
        check_out_settings(out, settings, finished=any(is_done(folder) for _, _, folder in cells))
        check_recipe(cfg, build, cells)
    started = time.perf_counter()
    base_eval = base_eval_folder(cfg, cfg.eval if default_eval is None else default_eval)
    figures = run_build(cfg, build, progress, base_eval)
    if cfg.stop_after == "build":
        log.info("built %s (VAE PSNR %.2f dB; base: shape and colour right in %.1f %% of frames)", build,
                 figures["vae"]["psnr_db"], 100 * figures["base_eval"]["right_fraction"])
        return build
    if cells:  # recorded once the build stands, so a failed build leaves out as it was
        out.mkdir(parents=True, exist_ok=True)
        write_text_atomic(out / SETTINGS, json.dumps(settings, indent=2, sort_keys=True) + "\n")
    for _, _, folder in cells:
        if is_done(folder):
            progress.skip(str(folder))  # before the first run, so that the ETA counts only what is left
    records: dict[str, list[dict[str, Any]]] = {}
    earlier = 0  # cells an earlier, stopped `make mini` of out made or began
    for name, seed, folder in cells:
        if not is_done(folder):
            progress.start(str(folder), f"{'evaluate' if name == BASE else 'train + evaluate'} {name} seed {seed}")
            leftover = temporary_folder(folder)
            resumed = resume_point(cfg, build, name, seed, leftover) if name != BASE and leftover.exists() else None
            earlier += resumed is not None
            # a LoRA cell that fails with a checkpoint is left as a kill leaves it, for the next `make mini`
            with step_folder(folder, keep=resumed is not None, spare=None if name == BASE else run_checkpointed) as tmp:
                if name == BASE:
                    run_base(cfg, build, tmp, seed)
                else:
                    run_variant(cfg, build, tmp, list(cfg.runs.variants[name]), seed, resumed)
            progress.finish()
        else:
            earlier += 1
        records.setdefault(name, []).append(read_done(folder))
    report = write_report(out, cfg, build, figures, records, machine(), time.perf_counter() - started, earlier)
    log.info("report: %s", report)
    return report


def check_out_settings(out: Path, settings: dict[str, Any], finished: bool) -> None:
    """``<out>/settings.json`` records the build, ``runs`` and ``eval`` that the runs of ``out`` are made with (written
    by :func:`run` once the build stands); once one run there is ``finished``, a continued ``make mini`` must have the
    same, so that one report never mixes runs made with different settings."""
    path = out / SETTINGS
    if not finished or not path.is_file():
        return
    before = json.loads(path.read_text())
    before, now = without_nulls(before), without_nulls(settings)  # a null is an absent key (eval.guider came later)
    if before != now:
        key, old, new = first_difference(before, now)
        raise ValueError(f"{out} holds runs made with {key}={old}, {new} now: continue it with the same settings, "
                         "or pass out=<new folder> (the build is cached)")


def check_recipe(cfg: DictConfig, build: Path, cells: list[tuple[str, int, Path]]) -> None:
    """Each finished cell of a continued folder was made with the configs this code composes for it now: its run's
    ``run/config.yaml`` against ``experiment=mini`` + its variant and seed, its evaluation's ``eval/config.yaml``
    against the evaluation's overrides (the folders where either ran taken out, a null the same as an absent key).
    A preset or default changed since (a pull, an edited ``conf/``) is refused, so that one report never mixes
    recipes. (A record that a cell has not got, written by older code, is not checked.)"""
    from gridgen.mini.runs import BASE, EVAL_CONFIG, eval_overrides

    for name, seed, folder in cells:
        if not is_done(folder):
            continue
        tmp = temporary_folder(folder)  # where the cell was written, and what its configs name
        if name != BASE and (folder / "run" / "config.yaml").is_file():
            _check_record(folder, "run/config.yaml", "trained", composed_run(cfg, build, name, seed, tmp), build)
        if (folder / "eval" / EVAL_CONFIG).is_file():
            lora = None if name == BASE else tmp / "run"
            composed = compose("evaluate", eval_overrides(cfg, build, tmp, seed, lora), output_dir=tmp / "eval")
            _check_record(folder, f"eval/{EVAL_CONFIG}", "evaluated", composed, build)


def composed_run(cfg: DictConfig, build: Path, name: str, seed: int, tmp: Path) -> DictConfig:
    """The ``gridgen.train`` config of variant ``name``'s run with ``seed``, written in cell folder ``tmp``, as the
    run records it (the attention kernel resolved for this machine)."""
    from gridgen.mini.runs import lora_overrides
    from gridgen.train import run_attention_backend  # Lightning and diffusers: imported only for a run

    overrides = lora_overrides(build, list(cfg.runs.variants[name]), seed, list(cfg.runs.train))
    composed = compose("train", overrides, output_dir=tmp / "run")
    with open_dict(composed):
        composed.model.attention_backend = run_attention_backend(composed)
    return composed


def resume_point(cfg: DictConfig, build: Path, name: str, seed: int, tmp: Path) -> tuple[int, bool] | None:
    """What a cell folder ``tmp`` that a stopped `make mini` left (``.seed<k>.tmp``) gives the next one: its run
    trained with the config composed for it now, and either finished (``summary.json`` at ``trainer.max_steps``, its
    LoRA exported, not ``FAILED``: only the evaluation is made again) or unfinished with a readable ``last.ckpt``
    (the training goes on from it, in place and exactly). Then everything of ``tmp`` but ``run/`` is removed and
    ``(step, finished)`` is returned; else None, and the cell starts again from nothing (one log line why)."""
    from gridgen.models.lora import LORA_FILE
    from gridgen.training.runs import read_checkpoint

    run = tmp / "run"
    last, summary, failed = run / "checkpoints" / "last.ckpt", run / "summary.json", run / "FAILED"
    try:
        if not last.is_file() and not summary.is_file():
            raise ValueError("no checkpoint of its run")
        composed = composed_run(cfg, build, name, seed, tmp)
        difference = _record_difference(run / "config.yaml", composed, build)
        if difference is not None:
            raise ValueError("its run was trained with {}={}, and the config gives {} now".format(*difference))
        max_steps = int(composed.trainer.max_steps)
        exported = (run / "lora" / LORA_FILE).is_file()
        finished = summary.is_file() or exported
        if finished:  # last.ckpt may be older: Lightning saves none at the end after one at an interval
            step = int(json.loads(summary.read_text())["global_step"]) if summary.is_file() else -1
            if step != max_steps or not exported or failed.exists():
                raise ValueError(f"its run ended {'without summary.json' if step < 0 else f'at step {step}'} of "
                                 f"{max_steps}, {'with' if exported else 'without'} its LoRA exported"
                                 f"{', marked FAILED' if failed.exists() else ''}")
        else:
            step = read_checkpoint(str(last), tmp).step  # read with weights_only: one line if truncated or foreign
            if step >= max_steps:
                raise ValueError(f"its run stopped at step {step} of {max_steps} without its LoRA exported")
    except Exception as err:  # noqa: BLE001 - whatever is wrong with a leftover, the cell starts again
        log.info("%s: starting this cell again (%s)", tmp, str(err).splitlines()[0] if str(err) else type(err).__name__)
        return None
    for child in tmp.iterdir():
        if child.name != "run":
            shutil.rmtree(child) if child.is_dir() else child.unlink()
    why = f"; it had failed: {failed.read_text().splitlines()[0]}" if failed.exists() and failed.read_text() else ""
    log.info("%s: %s", tmp, f"its run finished training (step {step}): it is evaluated again" if finished else
             f"its run goes on from the checkpoint of step {step}{why}")
    return step, finished


def _record_difference(recorded: Path, composed: DictConfig, build: Path) -> tuple[str, str, str] | None:
    """The first key (with its value then and now) where ``recorded``, a config a cell wrote when it was made,
    differs from ``composed`` now (the folders where it ran taken out, a null the same as an absent key); None
    when they agree. A file that cannot be read as a config raises ValueError."""
    try:
        then = OmegaConf.to_container(OmegaConf.load(recorded), resolve=False)
        damage = None if isinstance(then, dict) and then else "empty or not a mapping"
    except Exception as err:  # YAML of every kind of damage
        damage = type(err).__name__
    if damage:
        raise ValueError(f"{recorded} cannot be read as a config ({damage})")
    then = without_nulls(_without_paths(then, build))
    now = without_nulls(_without_paths(OmegaConf.to_container(composed, resolve=True), build))
    return first_difference(then, now) if then != now else None


def _check_record(folder: Path, record: str, made: str, composed: DictConfig, build: Path) -> None:
    """``folder/record`` (a config a finished cell recorded when it was ``made``) against ``composed`` now: one
    line naming the first key that differs, or the damage, with the fix."""
    try:
        difference = _record_difference(folder / record, composed, build)
    except ValueError as err:
        raise ValueError(f"{err}: the cell's record is damaged; delete {folder} to make it again, or pass "
                         "out=<new folder>") from None
    if difference is not None:
        key, old, new = difference
        raise ValueError(f"{folder} was {made} with {key}={old}, and the config gives {new} now (the preset, the "
                         f"config it composes or this machine changed since): delete {folder} to make it again "
                         "with this config (a LoRA cell trains again), continue the folder with the code that made "
                         "it, or pass out=<new folder>")


def _without_paths(config: Any, build: Path) -> Any:
    """``config`` with its own ``paths.*`` folders (conf/paths: where a run ran, not how it trained) written as
    ``<paths.key>`` in every string that is one of them or lies under one (the longest first; the root folder ``/`` is
    left as it is), the cell's folder (the parent of ``paths.output_dir``: ``run/`` or ``eval/``) as ``<cell>``, and
    the ``build`` folder (``settings.json`` holds it) as ``<build>``."""
    paths = config.get("paths") or {}
    named = [(v, f"<paths.{k}>") for k, v in paths.items() if isinstance(v, str)] + [(str(build), "<build>")]
    if isinstance(paths.get("output_dir"), str):
        named.append((str(Path(paths["output_dir"]).parent), "<cell>"))
    folders = sorted(((v.rstrip("/"), name) for v, name in named if v.rstrip("/")), key=lambda item: -len(item[0]))

    def strip(value: Any) -> Any:
        if isinstance(value, dict):
            return {k: strip(v) for k, v in value.items()}
        if isinstance(value, list):
            return [strip(v) for v in value]
        if isinstance(value, str):
            for folder, name in folders:
                if value == folder or value.startswith(folder + "/"):
                    return name + value[len(folder):]
        return value

    return strip(config)


ABSENT = object()  # first_difference: a key one side has not got


def first_difference(a: Any, b: Any, key: str = "") -> tuple[str, str, str]:
    """The first dotted key whose value differs between two JSON-like values, with both values as JSON (``absent``
    where one side has not got the key)."""
    if isinstance(a, dict) and isinstance(b, dict):
        for k in sorted(set(a) | set(b)):
            if a.get(k, ABSENT) != b.get(k, ABSENT):
                return first_difference(a.get(k, ABSENT), b.get(k, ABSENT), f"{key}.{k}" if key else k)
    return key, *("absent" if value is ABSENT else json.dumps(value) for value in (a, b))


def machine() -> dict[str, Any]:
    """What the figures were measured on."""
    import torch

    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return {"cpu": cpu, "cores": os.cpu_count(), "torch_threads": torch.get_num_threads(),
            "torch": torch.__version__, "python": platform.python_version(), "gpu": "none (CPU only)"}


def main(argv: list[str] | None = None) -> None:
    from hydra import initialize_config_dir
    from hydra.errors import HydraException
    from omegaconf.errors import OmegaConfBaseException

    logging.basicConfig(level=logging.INFO, format="%(message)s", stream=sys.stdout)
    register_resolvers()
    argv = sys.argv[1:] if argv is None else argv
    show = argv[:2] == ["--cfg", "job"]  # print the composed config and stop, as the @hydra.main entry points do
    argv = argv[2:] if show else argv
    with exit_on_user_error("mini"), initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3",
                                                           job_name="mini"):
        try:
            cfg, default = compose("mini", argv), compose("mini", [])
        except (HydraException, OmegaConfBaseException) as err:  # a bad key or value on the command line
            raise ValueError(str(err).splitlines()[0]) from err
        if show:
            print(OmegaConf.to_yaml(cfg), end="")
            return
        run(cfg, default.build, default.eval)


if __name__ == "__main__":
    main()
