"""The prepare pipeline behind ``python -m gridgen.prepare`` (and the embedded sample data).

Raw clips, frame folders or multi-view renders -> grid WebDataset shards (:mod:`gridgen.data.shards`):
``source.items()`` lists the inputs, workers turn each into grids (sample frames, fit them to the cells, tile
with :class:`~gridgen.layout.GridLayout`, caption, encode) and the main process writes them in input order,
so the shards depend on the seed and the inputs only, never on the number of workers. Re-running the same
command resumes after the last finished shard.

Configs: ``conf/prepare/prepare.yaml`` and one file per dataset in ``conf/prepare/data/`` whose values come
from the dataset's card in ``data_cards/`` (``${gridgen_card:<name>,<key>}``).
"""

from __future__ import annotations

import hashlib
import json
import logging
import multiprocessing
import time
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from omegaconf import DictConfig, OmegaConf
from tqdm.auto import tqdm

from gridgen.data.captions import Captioner, CaptionTemplates, build_captioner
from gridgen.data.shards import (
    PartShardWriter,
    ResumableShardWriter,
    merge_parts,
    part_of,
)
from gridgen.data.sources import FrameSampling, MultiViewSource, RawItem, SkipInput, build_source, safe_key
from gridgen.data.tiling import IMAGE_FORMATS, encode_image, tile_frames
from gridgen.files import config_hash
from gridgen.layout import GridLayout

log = logging.getLogger(__name__)



class NoSamplesError(ValueError):
    """A prepare run that produced no grid (every input skipped, or no input): a user error, exit code 2."""


# the setting that fixes each skip reason, named in the error of a run that produced nothing
SKIP_FIXES = {
    "missing_caption": 'set data.source.default_caption="<caption>" (used for inputs without one)',
    "too_short": "take consecutive frames (data.sampling.stride=1 data.sampling.fps=null) or a data.layout with "
                 "fewer cells",
    "missing_file": "set data.source.video_root=<the folder the table's paths start from> or "
                    "data.source.path_templates=[...] to where the files are",
    "size_mismatch": "set prepare.resize_mismatched=true to fit such frames to the cell anyway",
    "view_count": "set data.source.num_views=<views per object> and a data.layout with as many cells",
    "duplicate_id": "set data.source.id_column=<a column with one id per row>",
    "unreadable": "no setting reads them: re-download or re-encode those files",
}


def format_counts(counts: dict[str, int]) -> str:
    """``{"too_short": 1, "missing_caption": 3}`` -> ``missing_caption=3, too_short=1`` (most common first)."""
    return ", ".join(f"{k}={v}" for k, v in sorted(counts.items(), key=lambda kv: (-kv[1], kv[0])))


def no_samples_message(counts: dict[str, Any], inputs: int, src: str) -> str:
    """One line for a run that produced no grid: the skip reasons with counts and the fix of the commonest."""
    skipped = counts["skipped"]
    if not skipped:
        return f"prepare.src '{src}' lists no input ({inputs} inputs); point it at the raw data"
    reason = min(skipped, key=lambda k: (-skipped[k], k))
    example = (counts["examples"].get(reason) or [""])[0]
    fix = SKIP_FIXES.get(reason, "see the examples")
    return (f"no grid came out of {inputs} inputs of '{src}' (skipped: {format_counts(skipped)}); most are "
            f"{reason}{f' (e.g. {example})' if example else ''}: {fix}")


def build_layout(data: dict[str, Any]) -> GridLayout:
    """``data.layout`` ("4x6") with ``data.cell_height`` x ``data.cell_width`` px cells, or a one-line error."""
    spec, height, width = data.get("layout"), data.get("cell_height"), data.get("cell_width") or data.get("cell_height")
    try:
        return GridLayout.parse(str(spec), int(height), int(width))
    except (TypeError, ValueError) as exn:
        raise ValueError(f"data.layout={spec} with data.cell_height={height} data.cell_width={width} does not fit: "
                         f"{exn}") from exn


