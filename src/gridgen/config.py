"""Where the Hydra configs live, OmegaConf resolvers, and which exceptions count as user errors."""

from __future__ import annotations

import os
import re
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from omegaconf import OmegaConf

# conf/ sits at the repository root (src/gridgen/config.py -> ../../conf); GRIDGEN_CONF overrides it.
CONF_DIR = Path(os.environ.get("GRIDGEN_CONF", Path(__file__).resolve().parents[2] / "conf"))

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


def hydra_quote(value: str) -> str:
    """A string as one Hydra override value: single-quoted, with quotes, trailing backslashes and ``${`` escaped."""
    value = re.sub(r"(\\+)(?='|$)", lambda m: m.group(1) * 2, value)
    return "'" + value.replace("'", "\\'").replace("${", "\\${") + "'"


_SWEEP_VALUE = re.compile(r"^(?:[^=]*,[^=]*|(?:range|choice|glob|interval)\(.*\))$")


def swept_keys(argv: list[str]) -> list[str]:
    """Keys that a multirun command line sweeps (``lora.rank=4,8`` or ``x=range(1,3)``), in order."""
    keys = []
    for arg in argv:
        key, sep, value = arg.partition("=")
        if sep and not key.startswith("hydra.") and _SWEEP_VALUE.match(value):
            keys.append(key.lstrip("+~"))
    return keys


def _sweep_subdir(override_dirname: str, job_num: int) -> str:
    """A sweep job's folder named by the swept overrides only (``lora.rank=8``), not the constant ones."""
    keys = swept_keys(sys.argv[1:])
    parts = [p for p in override_dirname.split(",") if p.partition("=")[0].lstrip("+~") in keys]
    return ",".join(parts) or override_dirname or f"job{job_num}"


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


def _run_dir(ckpt_path: str | None, new_dir: str) -> str:
    """``hydra.run.dir``: a resumed run continues in its own folder (metrics, checkpoints, W&B run, export)."""
    folder = run_folder_of_checkpoint(ckpt_path)
    return str(folder) if folder is not None else new_dir


def register_resolvers() -> None:
    from gridgen.data.cards import register_card_resolver  # ${gridgen_card:<name>,<key>}: data cards

    register_card_resolver()
    if not OmegaConf.has_resolver("gridgen_root"):
        OmegaConf.register_new_resolver("gridgen_root", _root_dir)
    if not OmegaConf.has_resolver("gridgen_run_dir"):
        OmegaConf.register_new_resolver("gridgen_run_dir", _run_dir)
    if not OmegaConf.has_resolver("gridgen_sweep_subdir"):
        OmegaConf.register_new_resolver("gridgen_sweep_subdir", _sweep_subdir)
