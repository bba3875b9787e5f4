"""Evaluation of a generated set against a real one: the pipeline behind ``python -m gridgen.evaluate``.

One pass over the generated videos computes every per-video metric the task asks for (CLIP scores, PSNR /
SSIM, timing) and feeds I3D / C3D in batches; the real set is read for FVD statistics (cached) and for the
references that paired metrics need. With ``eval.devices > 1`` (or under torchrun) each process scores its share
(video k goes to process k mod world size) and the statistics and rows are gathered. Results:
``<eval.out>/<task>.json`` (``metrics`` holds plain numbers, as ``gridgen.report`` reads them) and ``<task>.md``,
a table beside the paper's numbers for the task; optionally ``eval/<metric>`` in W&B.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from omegaconf import DictConfig
from tqdm import tqdm

from gridgen.config import PAPER_TARGETS, tasks_with
from gridgen.eval.clip import (
    ClipEmbedder,
    ClipModelNotFoundError,
    clip_front,
    clip_image_score,
    clip_orbit,
    clip_text_score,
)
from gridgen.eval.frechet import FeatureStats, frechet_distance_from_stats
from gridgen.eval.generation import generate_fake
from gridgen.eval.i3d import INPUT_SIZE, NUM_CLASSES, I3DFeatures
from gridgen.eval.io import VideoItem, list_videos, protocol_frames
from gridgen.eval.metrics import (
    C3DProbabilities,
    C3DWeightsNotFoundError,
    inception_score,
    match_size,
    psnr_per_frame,
    ssim_per_frame,
    temporal_consistency,
)
from gridgen.eval.report import Evaluation, paper_targets, render_table, write_results
from gridgen.eval.world_metrics import WORLD_PROTOCOL, score_cells, summarize
from gridgen.layout import GridLayout
from gridgen.models.attention import apply_attention_backend
from gridgen.runtime import resolve_device, tune_cpu_process, wandb_offline

log = logging.getLogger(__name__)

METRICS = ("fvd", "is", "clip_img", "clip_text", "clip_f", "clip_o", "temporal_consistency", "psnr", "ssim", "time",
           "world")
CLIP_METRICS = {"clip_img", "clip_text", "clip_f", "clip_o", "temporal_consistency"}
PAIRED_METRICS = {"clip_img", "clip_f", "clip_o", "psnr", "ssim"}  # need the real video of the same sample
STATS_VERSION = 1  # bump when feature extraction changes, so cached real-set statistics are not reused


@dataclass
class EvalResult:
    """What :func:`run_evaluation` found and wrote: the metrics, the Markdown table and the result files
    (``table`` and ``paths`` only on rank 0; the other processes return the metrics)."""

    metrics: dict[str, float]
    table: str | None = None
    paths: tuple[Path, Path] | None = None


# ---------------------------------------------------------------------------------------------- distributed
def _rank_world() -> tuple[int, int]:
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def _gather(rows: list[Any]) -> list[Any]:
    """Concatenate a list from every rank (rank order)."""
    rank, world = _rank_world()
    if world == 1:
        return rows
    parts: list[list[Any] | None] = [None] * world
    dist.all_gather_object(parts, rows)
    return [row for part in parts for row in part]


def _setup_device(cfg: DictConfig) -> torch.device:
    """One device per process; with eval.devices > 1 (or under torchrun) Lightning Fabric starts the processes."""
    wanted = str(cfg.eval.device)
    if wanted not in ("auto", "cpu", "cuda"):
        raise ValueError(f"eval.device must be auto, cpu or cuda, got {wanted!r}")
    accelerator = resolve_device(wanted, "eval.device").type
    tune_cpu_process(accelerator)
    devices = int(cfg.eval.devices)
    if devices > 1 or int(os.environ.get("WORLD_SIZE", "1")) > 1:
        from lightning.fabric import Fabric

        fabric = Fabric(accelerator="gpu" if accelerator == "cuda" else "cpu", devices=devices, strategy="ddp")
        fabric.launch()
        return fabric.device
    return torch.device(accelerator)


def _progress(items: list[Any], desc: str, enabled: bool) -> Any:
    return tqdm(items, desc=desc, unit="video", disable=not enabled or _rank_world()[0] != 0, dynamic_ncols=True)


def _pairs(fake: list[VideoItem], real: list[VideoItem], ev: Evaluation) -> dict[str, VideoItem]:
    """fake name -> real item: by name; when no name matches and the counts agree, by order (stated)."""
    by_name = {item.name: item for item in real}
    matched = {f.name: by_name[f.name] for f in fake if f.name in by_name}
    if matched:
        if len(matched) < len(fake):
            ev.notes.append(f"{len(fake) - len(matched)} of {len(fake)} generated videos have no real video of the "
                            "same name; paired metrics use the matched ones only")
        return matched
    if len(fake) == len(real):
        ev.notes.append("generated and real videos share no names; paired metrics pair them in sorted order")
        return {f.name: r for f, r in zip(fake, real, strict=True)}
    return {}


def _stats_key(items: list[VideoItem], cfg: DictConfig, i3d_source: str) -> str:
    """A hash of the real set's files and the FVD protocol: the name of its cached statistics."""
    entries = []
    for source in sorted({item.source.split(":", 1)[0] if ".tar:" in item.source else item.source for item in items}):
        path = Path(source)
        if path.exists():
            stat = path.stat()
            size = stat.st_size if path.is_file() else len(list(path.iterdir()))
            entries.append((source, size, stat.st_mtime_ns))
    i3d = Path(i3d_source)
    payload = {"files": entries, "videos": len(items), "frames": int(cfg.eval.frames), "resize": str(cfg.eval.fvd.resize),
               "i3d": [str(i3d), i3d.stat().st_size if i3d.is_file() else 0], "layout": str(cfg.eval.layout),
               "background": str(cfg.eval.background), "version": STATS_VERSION}
    return hashlib.sha1(json.dumps(payload, sort_keys=True).encode()).hexdigest()[:16]