def item_rng(seed: int, item_id: str) -> np.random.Generator:
    """A generator that depends on the seed and the input's id only (not its position or the worker)."""
    digest = hashlib.sha256(item_id.encode("utf-8")).digest()
    return np.random.default_rng(np.random.SeedSequence([seed, *np.frombuffer(digest[:16], dtype=np.uint32)]))


@dataclass
class ItemResult:
    index: int
    samples: list[dict[str, Any]] = field(default_factory=list)
    frames: int = 0
    skipped: str | None = None
    detail: str = ""
    adjusted: str | None = None  # written, but changed on the way (``resized_mismatched``), counted in the manifest


class ItemProcessor:
    """One raw input -> its WebDataset samples (``__key__``, image, ``json``, ``txt``). Runs in the workers."""

    def __init__(self, source: Any, layout: GridLayout, sampling: FrameSampling, templates: CaptionTemplates,
                 captioner: Captioner, *, name: str, seed: int, key_prefix: str = "", image_format: str = "jpg",
                 quality: int = 95, grids_per_clip: int = 1) -> None:
        if image_format not in IMAGE_FORMATS:
            raise ValueError(f"data.shards.format must be one of {IMAGE_FORMATS}, got {image_format!r}")
        if not 1 <= int(quality) <= 100:
            raise ValueError(f"data.shards.quality must be in 1..100, got {quality!r}")
        self.source, self.layout, self.sampling = source, layout, sampling
        self.templates, self.captioner = templates, captioner
        self.name, self.seed, self.key_prefix = name, seed, key_prefix
        self.image_format, self.quality = image_format, int(quality)
        self.numbered = grids_per_clip > 1  # keys get a grid suffix when a clip may give several grids

    def __call__(self, task: tuple[int, RawItem]) -> ItemResult:
        index, item = task
        try:
            return self._process(index, item)
        except SkipInput as skip:
            return ItemResult(index, skipped=skip.reason, detail=skip.detail or item.id)

    def _process(self, index: int, item: RawItem) -> ItemResult:
        layout = self.layout
        caption = None if self.captioner.needs_pixels else self.captioner(item, None, None)  # fail before decoding
        clips = self.source.load(item, layout.cell_height, layout.cell_width, layout.num_cells, self.sampling,
                                 item_rng(self.seed, item.id))
        result = ItemResult(index)
        resized = sum(clip.resized_mismatched for clip in clips)
        if resized:
            result.adjusted, result.detail = "resized_mismatched", f"{item.id}: {resized} frames of another size"
        for grid_index, clip in enumerate(clips):
            grid = tile_frames(clip.frames, layout)  # (H, W, 3), film-strip order
            text = caption if caption is not None else self.captioner(item, clip, grid)
            c_layout, c_content, full = self.templates.compose(layout, text)
            record: dict[str, Any] = {
                **layout.to_dict(), "kind": self.source.kind, "source": self.name, "source_id": item.id,
                "frame_indices": list(clip.frame_indices), "c_layout": c_layout, "c_content": c_content,
            }
            if clip.fps is not None:
                record["fps"] = round(float(clip.fps), 6)
            record.update(clip.extra)
            if item.metadata:
                record["metadata"] = item.metadata
            key = self.key_prefix + safe_key(item.id) + (f"-g{grid_index}" if self.numbered else "")
            result.samples.append({
                "__key__": key,
                self.image_format: encode_image(grid, self.image_format, self.quality),
                "json": json_bytes(record),
                "txt": full.encode("utf-8"),
            })
            result.frames += len(clip.frame_indices)
        return result


def json_bytes(record: dict[str, Any]) -> bytes:
    return json.dumps(record, sort_keys=True).encode("utf-8")


_WORKER: ItemProcessor | None = None


