"""Where the Hydra configs live, the task table, OmegaConf resolvers, sweep folder names, and which exceptions
count as user errors."""

from __future__ import annotations

import difflib
import os
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from importlib import resources
from pathlib import Path
from typing import Any

from hydra.experimental.callback import Callback
from omegaconf import DictConfig, OmegaConf, read_write

# The configs are package data (gridgen/conf, in the wheel as in a checkout); GRIDGEN_CONF points elsewhere.
CONF_DIR = Path(os.environ.get("GRIDGEN_CONF") or str(resources.files("gridgen") / "conf"))
# The paper's numbers (tables 1-3) that presets and task rows name; beside the configs.
PAPER_TARGETS = CONF_DIR / "paper_targets.yaml"

# Errors caused by what the user asked for: entry points print them as one line and exit non-zero.
# gridgen's own (ModelNotFoundError, LoraFileError, ...) subclass these, so this module imports no model code
# and data tools start fast.
USER_ERRORS = (ValueError, FileNotFoundError)


@contextmanager
def exit_on_user_error(entry: str) -> Iterator[None]:
    """Bad input ends an entry point with one line ``gridgen.<entry>: error: ...`` and exit code 2, no
    traceback (``GRIDGEN_DEBUG=1`` re-raises for developers)."""
    try:
        yield
    except USER_ERRORS as err:
        if os.environ.get("GRIDGEN_DEBUG"):
            raise
        print(f"gridgen.{entry}: error: {err}", file=sys.stderr, flush=True)
        sys.exit(2)


def check_added_keys(cfg: DictConfig, config_name: str) -> None:
    """Refuse ``+key=value`` for a key the config does not know (``+lora.rnak=4`` would otherwise be stored and
    ignored): one line naming the nearest known key. Known: the keys the config has without the ``+`` overrides,
    and for a node built from ``_target_`` the parameters of that class (``+trainer.limit_train_batches=5``). A new
    entry with its own ``_target_`` (a callback, a logger) and keys under a free-form node (null by default, e.g.
    ``model.compile_options``) are accepted."""
    from hydra import compose
    from hydra.core.hydra_config import HydraConfig

    if not HydraConfig.initialized():
        return  # composed in code (tests, notebooks): no command line to check
    overrides = list(HydraConfig.get().overrides.task)
    added = [o for o in overrides if o.startswith("+") and "=" in o]
    added = [o for o in added if not o.lstrip("+").startswith("hydra.")
             and not (CONF_DIR / o.lstrip("+").partition("=")[0].replace(".", "/")).is_dir()]  # a config group
    if not added:
        return
    base = compose(config_name, overrides=[o for o in overrides if o not in added])
    for override in added:
        key, _, _ = override.lstrip("+").partition("=")
        node, parts, depth = base, key.split("."), 0
        while depth < len(parts) and isinstance(node, DictConfig) and parts[depth] in node:
            node, depth = node[parts[depth]], depth + 1
        if depth == len(parts):
            continue  # the key exists (`++key=` forced it): nothing added
        if not isinstance(node, DictConfig):
            continue  # under a free-form node (null by default) or a value
        value = OmegaConf.select(cfg, ".".join(parts[:depth + 1]))
        if isinstance(value, DictConfig) and "_target_" in value:
            continue  # a new callback/logger/... entry of its own
        known = set(node.keys()) - {"_target_"}
        if "_target_" in node:
            params = _target_parameters(str(node["_target_"]))
            if params is None:
                continue  # the class takes **kwargs
            known |= params
        if parts[depth] in known:
            continue
        where = ".".join(parts[:depth])
        near = difflib.get_close_matches(parts[depth], sorted(known), n=1, cutoff=0.5)
        hint = f"did you mean {'.'.join([*parts[:depth], near[0]])}=...? (without '+': it exists)" if near else \
            f"known keys under {where or 'the top level'}: {', '.join(sorted(known)[:20])}"
        raise ValueError(f"'{override}': '{key}' is not a key gridgen knows, so it would be stored and ignored; {hint}")


def _target_parameters(target: str) -> set[str] | None:
    """The keyword parameters of a ``_target_`` class or function (None: it takes ``**kwargs``)."""
    import importlib
    import inspect

    module, _, name = target.rpartition(".")
    try:
        obj = getattr(importlib.import_module(module), name)
    except (ImportError, AttributeError):
        return None
    params = inspect.signature(obj).parameters.values()
    if any(p.kind is p.VAR_KEYWORD for p in params):
        return None
    return {p.name for p in params}


def task_table() -> dict[str, DictConfig]:
    """The task table: name -> its row, ``conf/task/<name>.yaml`` (kind, layout, conditioning, metrics, ...).

    Training, generation and evaluation read the same row for ``task=<name>``; a wing a task has no use in holds
    null there (``init`` for generation, ``metrics`` for evaluation)."""
    return {path.stem: OmegaConf.load(path) for path in sorted((CONF_DIR / "task").glob("*.yaml"))}


def tasks_with(key: str, kind: str | None = None) -> list[str]:
    """The tasks whose ``key`` is set (``init``: they generate, ``metrics``: they evaluate), of ``kind`` if given."""
    return [name for name, row in task_table().items()
            if row.get(key) is not None and (kind is None or row.get("kind") == kind)]


# Keys that were spelled otherwise on the command line: refused with the new spelling, so an old command stops
# instead of silently meaning something else.
RENAMED = {"lora.path": "lora", "lora.scale": "lora_scale", "generate_task": "task", "eval_task": "task",
           "gen.lora": "lora", "gen.T": "T", "gen.steps": "generate.steps", "gen.layout": "layout", "gen.seed": "seed",
           "gen.overrides": "", "steps": "generate.steps"}  # "": each generate key on its own


