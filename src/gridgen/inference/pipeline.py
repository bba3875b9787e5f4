"""Omni inference as a library: a generate config -> grids sampled with FLUX (eqs. 8-11), exported with a manifest.

``gridgen.generate`` (``make generate``) is the command line around :func:`generate`.
"""

from __future__ import annotations

import json
import logging
import re
import time
from pathlib import Path
from typing import Any

import torch
from omegaconf import DictConfig, OmegaConf
from safetensors.torch import save_file
from tqdm.auto import tqdm

import gridgen
from gridgen.cameras import camera_circle
from gridgen.config import task_table, tasks_with
from gridgen.inference.budget import ALLOW_KEY, measure_grid_cost, oversize, refusal
from gridgen.inference.export import export_sample, to_uint8, write_manifest
from gridgen.inference.sampler import (
    MASK_MODES,
    GridSampler,
    check_strength,
    check_time_shift,
    check_true_cfg,
    make_guider,
)
from gridgen.inference.tasks import (
    SampleRequest,
    TaskSpec,
    initial_frames,
    keep_tokens,
    read_requests,
    reference_frames,
    resolve_layout,
)
from gridgen.models.builder import FrozenLora, build_flux
from gridgen.models.loading import check_transformer_folder, parse_dtype
from gridgen.models.lora import check_lora_file
from gridgen.runtime import resolve_device, tune_cpu_process

log = logging.getLogger(__name__)


def _slug(text: str, limit: int = 40) -> str:
    return re.sub(r"[^a-z0-9]+", "-", text.lower()).strip("-")[:limit].rstrip("-") or "sample"


def _plain(cfg: Any) -> Any:
    return OmegaConf.to_container(cfg, resolve=True) if OmegaConf.is_config(cfg) else cfg


def check_config(cfg: DictConfig) -> tuple[TaskSpec, float]:
    """Everything that can be wrong with the request alone, before any weights load."""
    spec = TaskSpec.from_config(cfg.task)
    T = check_strength(cfg.T)
    if T < 1.0 and spec.init == "noise":
        raise ValueError(f"task {spec.name} starts from pure noise, so T must be 1, got T={T}; "
                         "T < 1 needs a reference grid (i2v, interpolate, i2mv, edit, style, restore)")
    if cfg.mask.mode not in MASK_MODES:
        raise ValueError(f"mask.mode must be one of {list(MASK_MODES)}, got {cfg.mask.mode!r}")
    if int(cfg.generate.steps) < 1 or int(cfg.generate.batch_size) < 1:
        raise ValueError(f"generate.steps and generate.batch_size must be >= 1, got {cfg.generate.steps} and "
                         f"{cfg.generate.batch_size}")
    check_true_cfg(cfg.generate.get("true_cfg_scale", 1.0))
    make_guider(_plain(cfg.generate.get("guider")), cfg.generate.get("true_cfg_scale", 1.0))  # refusals, before loading
    check_time_shift(cfg.generate.get("time_shift"))
    if not 0 < float(cfg.ref_fit.min_kept) <= 1:
        raise ValueError(f"ref_fit.min_kept must be in (0, 1], got {cfg.ref_fit.min_kept}")
    if cfg.lora is not None and not isinstance(cfg.lora, str):
        raise ValueError(f"lora= takes the LoRA file or run folder itself, got {_plain(cfg.lora)!r}; its scale is "
                         "lora_scale=")
    if cfg.lora:
        check_lora_file(cfg.lora)  # a missing, corrupt or foreign file fails here, before weights load
    if cfg.model.get("transformer"):
        check_transformer_folder(cfg.model.transformer)  # e.g. <run>/transformer of an adapter=full run
    return spec, T


def lora_task_mismatch(lora_task: str | None, spec: TaskSpec) -> str | None:
    """The warning for a LoRA trained for the other kind of grid (multi-view vs video) than ``spec``, else None."""
    row = task_table().get(str(lora_task)) if lora_task else None
    lora_kind = row.get("kind") if row is not None else None
    if lora_kind is None or lora_kind == spec.kind:
        return None
    fitting = tasks_with("init", lora_kind)
    return (f"LoRA was trained for task {lora_task}, generating {spec.name}: it learned {lora_kind} grids, not "
            f"{spec.kind} ones; use it with task={'|'.join(fitting)} or pick a LoRA trained for a {spec.kind} task")