def _init_worker(processor: ItemProcessor) -> None:
    global _WORKER
    import torch

    torch.set_num_threads(1)  # parallelism comes from the processes
    _WORKER = processor


def _run_in_worker(task: tuple[int, RawItem]) -> ItemResult:
    assert _WORKER is not None
    return _WORKER(task)


def run_items(processor: ItemProcessor, tasks: Iterable[tuple[int, RawItem]], workers: int) -> Iterator[ItemResult]:
    """Results in input order, from ``workers`` processes (0: in this process)."""
    if workers <= 0:
        yield from map(processor, tasks)
        return
    methods = multiprocessing.get_all_start_methods()
    context = multiprocessing.get_context("fork" if "fork" in methods else "spawn")
    with context.Pool(workers, initializer=_init_worker, initargs=(processor,)) as pool:
        yield from pool.imap(_run_in_worker, tasks, chunksize=1)


def _container(cfg: DictConfig | dict[str, Any], needs: tuple[str, ...] = ("src", "out")) -> dict[str, Any]:
    if isinstance(cfg, DictConfig):
        for key in needs:
            if OmegaConf.is_missing(cfg.prepare, key):
                raise ValueError(f"prepare.{key} is not set; run `make prepare data=<name> prepare.src=<folder "
                                 "or csv> prepare.out=<folder>`")
        cfg = OmegaConf.to_container(cfg, resolve=True)  # type: ignore[assignment]
    for key in needs:
        if cfg["prepare"].get(key) in (None, "", "???"):
            raise ValueError(f"prepare.{key} is not set; run `make prepare data=<name> prepare.src=<folder or csv> "
                             "prepare.out=<folder>`")
    return cfg  # type: ignore[return-value]


def partition(opts: dict[str, Any]) -> tuple[int, int] | None:
    """``(part, parts)`` of a partitioned run (``prepare.parts=N prepare.part=i``), ``None`` for a whole one."""
    parts, part = opts.get("parts", 1), opts.get("part")
    if not isinstance(parts, int) or isinstance(parts, bool) or parts < 1:
        raise ValueError(f"prepare.parts must be a positive integer, got {parts!r}")
    if part is None:
        if parts > 1 and not opts.get("merge"):
            raise ValueError(f"prepare.parts={parts} needs the part this process writes: prepare.part=<0..{parts - 1}>"
                             f", or all of them with `python -m gridgen.prepare -m ... prepare.part='range(0,{parts})'`")
        return None
    if not isinstance(part, int) or isinstance(part, bool) or not 0 <= part < parts:
        raise ValueError(f"prepare.part must be one of 0..{parts - 1} (prepare.parts={parts}), got {part!r}"
                         + ("; set prepare.parts=<N> to split the inputs into N parts" if parts == 1 else ""))
    return (part, parts) if parts > 1 else None


def merge(cfg: DictConfig | dict[str, Any], rerun: str = "") -> dict[str, Any]:
    """``prepare.merge=true``: check that every part of a partitioned run finished and write the one manifest.

    A missing, failed or unfinished part is a one-line error naming it (and ``rerun``, the command that reruns
    only those parts, with ``{parts}`` for their indices); a set without a single grid is :class:`NoSamplesError`.
    """
    opts = _container(cfg, needs=("out",))["prepare"]
    parts = opts.get("parts", 1)
    out, split = Path(str(opts["out"])).expanduser(), str(opts.get("split", "train"))
    entry = merge_parts(out, split, parts=parts if parts > 1 else None, rerun=rerun)
    return _checked_merge(entry, out)


def _checked_merge(entry: dict[str, Any], out: Path) -> dict[str, Any]:
    counts = entry["counts"]
    if counts["samples"] == 0:
        raise NoSamplesError(no_samples_message(counts, counts["inputs_done"] + counts["skipped"].get("duplicate_id", 0),
                                                str(entry.get("src", out))))
    skipped = counts["skipped"]
    if skipped:
        log.warning("skipped %d of %d inputs: %s (examples in %s)", sum(skipped.values()),
                    counts["inputs_done"] + skipped.get("duplicate_id", 0), format_counts(skipped), out / "manifest.json")
    return entry


