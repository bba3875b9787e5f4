"""Evaluation on the command line and in multiruns: shorthands, sweep folder names, the sweep summary callback.

``python -m gridgen.evaluate -m eval.fake=runs/a/samples,runs/b/samples`` runs one evaluation per value; each job
gets a folder named by its number and the swept values (:func:`eval_sweep_subdir`, registered as the resolver
``gridgen_eval_sweep_subdir`` used by ``conf/evaluate.yaml``), and :class:`EvalSweepSummary` writes
``eval_summary.{md,csv,png}`` in the sweep folder when the multirun ends.
"""

from __future__ import annotations

import logging
import re
import sys
from pathlib import Path
from typing import Any

from hydra.experimental.callback import Callback
from omegaconf import DictConfig, OmegaConf

from gridgen.config import hydra_quote
from gridgen.eval.report import write_sweep_summary

log = logging.getLogger(__name__)

# Command-line shorthands, rewritten before Hydra parses: `task` and `lora` name training config groups too.
SHORTHANDS = {"task": "eval_task", "lora": "gen.lora", "T": "gen.T", "steps": "gen.steps", "layout": "gen.layout",
              "seed": "gen.seed"}


# Shard brace patterns (`val-{000000..000003}.tar`) in these keys are quoted for Hydra, whose grammar reads `{` as a
# dictionary: the shell's quotes (needed against its own brace expansion) are gone by the time Python sees them.
SET_KEYS = ("eval.real", "eval.fake")
_BRACE_RANGE = re.compile(r"\{[^{}$]*(?:\.\.|,)[^{}$]*\}")


def expand_shorthands(argv: list[str]) -> list[str]:
    """``task=i2v`` -> ``eval_task=i2v``, ``lora=x`` -> ``gen.lora=x`` (see :data:`SHORTHANDS`); a brace pattern
    in ``eval.real`` / ``eval.fake`` is quoted for Hydra (each value of a ``-m`` sweep on its own)."""
    expanded = []
    for arg in argv:
        key, sep, value = arg.partition("=")
        key = SHORTHANDS.get(key, key) if sep else key
        if sep and key in SET_KEYS and value[:1] not in ("'", '"') and "${" not in value:
            value = ",".join(hydra_quote(part) if _BRACE_RANGE.search(part) else part
                             for part in split_overrides(value))
        expanded.append(f"{key}={value}" if sep else arg)
    return expanded


def split_overrides(text: str) -> list[str]:
    """``a=1,b=[x,y],c='p,q'`` -> ``["a=1", "b=[x,y]", "c='p,q'"]``: commas inside brackets or quotes stay."""
    parts, depth, quote, current = [], 0, "", []
    for char in text:
        if quote:
            quote = "" if char == quote else quote
        elif char in "'\"":
            quote = char
        elif char in "[{(":
            depth += 1
        elif char in "]})":
            depth -= 1
        elif char == "," and depth == 0:
            parts.append("".join(current))
            current = []
            continue
        current.append(char)
    return [*parts, "".join(current)] if current or parts else []


def swept_keys(argv: list[str]) -> set[str]:
    """Keys that this command line sweeps, as Hydra's own parser sees them (``[a,b]`` is a list, not a sweep)."""
    from hydra.core.override_parser.overrides_parser import OverridesParser
    from hydra.errors import HydraException

    parser, keys = OverridesParser.create(), set()
    for arg in argv:
        if arg.startswith("-") or "=" not in arg or arg.startswith("hydra."):
            continue
        try:
            override = parser.parse_override(arg)
        except HydraException:
            continue
        if override.is_sweep_override():
            keys.add(override.key_or_group)
    return keys


def eval_sweep_subdir(override_dirname: str, job_num: int) -> str:
    """A sweep job's folder: its number and the swept values, paths cut to their last part (``1_eval.fake=bad``).

    Sweeps here mostly vary paths (``eval.fake=runs/a/samples,runs/b/samples``): a slash would nest folders, and
    two paths may end alike, hence the job number in front.
    """
    keys = swept_keys(sys.argv[1:])
    parts = []
    for part in split_overrides(override_dirname):
        key, _, value = part.partition("=")
        if key.lstrip("+~") in keys:
            parts.append(f"{key}={Path(value.strip(chr(39) + chr(34)).rstrip('/')).name if '/' in value else value}")
    return re.sub(r"[^\w.=+@-]+", "_", f"{job_num}_{','.join(parts)}" if parts else f"job{job_num}")


def register_eval_resolvers() -> None:
    """``${gridgen_eval_sweep_subdir:...}`` for ``hydra.sweep.subdir`` in ``conf/evaluate.yaml``."""
    if not OmegaConf.has_resolver("gridgen_eval_sweep_subdir"):
        OmegaConf.register_new_resolver("gridgen_eval_sweep_subdir", eval_sweep_subdir)


class EvalSweepSummary(Callback):
    """Hydra callback: the comparison table across the runs of an evaluation multirun."""

    def on_multirun_end(self, config: DictConfig, **kwargs: Any) -> None:
        try:
            path = write_sweep_summary(Path(config.hydra.sweep.dir))
        except FileNotFoundError as err:  # every job failed: their own errors say why
            log.warning("no evaluation sweep summary: %s", err)
            return
        print(f"sweep summary  {path}", flush=True)  # the multirun's answer to the user (Hydra's entry process)
