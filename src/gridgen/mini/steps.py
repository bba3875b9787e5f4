"""What the miniature's stages share: composing an entry point's config in this process, folders that appear only
once complete, and the progress line with its ETA."""

from __future__ import annotations

import json
import logging
import shutil
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from omegaconf import DictConfig, OmegaConf

log = logging.getLogger("gridgen.mini")

DONE = "done.json"  # written last into every finished step folder


def compose(config_name: str, overrides: Sequence[str], output_dir: Path | None = None) -> DictConfig:
    """An entry point's config (``train``, ``cache``, ``evaluate``) with ``overrides``, as its command line would
    compose it (inside :func:`hydra.initialize_config_dir`, opened by ``gridgen.mini``'s main). ``output_dir``
    stands for the Hydra run folder (``paths.output_dir``), which a composed config has not got."""
    from hydra import compose as hydra_compose

    extra = [f"paths.output_dir={output_dir}"] if output_dir is not None else []
    return hydra_compose(config_name=config_name, overrides=[*overrides, *extra])


def is_done(folder: Path) -> bool:
    return (folder / DONE).is_file()


def read_done(folder: Path) -> dict[str, Any]:
    return json.loads((folder / DONE).read_text())


def temporary_folder(folder: Path) -> Path:
    """Where :func:`step_folder` writes ``folder`` before it stands (``.<name>.tmp`` beside it)."""
    return folder.with_name(f".{folder.name}.tmp")


@contextmanager
def step_folder(folder: Path, keep: bool = False, spare: Callable[[Path], bool] | None = None) -> Iterator[Path]:
    """``with step_folder(target) as tmp:`` write into ``tmp``; it becomes ``target`` only if the block succeeds.

    A leftover of a stopped run (``.<name>.tmp``) is removed first, unless ``keep`` (the caller found it can be
    continued), and so is the folder of a block that fails, unless ``spare(tmp)`` (it holds work to continue, as a
    kill would have left it): neither was ever a result."""
    tmp = temporary_folder(folder)
    if tmp.exists() and not keep:
        shutil.rmtree(tmp)
    tmp.mkdir(parents=True, exist_ok=True)
    try:
        yield tmp
    except BaseException:
        if spare is None or not spare(tmp):
            shutil.rmtree(tmp, ignore_errors=True)
        raise
    tmp.rename(folder)


def write_done(folder: Path, record: dict[str, Any]) -> dict[str, Any]:
    (folder / DONE).write_text(json.dumps(record, indent=2, default=str) + "\n")
    return record


def plain(cfg: Any) -> Any:
    return OmegaConf.to_container(cfg, resolve=True) if isinstance(cfg, DictConfig) else cfg


class Progress:
    """``[mini 3/14 | 4.2 min | eta 21 min] train filmstrip seed 1``: the step count, the time so far and an ETA
    from the measured time of the steps done (each step weighted by its expected share of the work)."""

    def __init__(self, weights: dict[str, float]) -> None:
        self.weights = dict(weights)
        self.done: dict[str, float] = {}
        self.started = time.perf_counter()
        self._current: str | None = None
        self._t0 = 0.0

    def start(self, name: str, text: str) -> None:
        self._current, self._t0 = name, time.perf_counter()
        elapsed = self._t0 - self.started
        rate = (sum(self.done.values()) / sum(self.weights[n] for n in self.done)) if self.done else None
        remaining = sum(w for n, w in self.weights.items() if n not in self.done)
        eta = f"eta {rate * remaining / 60:.0f} min" if rate is not None else "eta after the first step"
        log.info("[mini %d/%d | %.1f min | %s] %s", len(self.done) + 1, len(self.weights), elapsed / 60, eta, text)

    def skip(self, name: str) -> None:
        """A step whose result exists (a cached build, a finished run): it leaves the count and the ETA."""
        self.weights.pop(name, None)

    def finish(self, seconds: float | None = None) -> float:
        took = time.perf_counter() - self._t0 if seconds is None else seconds
        if self._current is not None:
            self.done[self._current] = took
        return took


def without_nulls(value: Any) -> Any:
    """A JSON-like value with its null-valued keys dropped, at every depth: how recorded settings and cache keys
    compare, so that a key added later with a null default leaves the folders made before it valid."""
    if isinstance(value, dict):
        return {k: without_nulls(v) for k, v in value.items() if v is not None}
    return value


def guider_overrides(eval_cfg: Any) -> list[str]:
    """``eval.guider`` as the ``generate.guider`` override of every sampling `make mini` does (none when null)."""
    guider = plain(eval_cfg).get("guider")
    if guider is None:
        return []
    return ["generate.guider={" + ",".join(f"{k}:{json.dumps(v)}" for k, v in guider.items()) + "}"]