def refuse_renamed_keys(argv: list[str]) -> None:
    """One line for a key of :data:`RENAMED` on the command line (read with Hydra's own parser; nothing rewritten)."""
    from hydra.core.override_parser.overrides_parser import OverridesParser
    from hydra.errors import HydraException

    parser = OverridesParser.create()
    for arg in argv:
        if arg.startswith("-") or "=" not in arg:
            continue
        try:
            key = parser.parse_override(arg).key_or_group
        except HydraException:
            continue  # Hydra reports it with its own message
        if key in RENAMED:
            new, value = RENAMED[key], arg.partition("=")[2]
            fix = f"is now spelled {new}: write {new}={value}" if new else \
                "is gone: give each generate key on its own (generate.height=64 export.gif=false ...)"
            raise ValueError(f"'{arg}': {key} {fix}")


class SweepFolderNames(Callback):
    """Hydra callback: a multirun's job folders named by the swept keys only (``lora.rank=8``).

    Folder names are Hydra's ``hydra.job.override_dirname``; at the start of a multirun that sweeps a key this adds
    every key given a single value (``trainer.max_steps=5``) to its ``exclude_keys``, through the Hydra overrides
    every job is composed with. A multirun that sweeps nothing keeps Hydra's name of all its overrides."""

    def on_multirun_start(self, config: DictConfig, **kwargs: Any) -> None:
        from hydra.core.override_parser.overrides_parser import OverridesParser

        overrides = OverridesParser.create().parse_overrides(list(config.hydra.overrides.task))
        if not any(o.is_sweep_override() for o in overrides):
            return
        excluded = [*config.hydra.job.config.override_dirname.exclude_keys,
                    *(o.key_or_group for o in overrides if not o.is_sweep_override())]
        with read_write(config.hydra.overrides):
            config.hydra.overrides.hydra.append(
                f"hydra.job.config.override_dirname.exclude_keys=[{','.join(map(repr, excluded))}]")


def _root_dir() -> str:
    """Where ``outputs/`` goes: ``$GRIDGEN_ROOT`` or the directory the command was started in.

    Not ``${hydra:runtime.cwd}``: ``hydra.sweep.dir`` is resolved before Hydra's runtime exists, so every
    multirun with the default sweep folder failed on it."""
    return os.environ.get("GRIDGEN_ROOT") or os.getcwd()


def run_folder_of_checkpoint(ckpt_path: str | None) -> Path | None:
    """The run folder a ``ckpt_path`` belongs to (``<run>`` or ``<run>/checkpoints/<file>.ckpt``), else None."""
    if ckpt_path in (None, ""):
        return None
    path = Path(str(ckpt_path)).expanduser()
    if path.is_dir() and (path / "checkpoints").is_dir():
        return path.resolve()
    if path.suffix == ".ckpt" and path.parent.name == "checkpoints":
        return path.parent.parent.resolve()
    return None


def resumes_in_place(ckpt_path: str | None) -> Path | None:
    """The run folder a resume continues in, or None for a new folder.

    Only an unfinished run (no ``summary.json``) resumed from its own last checkpoint (``ckpt_path=<run>`` or
    ``<run>/checkpoints/last.ckpt``) continues in place; a finished run, or an older checkpoint, continues in a
    new folder that records its parent, so no later command changes a finished result."""
    folder = run_folder_of_checkpoint(ckpt_path)
    if folder is None:
        return None
    path = Path(str(ckpt_path)).expanduser()
    from_last = path.is_dir() or path.name == "last.ckpt"
    return folder if from_last and not (folder / "summary.json").exists() else None


def _run_dir(ckpt_path: str | None, new_dir: str) -> str:
    """``hydra.run.dir``: an unfinished run resumed from its last checkpoint continues in its own folder."""
    folder = resumes_in_place(ckpt_path)
    return str(folder) if folder is not None else new_dir


def _hydra_subdir(ckpt_path: str | None, stamp: str) -> str:
    """``hydra.output_subdir``: a resume in place keeps Hydra's files (configs, log) apart from the run's own, so
    a resume that fails can remove exactly what it added."""
    return f".hydra/resume-{stamp}" if resumes_in_place(ckpt_path) is not None else ".hydra"


def _log_file(output_subdir: str | None, job_name: str) -> str:
    """The job log: ``train.log``, or ``train.resume-<time>.log`` for a resume in place (a file of its own, as
    Hydra opens it before it creates its output subfolder)."""
    stamp = str(output_subdir).rpartition("/resume-")[2] if "/resume-" in str(output_subdir) else None
    return f"{job_name}.resume-{stamp}.log" if stamp else f"{job_name}.log"


def register_resolvers() -> None:
    from gridgen.data.cards import register_card_resolver  # ${gridgen_card:<name>,<key>}: data cards

    register_card_resolver()
    if not OmegaConf.has_resolver("gridgen_root"):
        OmegaConf.register_new_resolver("gridgen_root", _root_dir)
    if not OmegaConf.has_resolver("gridgen_run_dir"):
        OmegaConf.register_new_resolver("gridgen_run_dir", _run_dir)
    if not OmegaConf.has_resolver("gridgen_hydra_subdir"):
        OmegaConf.register_new_resolver("gridgen_hydra_subdir", _hydra_subdir)
    if not OmegaConf.has_resolver("gridgen_log_file"):
        OmegaConf.register_new_resolver("gridgen_log_file", _log_file)