def _features(items: list[VideoItem], extractor: I3DFeatures, frames: int, batch_size: int, desc: str,
              progress: bool, sizes: set[tuple[int, int]]) -> FeatureStats:
    """I3D statistics of this rank's share of ``items``, merged across ranks."""
    rank, world = _rank_world()
    stats, batch = FeatureStats.empty(NUM_CLASSES), []
    mine = items[rank::world]
    for index, item in enumerate(_progress(mine, desc, progress)):
        clip = protocol_frames(item.frames(), frames, item.source or item.name)
        sizes.add(tuple(clip.shape[-2:]))
        batch.append(clip)
        if len(batch) == batch_size or index == len(mine) - 1:
            stats = stats.update(extractor(batch))
            batch = []
    return stats.all_reduce()


def _real_stats(cfg: DictConfig, real: list[VideoItem] | None, extractor: I3DFeatures, ev: Evaluation,
                sizes: set[tuple[int, int]]) -> FeatureStats:
    spec = str(cfg.eval.real)
    if spec.endswith(".npz"):
        meta = FeatureStats.load_meta(spec)
        expected = {"frames": str(cfg.eval.frames), "resize": str(cfg.eval.fvd.resize)}
        wrong = {k: (meta.get(k), v) for k, v in expected.items() if meta.get(k) not in (None, v)}
        if wrong:
            raise ValueError(f"real statistics '{spec}' were computed with another protocol {wrong} (file, asked)")
        ev.notes.append(f"real-set I3D statistics read from {spec}")
        return FeatureStats.load(spec)
    cache_dir = cfg.eval.fvd.cache_dir
    path = Path(cache_dir) / f"i3d-{_stats_key(real, cfg, extractor.source)}.npz" if cache_dir else None
    if path is not None and path.is_file():
        ev.notes.append(f"real-set I3D statistics reused from the cache {path}")
        return FeatureStats.load(path)
    stats = _features(real, extractor, int(cfg.eval.frames), int(cfg.eval.batch_size), "I3D real", cfg.eval.progress,
                      sizes)
    if path is not None and _rank_world()[0] == 0:
        stats.save(path, frames=str(cfg.eval.frames), resize=str(cfg.eval.fvd.resize), real=spec)
        ev.notes.append(f"real-set I3D statistics cached in {path}")
    return stats


