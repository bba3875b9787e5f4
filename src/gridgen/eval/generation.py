"""``eval.generate=true``: make the fake set with the library's :func:`gridgen.inference.pipeline.generate` first.

One generation request per real video (its caption and, for the tasks that take one, its reference frames saved
as PNG) goes into a ``prompts_file``; the evaluation config holds every generate key (``conf/evaluate.yaml``
composes ``conf/generate.yaml``), so the same task row, model, ``lora=``, ``T=`` and ``generate.*`` settings reach
generation in this process, and its output folder is evaluated.
"""

from __future__ import annotations

import json
import logging
import re
from pathlib import Path
from typing import Any

from omegaconf import DictConfig, OmegaConf

from gridgen.eval.io import VideoItem, protocol_frames

log = logging.getLogger(__name__)


def reference_indices(task: DictConfig, frames: int, front_view: int) -> list[int]:
    """Which frames of a real video a task conditions on (its row's ``reference``): none, frame 0 (image; the front
    view for multi-view) or the keyframes (every ``keyframes_every``-th frame)."""
    if task.reference == "image":
        return [front_view if task.kind == "multiview" else 0]
    if task.reference == "keyframes":
        return list(range(0, frames, int(task.get("keyframes_every") or frames)))
    if task.reference == "sequence":
        raise ValueError(f"eval.generate=true: task {task.name} edits a whole input sequence, which evaluation does not "
                         "prepare; generate first and pass eval.fake=<its output folder>")
    return []


def write_generate_requests(real: list[VideoItem], task: DictConfig, folder: Path, frames: int,
                            front_view: int) -> Path:
    """A ``prompts_file`` for generation: one JSON line per real video, its caption and, for the tasks that take
    one, its reference (i2v: frame 0, i2mv: the front view, interpolate: the keyframes) saved as PNG."""
    from PIL import Image

    folder.mkdir(parents=True, exist_ok=True)
    picks = reference_indices(task, frames, front_view)
    lines = []
    for item in real:
        entry: dict[str, Any] = {"prompt": item.caption or ""}
        if picks:
            video = protocol_frames(item.frames(), frames, item.source or item.name)
            refs, stem = [], re.sub(r"[^\w.-]+", "_", item.name)
            for k in picks:
                path = folder / f"{stem}_{k:03d}.png"
                Image.fromarray(video[k].permute(1, 2, 0).numpy()).save(path)  # (3, H, W) -> (H, W, 3)
                refs.append(str(path))
            entry["ref"] = refs if task.reference == "keyframes" else refs[0]
        lines.append(json.dumps(entry))
    path = folder / "requests.jsonl"
    path.write_text("\n".join(lines) + "\n")
    return path


def generate_fake(cfg: DictConfig, out: Path, real: list[VideoItem] | None, world_size: int = 1
                  ) -> tuple[Path, dict[int, str]]:
    """Generate the fake set for ``eval.generate=true``; returns its folder (``generate.out``) and sample index ->
    real video name. A ``prompt=`` or ``prompts_file=`` of the user's replaces the requests made from the real set."""
    from gridgen.inference.pipeline import generate

    if world_size > 1 or int(cfg.eval.devices) > 1:
        raise ValueError("eval.generate=true runs in one process: generate first, then evaluate with eval.devices>1")
    target = Path(str(cfg.generate.out))  # resolved here: by default it names eval.out, which generation lacks
    gen_cfg = OmegaConf.masked_copy(cfg, [key for key in cfg if key != "eval"])
    gen_cfg.generate.out = str(target)
    names: dict[int, str] = {}
    if cfg.prompt is None and cfg.prompts_file is None:
        if real is None:
            raise ValueError("eval.generate=true takes one prompt (and reference) per real video from eval.real: set "
                             "eval.real, or give prompts_file=<file>")
        requests = write_generate_requests(real, cfg.task, out / "generate_requests", int(cfg.eval.frames),
                                           int(cfg.eval.clip.front_view))
        gen_cfg.prompts_file = str(requests)
        names = {k: item.name for k, item in enumerate(real)}
    log.info("generating the fake set in %s (task %s, lora %s)", target, cfg.task.name, cfg.lora)
    generate(gen_cfg)
    return target, names