def generate(cfg: DictConfig) -> dict[str, Any]:
    """Generate one grid per request in ``cfg`` and export it; returns the manifest (also in ``manifest.json``)."""
    started = time.perf_counter()
    spec, T = check_config(cfg)
    gen = cfg.generate
    height = gen.height or (gen.grid_heights or {}).get(cfg.model.name, 1024)
    layout = resolve_layout(cfg.layout, int(height), None if gen.width is None else int(gen.width))
    requests = read_requests(cfg.prompt, cfg.prompts_file, _plain(cfg.ref), cfg.seed)

    # References -> initial grids and kept cells, once per distinct ref (bad input fails before the model loads)
    starts: dict[str, tuple[torch.Tensor | None, torch.Tensor]] = {}
    for request in requests:
        key = json.dumps(request.ref)
        if key not in starts:
            frames = reference_frames(spec, layout, request.ref, float(cfg.ref_fit.min_kept))
            starts[key] = initial_frames(spec, layout, frames)

    device, dtype = resolve_device(gen.device, "generate.device"), parse_dtype(gen.dtype)
    tune_cpu_process(device)
    load_started = time.perf_counter()
    pipe, built = build_flux(cfg.model, lora=FrozenLora(cfg.lora, float(cfg.lora_scale)) if cfg.lora else None,
                             device=device, dtype=dtype, attention_device=device.type)
    pipe.set_progress_bar_config(disable=True)
    lora, attention = built.lora, built.attention
    if lora and (mismatch := lora_task_mismatch(lora.get("gridgen_task"), spec)):
        log.warning(mismatch)
    sampler = GridSampler(pipe, int(gen.max_sequence_length))
    true_cfg = check_true_cfg(gen.get("true_cfg_scale", 1.0))  # FluxPipeline's true CFG with generate.negative_prompt
    time_shift = check_time_shift(gen.get("time_shift"))  # None: FLUX's resolution shift
    guider = _plain(gen.get("guider"))  # None: FluxPipeline's true CFG; else a diffusers guider (make_guider)
    guide = {"guidance": float(gen.guidance), "true_cfg_scale": true_cfg, "time_shift": time_shift, "guider": guider,
             "negative": sampler.encode_text([str(gen.get("negative_prompt") or "")]) if true_cfg > 1 else None}
    if reasons := oversize(layout, gen.large):
        if not gen.allow_large:  # refused before anything is written, with what it would cost
            cost = measure_grid_cost(sampler, layout, spec.caption(layout, requests[0].prompt), requests[0].seed,
                                     export=cfg.export, out=Path(str(gen.out)),
                                     **{**guide, "guider": None})  # both halves: a guider's interval costs at most that
            raise refusal(layout, reasons, cost, int(gen.steps), len(requests))
        log.info("large generation allowed (%s=true): %s", ALLOW_KEY, "; ".join(reasons))
    encoded = {key: (None if frames is None else sampler.encode_grid(layout.tile(frames)[None].to(dtype)),  # (1, N, 64)
                     keep_tokens(layout, keep) if keep.any() else None)  # (1, N, 1)
               for key, (frames, keep) in starts.items()}
    load_s = time.perf_counter() - load_started
    out = Path(str(gen.out)).expanduser()
    out.mkdir(parents=True, exist_ok=True)

    cameras = None
    if spec.kind == "multiview":
        step = cfg.cameras.step_deg  # null: Table 5's 360 / (views - 1)
        cameras = camera_circle(layout.num_cells, float(cfg.cameras.radius), "table5" if step is None else float(step),
                                float(cfg.cameras.elevation_deg), float(cfg.cameras.start_deg))
    manifest: dict[str, Any] = {
        "gridgen_version": gridgen.__version__,
        "task": spec.name, "kind": spec.kind, "layout": {"name": layout.name, **layout.to_dict(),
                                                         "height": layout.height, "width": layout.width},
        "T": T, "steps": int(gen.steps), "time_shift": time_shift, "guidance": float(gen.guidance),
        "true_cfg_scale": true_cfg, "guider": guider,
        "negative_prompt": str(gen.get("negative_prompt") or "") if true_cfg > 1 else None,
        "mask": cfg.mask.mode if spec.keep != "none" else None,
        "model": {"name": cfg.model.name, "pretrained": str(cfg.model.pretrained),
                  "transformer": None if cfg.model.get("transformer") is None else str(cfg.model.transformer),
                  "dtype": str(dtype).removeprefix("torch."),
                  "attention_backend": attention, "compile": bool(cfg.model.get("compile")),
                  "quantization": cfg.model.get("quantization")},
        "device": str(device), "lora": lora, "out": str(out), "samples": [],
        "timing": {"load_s": round(load_s, 4)}, "config": _plain(cfg),
    }
    batch_size = int(gen.batch_size)
    bar = tqdm(total=len(requests), desc=f"{spec.name} {layout.name}", unit="grid", disable=not gen.progress)
    # Per grid: sample_s = text encoding + sampling + VAE decode (the paper's inference time, what evaluation
    # reads); export_s = writing its files; total_s = its share of the whole batch (what the bar shows).
    sampling_s = export_s = loop_s = 0.0
    for first in range(0, len(requests), batch_size):
        batch: list[SampleRequest] = requests[first:first + batch_size]
        batch_started = time.perf_counter()
        captions = [spec.caption(layout, r.prompt) for r in batch]
        starts_of_batch = [encoded[json.dumps(r.ref)] for r in batch]
        init = None if spec.init == "noise" else torch.cat([s[0] for s in starts_of_batch])  # (B, N, 64)
        keep = None if starts_of_batch[0][1] is None else torch.cat([s[1] for s in starts_of_batch])  # (B, N, 1)
        text = sampler.encode_text(captions)
        latents = sampler.sample(layout, text, [r.seed for r in batch], steps=int(gen.steps), T=T,
                                 init=init, keep=keep, mask_mode=cfg.mask.mode, **guide)
        if not (finite := torch.isfinite(latents).flatten(1).all(1)).all():  # a NaN would decode to a grid-like PNG
            bad = [r.prompt for r, ok in zip(batch, finite.tolist(), strict=True) if not ok]
            raise ValueError(f"sampling gave non-finite latents (NaN/inf) for {bad}; nothing is written for them: "
                             f"lower generate.true_cfg_scale ({true_cfg:g}) or change generate.guider ({guider}), "
                             f"or sample in float32 (model.dtype={cfg.model.dtype})")
        grids = to_uint8(sampler.decode(latents, layout))  # (B, H, W, 3)
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        batch_s = time.perf_counter() - batch_started
        sampling_s += batch_s
        records = []
        for k, (request, caption) in enumerate(zip(batch, captions, strict=True)):
            export_started = time.perf_counter()
            folder = out / f"{request.index:03d}_{_slug(request.prompt)}"
            files = export_sample(folder, grids[k], layout, spec.kind, int(cfg.export.fps), bool(cfg.export.frames),
                                  bool(cfg.export.mp4), bool(cfg.export.gif), cameras)
            if cfg.export.latents:
                tensors = {"latents": latents[k].float().cpu().contiguous()}
                if init is not None:
                    tensors["init"] = init[k].float().cpu().contiguous()
                if keep is not None:
                    tensors["keep"] = keep[k].cpu().contiguous()
                save_file(tensors, folder / "latents.safetensors")
                files["latents"] = f"{folder.name}/latents.safetensors"
            sample_export_s = time.perf_counter() - export_started
            export_s += sample_export_s
            records.append({
                "index": request.index, "prompt": request.prompt, "caption": caption, "seed": request.seed,
                "ref": request.ref, "folder": folder.name, "files": files,
                "timing": {"sample_s": round(batch_s / len(batch), 4),
                           "per_frame_s": round(batch_s / len(batch) / layout.num_cells, 5),
                           "export_s": round(sample_export_s, 4)},
            })
            bar.update()
        manifest["samples"].extend(records)
        write_manifest(out / "manifest.json", manifest)  # after every batch: an interrupted run keeps its record
        batch_total_s = time.perf_counter() - batch_started
        loop_s += batch_total_s
        for record in records:
            record["timing"]["total_s"] = round(batch_total_s / len(batch), 4)
    bar.close()
    count = len(requests)
    manifest["timing"].update({
        "sampling_s": round(sampling_s, 4), "per_grid_s": round(sampling_s / count, 4),
        "per_frame_s": round(sampling_s / count / layout.num_cells, 5),
        "export_s": round(export_s, 4), "per_grid_export_s": round(export_s / count, 4),
        "per_grid_total_s": round(loop_s / count, 4),
        "total_s": round(time.perf_counter() - started, 4),
    })
    write_manifest(out / "manifest.json", manifest)
    return manifest