# ---------------------------------------------------------------------------------------------- evaluation
def _check_metrics(cfg: DictConfig) -> list[str]:
    if cfg.task.get("metrics") is None:  # no paper protocol: no frames, no metrics, no numbers to compare with
        raise ValueError(f"task {cfg.task.name} has no evaluation protocol (its row in conf/task has metrics: null); "
                         f"evaluate with task={'|'.join(tasks_with('metrics'))}")
    wanted = [str(m) for m in cfg.eval.metrics]
    unknown = sorted(set(wanted) - set(METRICS))
    if unknown:
        raise ValueError(f"unknown metric(s) {unknown} in eval.metrics; choose from {list(METRICS)}")
    return wanted


def _reference_frame(item: VideoItem, pair: VideoItem | None, index: int, frames: int) -> torch.Tensor | None:
    """The conditioning image of a sample, else frame ``index`` of its real video."""
    if item.reference is not None:
        return item.reference()
    if pair is not None:
        return protocol_frames(pair.frames(), frames, pair.source or pair.name)[index]
    return None


def _score_video(item: VideoItem, video: torch.Tensor, clip_frames: torch.Tensor, pair: VideoItem | None,
                 clip: ClipEmbedder | None, cfg: DictConfig, wanted: list[str]) -> dict[str, Any]:
    """The per-video metrics of one generated video ``(F, 3, H, W)`` (its protocol frames) as a plain dict."""
    frames, stride = int(cfg.eval.frames), cfg.task.get("keyframes_every")
    row: dict[str, Any] = {"name": item.name, "seconds": item.seconds, "frames": int(video.shape[0])}
    if clip is not None:
        emb = clip.images(clip_frames)  # (F, D)
        if "temporal_consistency" in wanted:
            row["temporal_consistency"] = temporal_consistency(emb)
        if "clip_text" in wanted and item.caption:
            row["clip_text"] = clip_text_score(clip.texts([item.caption])[0], emb)
        if "clip_img" in wanted:
            ref = _reference_frame(item, pair, 0, frames)
            if ref is not None:
                row["clip_img"] = clip_image_score(clip.images(ref.unsqueeze(0))[0], emb)
        if {"clip_f", "clip_o"} & set(wanted):
            front = int(cfg.eval.clip.front_view)
            ref = _reference_frame(item, pair, front, frames)
            if ref is not None:
                ref_emb = clip.images(ref.unsqueeze(0))[0]
                row["clip_f"], row["clip_o"] = clip_front(ref_emb, emb, front), clip_orbit(ref_emb, emb)
    if {"psnr", "ssim"} & set(wanted) and pair is not None:
        target = protocol_frames(pair.frames(), frames, pair.source or pair.name)
        pred = match_size(clip_frames, target)
        row["resized"] = pred.shape != clip_frames.shape
        scored = [t for t in range(frames) if not (stride and t % int(stride) == 0)]  # given keyframes: not scored
        data_range = float(cfg.eval.psnr.data_range)
        row["psnr"] = float(psnr_per_frame(pred[scored], target[scored], data_range).mean())
        row["ssim"] = float(ssim_per_frame(pred[scored], target[scored], data_range).mean())
    if "world" in wanted:
        if not item.caption:
            raise ValueError(f"eval.metrics has world, but generated video '{item.source or item.name}' has no prompt; "
                             "evaluate a gridgen.generate output (its manifest.json holds every prompt) or give each "
                             "grid image a <name>.json with its prompt")
        try:
            row["world"] = score_cells(clip_frames.permute(0, 2, 3, 1).numpy(), _layout_cols(cfg), item.caption)
        except ValueError as err:
            raise type(err)(f"generated video '{item.source or item.name}': {err}") from err
    return row


