"""``eval.generate=true``: make the fake set with ``python -m gridgen.generate`` before evaluating it.

One generation request per real video (its caption and, for the tasks that take one, its reference frames saved
as PNG) goes into a ``prompts_file``; generation runs as its own process, the same command a user would type, so
evaluation loads no generator model and imports no entry point.
"""

from __future__ import annotations

import importlib.util
import json
import logging
import os
import re
import shlex
import subprocess
import sys
from collections import deque
from pathlib import Path
from typing import Any

from omegaconf import DictConfig

from gridgen.eval.io import VideoItem, protocol_frames

log = logging.getLogger(__name__)


class GenerateUnavailableError(ValueError):
    """eval.generate=true without the inference entry point (gridgen.generate / conf/generate.yaml)."""


class GenerateFailedError(ValueError):
    """``gridgen.generate`` stopped with an error (its own one-line message is quoted)."""


def hydra_value(value: str) -> str:
    """A string as one quoted Hydra override value (quotes, trailing backslashes and ``${`` escaped)."""
    value = re.sub(r"(\\+)(?='|$)", lambda m: m.group(1) * 2, value)
    return "'" + value.replace("'", "\\'").replace("${", "\\${") + "'"


def write_generate_requests(real: list[VideoItem], task: DictConfig, folder: Path, frames: int,
                            front_view: int) -> Path:
    """A ``prompts_file`` for gridgen.generate: one JSON line per real video, its caption and, for the tasks that
    take one, its reference (i2v: frame 0, i2mv: the front view, interpolate: the keyframes) saved as PNG."""
    from PIL import Image

    folder.mkdir(parents=True, exist_ok=True)
    stride = int(task.get("keyframes_every") or 0)
    lines = []
    for item in real:
        entry: dict[str, Any] = {"prompt": item.caption or ""}
        if task.name in ("i2v", "i2mv", "interpolate"):
            video = protocol_frames(item.frames(), frames, item.source or item.name)
            picks = {"i2v": [0], "i2mv": [front_view]}.get(task.name) or list(range(0, frames, stride or frames))
            refs, stem = [], re.sub(r"[^\w.-]+", "_", item.name)
            for k in picks:
                path = folder / f"{stem}_{k:03d}.png"
                Image.fromarray(video[k].permute(1, 2, 0).numpy()).save(path)  # (3, H, W) -> (H, W, 3)
                refs.append(str(path))
            entry["ref"] = refs if task.name == "interpolate" else refs[0]
        lines.append(json.dumps(entry))
    path = folder / "requests.jsonl"
    path.write_text("\n".join(lines) + "\n")
    return path


def generate_command(cfg: DictConfig, out: Path, real: list[VideoItem] | None) -> tuple[list[str], dict[int, str]]:
    """The ``gridgen.generate`` arguments for ``eval.generate=true`` and sample index -> real video name."""
    target, task = out / "generated", cfg.eval_task
    args = [f"task={'t2v' if task.name == 't2v_64' else task.name}", f"generate.out={target}",
            f"hydra.run.dir={hydra_value(str(target))}", "hydra.output_subdir=null",
            *(f"paths.{key}={hydra_value(str(cfg.paths[key]))}" for key in ("root_dir", "cache_dir"))]
    if task.name == "t2v_64" and cfg.gen.layout is None:
        args.append("layout=8x8")
    names: dict[int, str] = {}
    if not any(str(o).partition("=")[0] in ("prompt", "prompts_file") for o in cfg.gen.overrides):
        if real is None:
            raise ValueError("eval.generate=true takes one prompt (and reference) per real video from eval.real: set "
                             "eval.real, or give gen.overrides=[prompts_file=<file>]")
        requests = write_generate_requests(real, task, out / "generate_requests", int(cfg.eval.frames),
                                           int(cfg.eval.clip.front_view))
        args.append(f"prompts_file={requests}")
        names = {k: item.name for k, item in enumerate(real)}
    for key, gen_key in (("lora", "lora"), ("T", "T"), ("steps", "generate.steps"), ("layout", "layout"), ("seed", "seed")):
        if cfg.gen[key] is not None:
            args.append(f"{gen_key}={cfg.gen[key]}")
    args += [str(o) for o in cfg.gen.overrides]
    return args, names


def generate_fake(cfg: DictConfig, out: Path, real: list[VideoItem] | None, world_size: int = 1
                  ) -> tuple[Path, dict[int, str]]:
    """Run ``python -m gridgen.generate`` for ``eval.generate=true``; returns its output folder and sample index ->
    real video name. Its progress shows on stderr; an error ends evaluation with generate's own one-line message."""
    hint = "generate the samples first (`python -m gridgen.generate ...`) and pass eval.fake=<its output folder>"
    if importlib.util.find_spec("gridgen.generate") is None:
        raise GenerateUnavailableError(f"eval.generate=true needs gridgen.generate, which this installation does not "
                                       f"have; {hint}")
    if world_size > 1 or int(cfg.eval.devices) > 1:
        raise ValueError("eval.generate=true runs in one process: generate first, then evaluate with eval.devices>1")
    args, names = generate_command(cfg, out, real)
    command = [sys.executable, "-m", "gridgen.generate", *args]
    log.info("generating the fake set: %s", shlex.join(command))
    tail: deque[bytes] = deque(maxlen=64)
    with subprocess.Popen(command, stderr=subprocess.PIPE, env=dict(os.environ)) as proc:
        assert proc.stderr is not None
        while chunk := proc.stderr.read1(4096):  # pass progress bars through, keep the end for the error
            sys.stderr.write(chunk.decode("utf-8", errors="replace"))
            sys.stderr.flush()
            tail.append(chunk)
    if proc.returncode != 0:
        lines = [line for line in b"".join(tail).decode("utf-8", errors="replace").splitlines() if line.strip()]
        said = next((line for line in reversed(lines) if line.startswith("gridgen.generate: error:")),
                    lines[-1] if lines else f"exit code {proc.returncode}")
        raise GenerateFailedError(f"eval.generate=true: generation failed ({said.strip()}); run it alone to see "
                                  f"everything: {shlex.join(['python', '-m', 'gridgen.generate', *args])}")
    return out / "generated", names