def prepare(cfg: DictConfig | dict[str, Any], rerun: str = "") -> dict[str, Any]:
    """Write the shards of ``cfg.data`` from ``cfg.prepare.src`` into ``cfg.prepare.out``; returns the split's
    manifest entry (counts, skipped inputs by reason, shards, throughput).

    A partitioned run (``prepare.parts=N prepare.part=i``) writes only the inputs of part ``i`` (by input id,
    :func:`~gridgen.data.shards.part_of`) into part-named shards and returns that part's record; the part that
    finishes last writes the manifest (:func:`merge`), as does ``prepare.merge=true``. ``rerun``: the command that
    reruns parts (named in a failed merge).
    """
    conf = _container(cfg, needs=())
    conf = _container(conf, needs=("out",) if conf["prepare"].get("merge") else ("src", "out"))
    data, opts = conf["data"], conf["prepare"]
    part = partition(opts)
    if opts.get("merge"):
        if part is not None:
            raise ValueError(f"prepare.merge=true writes the manifest of all parts; drop prepare.part={part[0]}")
        return merge(conf, rerun)
    layout = build_layout(data)
    resize_mismatched = bool(opts.get("resize_mismatched", False))
    source = build_source(data["source"], opts["src"], resize_mismatched)
    if isinstance(source, MultiViewSource) and source.num_views != layout.num_cells:
        raise ValueError(f"data.layout={layout.name} has {layout.num_cells} cells but objects have "
                         f"data.source.num_views={source.num_views} views; use a layout with rows x cols = "
                         f"{source.num_views} (the paper: 4x6)")
    sampling = FrameSampling(**(data.get("sampling") or {}))
    captions = data.get("captions") or {}
    layout_template = captions.get("layout_template")  # "": no c_layout (single images of a text-to-image set)
    templates = CaptionTemplates(CaptionTemplates.layout if layout_template is None else layout_template,
                                 captions.get("content_template") or CaptionTemplates.content)
    captioner = build_captioner(captions.get("captioner", "metadata"), captions.get("vlm"))
    shard_cfg = data.get("shards") or {}
    seed = int(opts.get("seed", 0))
    processor = ItemProcessor(
        source, layout, sampling, templates, captioner, name=data["name"], seed=seed,
        key_prefix=str(data.get("key_prefix") or ""), image_format=shard_cfg.get("format", "jpg"),
        quality=shard_cfg.get("quality", 95), grids_per_clip=sampling.grids_per_clip)

    items = source.items()
    if opts.get("limit"):
        items = items[: int(opts["limit"])]
    inputs_hash = config_hash([item.id for item in items])  # of the whole list: every part of a run shares it
    duplicates = int(getattr(source, "duplicates", 0))
    if part is not None:
        items = [item for item in items if part_of(item.id, part[1]) == part[0]]
        duplicates = duplicates if part[0] == 0 else 0  # dropped while listing: counted once, by part 0
    out, split = Path(str(opts["out"])).expanduser(), str(opts.get("split", "train"))
    record_cfg: dict[str, Any] = {"data": data, "seed": seed}  # what the shards' bytes depend on (not src, workers)
    if resize_mismatched:
        record_cfg["resize_mismatched"] = True
    common = dict(header={"name": data["name"], "kind": source.kind, "layout": layout.to_dict()},
                  config_hash=config_hash(record_cfg), inputs=len(items), inputs_hash=inputs_hash,
                  maxcount=int(shard_cfg.get("maxcount", 1000)), maxsize=float(shard_cfg.get("maxsize", 1e9)),
                  overwrite=bool(opts.get("overwrite", False)))
    writer = (ResumableShardWriter(out, split, **common) if part is None else
              PartShardWriter(out, split, part[0], part[1], **common))
    what = writer.what
    if writer.complete:
        log.info("%s: %s shards are complete (%d samples); nothing to do", out, what, writer.counts["samples"])
        return _merge_if_last(writer, out, split) if part is not None else writer.entry
    writer.add_skips("duplicate_id", duplicates)
    ignored = source.ignored.to_dict()
    if ignored["count"] and (part is None or part[0] == 0):
        log.warning("%d files under %s are not inputs of data.source.kind=%s and were ignored (%s); see "
                    "ignored_files in %s", ignored["count"], opts["src"], data["source"].get("kind"),
                    ", ".join(f"{k}: {v}" for k, v in ignored["by_extension"].items()), out / "manifest.json")
    start = writer.cursor[0]
    if start:
        log.info("resuming %s/%s after input %d of %d", out, what, start, len(items))

    began = time.perf_counter()
    done_before, frames_before = writer.counts["inputs_done"], writer.counts["frames"]
    bar = tqdm(total=len(items), initial=start, unit="clips", desc=f"prepare {data['name']}/{what}",
               disable=not opts.get("progress", True), dynamic_ncols=True, mininterval=0.5)
    try:
        tasks = ((i, items[i]) for i in range(start, len(items)))
        for result in run_items(processor, tasks, int(opts.get("workers", 0))):
            # an input the resumed cursor points into: its first grids are in the last finished shard
            skip_grids = writer.cursor[1] if result.index == writer.cursor[0] else 0
            for grid_index, sample in enumerate(result.samples):
                if grid_index >= skip_grids:
                    writer.write(sample, result.index, grid_index)
            writer.input_done(result.index, len(result.samples), result.frames, result.skipped, result.detail,
                              adjusted=result.adjusted)
            bar.update(1)
            skipped = sum(writer.counts["skipped"].values())
            if skipped:
                bar.set_postfix(skipped=skipped, refresh=False)
    except BaseException as exn:
        if isinstance(writer, PartShardWriter):
            writer.fail(exn)  # named by the merge: which part, and why
        else:
            writer.abort()
        raise
    finally:
        bar.close()
    if part is None and writer.counts["samples"] == 0:  # a run that made nothing failed: the folder goes back
        writer.discard()
        raise NoSamplesError(no_samples_message(writer.counts, len(items) + duplicates, str(opts["src"])))
    elapsed = time.perf_counter() - began
    processed = writer.counts["inputs_done"] - done_before
    entry = writer.close({
        "src": str(opts["src"]), "seed": seed, "config": record_cfg, "ignored_files": ignored,
        "seconds": round(elapsed, 3),
        "clips_per_sec": round(processed / elapsed, 3) if elapsed > 0 else None,
        "frames_per_sec": round((writer.counts["frames"] - frames_before) / elapsed, 3) if elapsed > 0 else None,
    })
    if part is not None:
        return _merge_if_last(writer, out, split)
    skipped = entry["counts"]["skipped"]
    if skipped:  # one line for the run, not one per input (the examples are in the manifest)
        log.warning("skipped %d of %d inputs: %s (examples under splits.%s.counts.examples in %s)",
                    sum(skipped.values()), len(items) + duplicates, format_counts(skipped), split, out / "manifest.json")
    return entry


def _merge_if_last(writer: PartShardWriter, out: Path, split: str) -> dict[str, Any]:
    """After a part: if every part is complete now, write the manifest (the last part to finish does)."""
    merged = merge_parts(out, split, wait=True)
    if merged is None:
        log.info("%s done (%d grids); the manifest is written when every part has finished (by the last one, or "
                 "prepare.merge=true)", writer.what, writer.counts["samples"])
        return writer.entry
    log.info("%s done: every part of %s has finished; %s written", writer.what, split, out / "manifest.json")
    return _checked_merge(merged, out)