def _layout_cols(cfg: DictConfig) -> int:
    """Cells per grid row of the evaluated videos (the row breaks of the world metrics)."""
    spec = str(cfg.eval.layout or cfg.task.layout)
    layout = GridLayout.parse(spec, 16)
    if layout.num_cells != int(cfg.eval.frames):
        raise ValueError(f"the world metrics read {cfg.eval.frames} frames as a {spec} grid, which has "
                         f"{layout.num_cells} cells; set eval.layout=<rows>x<cols> to the generated grids' layout")
    return layout.cols


def evaluate(cfg: DictConfig) -> dict[str, float]:
    """Compute the task's metrics for ``eval.fake`` against ``eval.real``; write JSON + Markdown; return metrics."""
    return run_evaluation(cfg).metrics


def run_evaluation(cfg: DictConfig) -> EvalResult:
    """:func:`evaluate`, also returning the Markdown table and the paths of the result files (rank 0)."""
    wanted = _check_metrics(cfg)
    task, ec = cfg.task, cfg.eval
    ev = Evaluation(task=str(task.name), target=str(task.target))
    out = Path(ec.out)
    frames = int(ec.frames)
    real_is_stats = ec.real is not None and str(ec.real).endswith(".npz")
    real = list_videos(ec.real, ec.layout, ec.background) if ec.real and not real_is_stats else None
    names: dict[int, str] = {}
    if ec.generate:
        # before _setup_device, so torchrun's WORLD_SIZE counts too: generation must not run once per rank
        world = max(_rank_world()[1], int(os.environ.get("WORLD_SIZE", "1")))
        fake_spec, names = generate_fake(cfg, out, real, world)
    else:
        fake_spec = ec.fake
    if not fake_spec:
        raise ValueError("eval.fake is not set: give the generated videos (a folder of mp4s, of frame folders, or a "
                         "gridgen.generate output), or eval.generate=true")
    device = _setup_device(cfg)
    # CLIP's attention kernel (the I3D and C3D are convolutional); generation set its own above
    attention = apply_attention_backend(cfg.eval.get("attention_backend"), device.type)
    fake = list_videos(fake_spec, ec.layout, ec.background)
    for item in fake:  # generated from the real set: sample k is real video k
        item.name = names.get(item.meta.get("index", -1), item.name)
    ev.inputs = {"fake": str(fake_spec), "real": str(ec.real or "-"), "fake_videos": str(len(fake)),
                 "real_videos": str(len(real)) if real is not None else "-"}
    needs_real = [m for m in wanted if m in ("fvd", "psnr", "ssim")]
    if needs_real and ec.real is None:
        raise ValueError(f"{', '.join(needs_real)} compare against real videos: set eval.real=<shards or folder>")
    if real is not None and len(real) != len(fake):
        ev.notes.append(f"real and generated sets differ in size ({len(real)} real, {len(fake)} generated): FVD uses "
                        "every video of each set, nothing is truncated")
    pairs = _pairs(fake, real, ev) if real is not None and PAIRED_METRICS & set(wanted) else {}

    # ---- models the task needs (a missing optional one is skipped and said so) -----------------------------
    clip = c3d = None
    if CLIP_METRICS & set(wanted):
        try:
            clip = ClipEmbedder(ec.clip.model, device, int(ec.clip.batch_size))
            ev.protocol["clip"] = f"{ec.clip.model} (cosine of L2-normalised embeddings, not x100)"
        except ClipModelNotFoundError as err:
            ev.notes.append(f"not computed: {', '.join(m for m in wanted if m in CLIP_METRICS)} ({err})")
    if "is" in wanted:
        try:
            c3d = C3DProbabilities(ec["is"].c3d, device, tuple(ec["is"].mean) if ec["is"].mean else None,
                                   str(ec["is"].channels), str(ec["is"].outputs))
            ev.protocol["is"] = (f"C3D {ec['is'].c3d}: first 16 frames, 128x171 -> centre 112x112, "
                                 f"{ec['is'].splits} splits")
        except C3DWeightsNotFoundError as err:
            ev.notes.append(f"not computed: is ({err})")
    i3d = I3DFeatures(ec.fvd.i3d, device, str(ec.fvd.resize), ec.fvd.channels_last) if "fvd" in wanted else None

    # ---- one pass over this rank's generated videos --------------------------------------------------------
    rank, world = _rank_world()
    ev.protocol["attention_backend"] = attention
    ev.protocol["processes"] = f"{world} ({device.type})" + (
        f"; video k goes to process k mod {world}, statistics merged" if world > 1 else "")
    rows, probs, batch, sizes = [], [], [], set()
    fake_stats = FeatureStats.empty(NUM_CLASSES)
    mine = fake[rank::world]
    for index, item in enumerate(_progress(mine, f"evaluate {task.name}", ec.progress)):
        video = item.frames()
        clip_frames = protocol_frames(video, frames, item.source or item.name)
        row = _score_video(item, video, clip_frames, pairs.get(item.name), clip, cfg, wanted)
        rows.append(row)
        batch.append(clip_frames)
        sizes.add(tuple(clip_frames.shape[-2:]))
        if len(batch) == int(ec.batch_size) or index == len(mine) - 1:
            if i3d is not None:
                fake_stats = fake_stats.update(i3d(batch))
            if c3d is not None:
                probs.append(c3d(batch))
            batch = []
    rows = _gather(rows)
    ev.counts["videos"] = str(len(rows))

    # ---- set-level metrics --------------------------------------------------------------------------------
    if i3d is not None:
        fake_stats = fake_stats.all_reduce()
        real_stats = _real_stats(cfg, real, i3d, ev, sizes)
        for name, stats in (("real", real_stats), ("generated", fake_stats)):
            if stats.n < 2:
                raise ValueError(f"FVD needs at least 2 {name} videos, got {stats.n}")
        ev.metrics["fvd"] = frechet_distance_from_stats(real_stats, fake_stats)
        ev.metrics["fvd_n_real"], ev.metrics["fvd_n_fake"] = real_stats.n, fake_stats.n
        ev.counts["fvd"] = f"{real_stats.n} real / {fake_stats.n} gen"
        ev.protocol["fvd"] = (f"I3D Kinetics-400 ({i3d.source}), first {frames} frames, resized to {INPUT_SIZE}x"
                              f"{INPUT_SIZE} ({ec.fvd.resize} bilinear), [-1, 1], logits averaged over time"
                              f"{' (network in channels_last_3d)' if i3d.channels_last else ''}; "
                              "Frechet distance in float64, covariance / (N - 1)")
        resized = sorted(s for s in sizes if s != (INPUT_SIZE, INPUT_SIZE))
        if resized:
            ev.notes.append(f"FVD: frames of {', '.join(f'{h}x{w}' for h, w in resized)} px resized to "
                            f"{INPUT_SIZE}x{INPUT_SIZE} per protocol")
        small = " (fewer than the 400 feature dimensions: singular covariances, a value biased by N)" if min(
            real_stats.n, fake_stats.n) < NUM_CLASSES else ""
        ev.notes.append(f"FVD is comparable only at equal N and protocol: here N = {real_stats.n} real / "
                        f"{fake_stats.n} generated{small}")
    if c3d is not None:
        all_probs = torch.cat(_gather(probs))
        splits = int(ec["is"].splits)
        if len(all_probs) < splits:
            raise ValueError(f"IS with {splits} splits needs at least {splits} generated videos, got {len(all_probs)}")
        ev.metrics["is"], ev.metrics["is_std"] = inception_score(all_probs, splits)
        ev.counts["is"] = str(len(all_probs))
    for key in ("clip_img", "clip_text", "clip_f", "clip_o", "temporal_consistency", "psnr", "ssim"):
        values = [r[key] for r in rows if key in r]
        if key not in wanted:
            continue
        if values:
            ev.metrics[key] = sum(values) / len(values)
            ev.counts[key] = str(len(values))
        elif clip is not None or key in ("psnr", "ssim"):
            missing = "captions" if key == "clip_text" else "paired real video or reference image"
            ev.notes.append(f"not computed: {key} (no {missing})")
    if any(r.get("resized") for r in rows):
        ev.notes.append("PSNR/SSIM: generated frames resized (bilinear) to the real frames' size")
    stride = task.get("keyframes_every")
    if {"psnr", "ssim"} & set(wanted):
        ev.protocol["psnr_ssim"] = (f"per frame on RGB in [0, 1] (data_range {ec.psnr.data_range}), then averaged"
                                    + (f"; keyframes every {stride} frames not scored" if stride else ""))
    if "world" in wanted:
        for name, aggregate in summarize([r["world"] for r in rows]).items():
            key = f"world_{name}"
            if aggregate.value is None:
                ev.notes.append(f"not computed: {key} (undefined for all {aggregate.missing} grids it applies to)")
                continue
            ev.metrics[key] = aggregate.value
            ev.counts[key] = f"{aggregate.n}" + (f" ({aggregate.missing} missing)" if aggregate.missing else "")
        ev.protocol["world"] = WORLD_PROTOCOL
    if "time" in wanted:
        timed = [r for r in rows if r["seconds"] is not None]
        if timed:
            ev.metrics["time_per_sequence_s"] = sum(r["seconds"] for r in timed) / len(timed)
            ev.metrics["time_per_frame_s"] = sum(r["seconds"] / r["frames"] for r in timed) / len(timed)
            ev.counts["time_per_sequence_s"] = ev.counts["time_per_frame_s"] = str(len(timed))
        else:
            ev.notes.append("not computed: time (no manifest.json with timing beside the generated videos)")

    if rank != 0:
        return EvalResult(ev.metrics)
    targets = Path(ec.targets) if ec.targets else PAPER_TARGETS
    paper = paper_targets(targets, ev)
    paths = write_results(ev, out, paper)
    if ec.get("wandb") and ec.wandb.get("enabled"):
        log_to_wandb(ev, paper, ec.wandb, out)
    return EvalResult(ev.metrics, render_table(ev, paper), paths)


def log_to_wandb(ev: Evaluation, paper: dict[str, Any], wb: DictConfig, out: Path) -> None:
    """Log ``eval/<metric>`` (and a table beside the paper's numbers) to W&B.

    With ``eval.wandb.run=<training run folder>`` the metrics go into that run's own W&B run (resumed by its
    id, offline unless an API key is set), so a run's dashboard shows its evaluation next to its losses.
    """
    import wandb

    kwargs: dict[str, Any] = {"project": wb.get("project", "gridgen"), "job_type": "eval",
                              "mode": "offline" if wandb_offline() else "online"}
    run_dir = Path(str(wb.run)).expanduser() if wb.get("run") else None
    if run_dir is not None:
        runs = sorted((run_dir / "wandb").glob("*run-*-*"))
        if not runs:
            raise FileNotFoundError(f"eval.wandb.run '{run_dir}' has no W&B run (no wandb/*run-*); pass a training "
                                    "run folder trained with logger=wandb, or leave eval.wandb.run=null")
        kwargs.update(id=runs[-1].name.rsplit("-", 1)[-1], resume="allow", dir=str(run_dir))
    else:
        kwargs.update(dir=str(out), name=f"eval-{ev.task}")
    run = wandb.init(**kwargs)
    numbers = {f"eval/{k}": v for k, v in ev.metrics.items() if isinstance(v, int | float)}
    run.log(numbers)
    def paper_values(metric: str) -> str:  # {variant: value} of the paper's rows for this metric
        return json.dumps({variant: row[metric] for variant, row in paper.items()
                           if isinstance(row, dict) and metric in row})

    rows = [[k, v, paper_values(k.removeprefix("eval/"))] for k, v in sorted(numbers.items())]
    run.log({f"eval/{ev.task}_table": wandb.Table(columns=["metric", "ours", "paper"], data=rows)})
    run.finish()


