"""Streaming grid data: WebDataset shards -> layout-homogeneous batches for Lightning.

Training reads shards with replacement (``ResampledShards``) so the stream never ends and an "epoch" is
defined by ``with_epoch`` as a fixed number of batches per process: every DDP rank takes the same number of
steps whatever the shard sizes are, so no rank waits forever in a collective for a rank that ran dry.
Validation reads its shards once, in order, without shuffling, so two validation passes see the same batches.

A grid batch must be a single tensor, so it can only hold grids of one layout (rows, cols, cell size). Samples
are therefore grouped by layout in a small buffer and a batch is emitted when one layout has ``batch_size``
samples (:func:`batched_by_layout`); batching happens in the dataset and the loader runs with
``batch_size=None``.

Several sources (coarse t2v: WebVid + TikTok) are streamed side by side and mixed sample by sample with
webdataset's own ``RandomMix`` in proportion to their weights (:class:`SeededRandomMix` only makes it
reproducible); each source resamples its own shards, split by node and by worker. A source is a shard spec (a
folder, a brace or glob pattern, a ``pipe:`` command or an s3/gs/http URL) with a weight.

Broken samples (a truncated png, a json without a layout, an unreadable shard) are skipped, counted in
:attr:`GridDataModule.num_skipped` (shared with DataLoader workers), logged, and written to the Lightning
loggers as ``data/skipped`` (summed over ranks), instead of killing a long run.

With ``cached=True`` the shards come from ``make cache`` (:mod:`gridgen.data.cache`): samples carry latents and
text embeddings instead of (or next to) the image, and with ``cache_model`` set a cache built for another model or
max sequence length is refused with one line.
"""

from __future__ import annotations

import glob
import json
import logging
import math
import multiprocessing
import os
import random
import tarfile
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

import lightning as L
import numpy as np
import torch
import webdataset as wds
from webdataset.tariterators import base_plus_ext

from gridgen.data.cache import (
    CACHE_MEMBER,
    CacheMismatchError,
    check_cached_sample,
    load_cached_sample,
    verify_cache_folders,
)
from gridgen.layout import GridLayout

log = logging.getLogger(__name__)

ShardSpec = str | os.PathLike | Sequence[str | os.PathLike]

# keys produced by the sample stage; everything else is an "extra" (e.g. cached latents) passed through
_BATCH_KEYS = ("__key__", "pixel_values", "caption", "layout")
_FIX_HINT = "run `make prepare` or point data.{name} at a folder of WebDataset shards"


# ---- shard lists ----------------------------------------------------------------------------------


def _is_remote(url: str) -> bool:
    """``pipe:...``, ``http://...``, ``s3://...``: anything webdataset opens that is not a local path."""
    scheme = urlparse(url).scheme
    return url.startswith("pipe:") or (len(scheme) > 1 and scheme != "file")  # len>1: not a drive letter


def resolve_shards(spec: ShardSpec, split: str = "train", name: str | None = None) -> list[str]:
    """Expand a shard spec into a list of shard URLs.

    ``spec`` is a folder (every ``{split}-*.tar`` in it, sorted; if there are none, those of its direct
    subfolders, so the root of :func:`~gridgen.data.sample.ensure_sample_shards` works), a brace or glob pattern
    (``.../train-{000000..000003}.tar``), a ``pipe:`` / URL string (passed through unchecked), or a list of any
    of these. Local shards must exist; otherwise a one-line :class:`FileNotFoundError` names the path and the fix.
    ``name`` is the config key mentioned in that message (default ``{split}_shards``).
    """
    hint = _FIX_HINT.format(name=name or f"{split}_shards")
    items = [spec] if isinstance(spec, str | os.PathLike) else list(spec)
    if not items:
        raise FileNotFoundError(f"no {split} shards given (empty list); {hint}")
    urls: list[str] = []
    for item in items:
        text = os.fspath(item)
        if _is_remote(text):
            urls.extend(wds.shardlists.expand_urls(text))
            continue
        text = text.removeprefix("file:")
        path = Path(text).expanduser()
        if path.is_dir():
            pattern = f"{split}-*.tar"
            found = sorted(path.glob(pattern)) or sorted(path.glob(f"*/{pattern}"))
            if not found:
                raise FileNotFoundError(f"no shards matching {pattern!r} in '{path}'; {hint}")
            urls.extend(str(p) for p in found)
            continue
        missing = []
        for expanded in wds.shardlists.expand_urls(str(path)):  # braces (and webdataset's '::' lists)
            if glob.has_magic(expanded):
                matches = sorted(glob.glob(expanded))
                if not matches:
                    raise FileNotFoundError(f"no shards matching '{expanded}'; {hint}")
                urls.extend(matches)
            elif Path(expanded).is_file():
                urls.append(expanded)
            else:
                missing.append(expanded)
        if len(missing) == 1:
            raise FileNotFoundError(f"shard or folder '{missing[0]}' does not exist; {hint}")
        if missing:
            raise FileNotFoundError(
                f"{len(missing)} shards of '{path}' do not exist ('{missing[0]}' ... '{missing[-1]}'); {hint}"
            )
    return urls


def _manifest_counts(folder: Path) -> dict[str, int]:
    """``{shard file name: samples}`` from the folder's ``manifest.json`` (``make prepare``) or ``cache.json``
    (``make cache``); empty if there is neither."""
    counts: dict[str, int] = {}
    for name in ("manifest.json", "cache.json"):
        try:
            manifest = json.loads((folder / name).read_text())
        except (OSError, ValueError):
            continue
        shards = manifest.get("shards")
        if name == "cache.json" and isinstance(shards, dict):
            counts.update({k: int(v["samples"]) for k, v in shards.items() if isinstance(v, dict) and "samples" in v})
        for split in (manifest.get("splits") or {}).values():
            for shard in split.get("shards", []) if isinstance(split, dict) else []:
                if isinstance(shard, dict) and "name" in shard and "samples" in shard:
                    counts[shard["name"]] = int(shard["samples"])
    return counts


def count_samples(urls: Iterable[str]) -> int:
    """Number of samples in local tar shards.

    Taken from the shard folder's manifest (``manifest.json`` of ``make prepare``, ``cache.json`` of ``make
    cache``) when it lists the shard, so that starting a run on 10K shards does not read 10M tar headers;
    otherwise counted from the tar headers (distinct keys), never from the data.
    """
    total = 0
    manifests: dict[Path, dict[str, int]] = {}
    for url in urls:
        if _is_remote(url):
            raise ValueError(
                f"cannot count the samples of remote shard {url!r}; set data.samples_per_epoch explicitly"
            )
        path = Path(url.removeprefix("file:"))
        listed = manifests.setdefault(path.parent, _manifest_counts(path.parent))
        if path.name in listed:
            total += listed[path.name]
            continue
        keys: set[str] = set()
        try:
            with tarfile.open(path) as tar:
                for member in tar:
                    prefix, _ = base_plus_ext(member.name)
                    # "__xyz__" members are webdataset metadata, not samples
                    if member.isreg() and prefix is not None and not Path(member.name).name.startswith("__"):
                        keys.add(prefix)
        except (tarfile.TarError, OSError) as exn:
            # the loader skips what it cannot read too; count what is readable and say so
            log.warning("shard %s is damaged (%s); counting its %d readable samples", url, exn, len(keys))
        total += len(keys)
    return total


# ---- sources and mixing ---------------------------------------------------------------------------


@dataclass(frozen=True)
class Source:
    """One stream of the training mix: its shards and its share of the samples (weights need not sum to 1)."""

    name: str
    shards: ShardSpec
    weight: float = 1.0
    config_key: str = "train_shards"  # where the user sets it, for error messages


def _weight(value: Any, key: str) -> float:
    try:
        weight = float(value)
    except (TypeError, ValueError):
        weight = math.nan
    if not math.isfinite(weight) or weight < 0:
        raise ValueError(f"{key} must be a number >= 0, got {value!r}")
    return weight


def parse_sources(
    train_shards: ShardSpec | None = None,
    sources: Mapping[str, Any] | None = None,
    weights: Sequence[float] | None = None,
) -> list[Source]:
    """The training sources of a data config, with their weights.

    * ``train_shards`` alone: one source (a list of specs is concatenated into it).
    * ``train_shards`` as a list + ``weights``: one source per list entry, one weight each.
    * ``sources``: ``{name: {shards: spec, weight: w}}`` (or ``{name: spec}``, weight 1), named so that
      ``data.sources.tiktok.weight=0.5`` reads as what it does. A weight of 0 drops the source.

    Bad combinations raise one line naming the keys and the fix.
    """
    if sources and train_shards is not None:
        raise ValueError(
            f"data.train_shards and data.sources are both set (sources: {', '.join(map(str, sources))}); "
            "set data.train_shards=null to stream the weighted sources, or use a single-source data config (data=shards)"
        )
    if sources:
        if weights is not None:
            raise ValueError("data.weights weighs the entries of a data.train_shards list; with data.sources give each "
                             "source its own weight (data.sources.<name>.weight=...)")
        parsed = []
        for name, entry in sources.items():
            key = f"data.sources.{name}"
            if entry is None:
                continue  # removed by an override (data.sources.tiktok=null)
            if isinstance(entry, Mapping):
                unknown = set(entry) - {"shards", "weight"}
                if unknown:
                    raise ValueError(f"{key} has unknown keys {sorted(unknown)}; a source has `shards` and `weight`")
                if entry.get("shards") in (None, ""):
                    raise ValueError(f"{key}.shards is not set; point it at the source's shards (a folder, brace "
                                     "pattern, pipe: command or URL)")
                parsed.append(Source(str(name), entry["shards"], _weight(entry.get("weight", 1.0), f"{key}.weight"),
                                     f"sources.{name}.shards"))
            else:
                parsed.append(Source(str(name), entry, 1.0, f"sources.{name}"))
    elif train_shards is not None:
        if weights is None:
            parsed = [Source("train", train_shards)]
        else:
            specs = [train_shards] if isinstance(train_shards, str | os.PathLike) else list(train_shards)
            values = list(weights) if isinstance(weights, Sequence) and not isinstance(weights, str) else [weights]
            if len(values) != len(specs):
                raise ValueError(
                    f"data.weights has {len(values)} value(s) for {len(specs)} data.train_shards entr"
                    f"{'y' if len(specs) == 1 else 'ies'}; give one weight per shard spec, e.g. "
                    f"data.weights=[{','.join(['1'] * len(specs))}]"
                )
            parsed = [Source(f"train_shards[{i}]", spec, _weight(w, f"data.weights[{i}]"), f"train_shards[{i}]")
                      for i, (spec, w) in enumerate(zip(specs, values, strict=True))]
    else:
        raise ValueError("no training data: set data.train_shards=<shards> or data.sources.<name>.shards=<shards> "
                         "(see conf/data/)")
    if not parsed:
        raise ValueError("data.sources is empty; give at least one source with shards and a weight > 0")
    active = [src for src in parsed if src.weight > 0]
    if not active:
        raise ValueError(f"every training source has weight 0 ({', '.join(s.name for s in parsed)}); give at least "
                         "one a weight > 0")
    for src in parsed:
        if src.weight == 0:
            log.info("source %s has weight 0: not streamed", src.name)
    return active


class SeededRandomMix(wds.RandomMix):
    """webdataset's ``RandomMix`` (each sample from source ``i`` with probability ``w_i / sum(w)``), reproducible.

    ``RandomMix`` draws from Python's global ``random``; this runs it on a private generator seeded from
    (seed, rank, worker, epoch), swapped in around each draw, so the same seed gives the same mix and the
    caller's global random state is left alone.
    """

    def __init__(self, datasets: list[Any], probs: list[float], seed: int = 0) -> None:
        super().__init__(datasets, probs=probs, longest=False)
        self.seed = seed
        self.epoch = -1  # like ResampledShards: a new draw every epoch (persistent workers keep the counter)

    def __iter__(self) -> Iterator[Any]:
        self.epoch += 1
        rng = random.Random(wds.utils.make_seed(wds.utils.pytorch_worker_seed(), self.epoch, self.seed))
        mixed = super().__iter__()
        while True:
            outer = random.getstate()
            random.setstate(rng.getstate())
            try:
                sample = next(mixed)
            except StopIteration:
                return
            finally:
                rng.setstate(random.getstate())
                random.setstate(outer)
            yield sample


# ---- pipeline stages ------------------------------------------------------------------------------


class SkipCounter:
    """A webdataset exception handler: skip the broken sample or shard, count it, log it, go on.

    Like ``wds.warn_and_continue`` but with a count shared across DataLoader workers, ``logging`` instead of
    ``warnings``, no 0.5 s sleep per error, and a guard: if ``max_consecutive`` errors happen in a row in one
    process without a single good sample (every shard broken, wrong image key, ...) it raises instead of
    spinning forever on an endless resampled stream.
    """

    def __init__(self, max_consecutive: int = 1000, log_first: int = 10, log_every: int = 100) -> None:
        # a shared-memory integer: workers get it by inheritance when the DataLoader starts them
        self._total = multiprocessing.Value("q", 0)
        self.max_consecutive = max_consecutive
        self.log_first = log_first
        self.log_every = log_every
        self._consecutive = 0  # per process

    @property
    def count(self) -> int:
        """Samples (or shards) skipped so far, in this process and all its DataLoader workers."""
        return int(self._total.value)

    def ok(self) -> None:
        """Record a good sample (resets the consecutive-error guard)."""
        self._consecutive = 0

    def __call__(self, exn: BaseException) -> bool:
        if isinstance(exn, CacheMismatchError):
            raise exn  # a stale cache is the run's configuration, not a broken sample: stop
        with self._total.get_lock():
            self._total.value += 1
            total = self._total.value
        self._consecutive += 1
        message = repr(exn)
        if len(message) > 500:
            message = message[:500] + "..."
        if self._consecutive >= self.max_consecutive:
            raise RuntimeError(
                f"{self._consecutive} samples in a row could not be loaded; the data is unusable "
                f"(check the shards, data.image_key and data.caption_key). Last error: {message}"
            ) from exn
        if total <= self.log_first or total % self.log_every == 0:
            log.warning("skipped a broken sample (%d skipped so far): %s", total, message)
        return True  # continue with the next sample


def layout_from_meta(meta: dict[str, Any], height: int | None = None, width: int | None = None) -> GridLayout:
    """The :class:`GridLayout` of a sample from its json (``rows``, ``cols``, optional cell size).

    Without ``cell_height`` / ``cell_width`` the cell size comes from the image size; with them, the image
    size must agree, so a mislabelled sample is rejected instead of being trained with wrong cell boundaries.
    """
    if "rows" not in meta or "cols" not in meta:
        raise ValueError(f"sample json has no 'rows'/'cols' layout fields (keys: {sorted(meta)})")
    rows, cols = int(meta["rows"]), int(meta["cols"])
    if "cell_height" in meta and "cell_width" in meta:
        layout = GridLayout(rows, cols, int(meta["cell_height"]), int(meta["cell_width"]))
        if height is not None and (layout.height, layout.width) != (height, width):
            raise ValueError(
                f"layout {layout.name} of {layout.cell_height}x{layout.cell_width} px cells needs a "
                f"{layout.height}x{layout.width} image, got {height}x{width}"
            )
        return layout
    if height is None or width is None:
        raise ValueError("sample json has no cell_height/cell_width and there is no image to infer them from")
    return GridLayout.from_image_size(rows, cols, height, width)


def _stack_or_list(values: list[Any]) -> Any:
    """Stack same-shape tensors; anything else stays a list (collated later by whoever knows its format)."""
    if all(isinstance(v, torch.Tensor) for v in values) and len({tuple(v.shape) for v in values}) == 1:
        return torch.stack(values)
    return values


def unit_range(pixels: torch.Tensor) -> torch.Tensor:
    """uint8 ``[0, 255]`` -> float32 ``[-1, 1]`` as ``(pixels - 127.5) / 127.5``: two passes, exact at both ends."""
    return torch.sub(pixels, 127.5).div_(127.5)


def pixels_to_float(batch: dict[str, Any]) -> dict[str, Any]:
    """A batch's uint8 ``pixel_values`` -> float32 ``[-1, 1]`` (in place in the batch dict; floats pass)."""
    pixels = batch.get("pixel_values")
    if isinstance(pixels, torch.Tensor) and pixels.dtype == torch.uint8:
        batch["pixel_values"] = unit_range(pixels)
    return batch


def collate_grid_samples(samples: list[dict[str, Any]]) -> dict[str, Any]:
    """Samples of one layout -> batch ``{pixel_values (B,3,H,W), caption [str], layout {..}, __key__ [str], extras}``."""
    layout = samples[0]["layout"]
    if any(s["layout"] != layout for s in samples):
        raise ValueError(f"a batch mixes layouts: {sorted({s['layout'].name for s in samples})}")
    batch: dict[str, Any] = {
        "__key__": [s["__key__"] for s in samples],
        "caption": [s["caption"] for s in samples],
        "layout": layout.to_dict(),
    }
    if all("pixel_values" in s for s in samples):
        batch["pixel_values"] = torch.stack([s["pixel_values"] for s in samples])
    extras = [k for k in samples[0] if k not in _BATCH_KEYS]
    for key in extras:
        batch[key] = _stack_or_list([s.get(key) for s in samples])
    return batch


def _batched_by_layout(
    data: Iterator[dict[str, Any]],
    batch_size: int,
    partial: bool = True,
    collate: Callable[[list[dict[str, Any]]], Any] = collate_grid_samples,
) -> Iterator[Any]:
    """Group samples by ``sample["layout"]`` and emit a batch whenever one layout has ``batch_size`` samples.

    Each bucket holds fewer than ``batch_size`` samples, so the buffer stays small (layouts x batch_size).
    At the end of a finite stream the partial buckets are emitted in first-seen order if ``partial``.
    """
    buckets: dict[GridLayout, list[dict[str, Any]]] = {}
    for sample in data:
        layout = sample["layout"]
        bucket = buckets.setdefault(layout, [])
        bucket.append(sample)
        if len(bucket) >= batch_size:
            del buckets[layout]
            yield collate(bucket)
    if partial:
        for bucket in buckets.values():
            yield collate(bucket)


batched_by_layout = wds.pipelinefilter(_batched_by_layout)


def decode_cache_member(key: str, data: bytes) -> dict[str, torch.Tensor] | None:
    """webdataset decoder for ``<key>.cache.safetensors`` members (the tensors written by ``make cache``)."""
    return load_cached_sample(data) if key.lower().endswith(".safetensors") else None


class ToSample:
    """Decoded webdataset sample -> ``{__key__, pixel_values, caption, layout, extras}``.

    ``cached``: pass decoded tensors through under their member name (a ``cache.safetensors`` member is unpacked
    into ``latents``, ``prompt_embeds``, ...); the image becomes optional. ``cache_model``: check that cached
    samples were built for this model (:func:`~gridgen.data.cache.check_cached_sample`). ``keep_meta``: keep the
    json as ``meta`` (the cache writer copies it). ``float_pixels=False``: keep the image uint8 (the loaders
    convert it later, see :func:`pixels_to_float`). A class rather than a closure so the pipeline pickles into
    spawned DataLoader workers.
    """

    def __init__(self, image_key: str, caption_key: str, cached: bool, skips: SkipCounter,
                 cache_model: Mapping[str, Any] | None = None, keep_meta: bool = False,
                 float_pixels: bool = True) -> None:
        self.image_key = image_key
        self.caption_key = caption_key
        self.cached = cached
        self.skips = skips
        self.cache_model = dict(cache_model) if cache_model is not None else None
        self.keep_meta = keep_meta
        self.float_pixels = float_pixels

    def __call__(self, sample: dict[str, Any]) -> dict[str, Any]:
        meta = sample.get("json")
        if not isinstance(meta, dict):
            raise ValueError(f"sample {sample.get('__key__')!r} has no json layout metadata")
        if self.caption_key not in sample:
            raise KeyError(f"sample {sample.get('__key__')!r} has no caption {self.caption_key!r}")
        image_keys = self.image_key.split(";")
        # with cached latents a sample may carry no image at all; without them the image is the input
        image = wds.filters.getfirst(sample, image_keys, missing_is_error=not self.cached)
        out: dict[str, Any] = {"__key__": sample["__key__"], "caption": str(sample[self.caption_key]).strip()}
        if image is not None:
            _, height, width = image.shape
            out["layout"] = layout_from_meta(meta, height, width)
            # uint8 [0, 255] -> float [-1, 1] here, or after the hand-over (pixels_to_float): 4x fewer bytes to move
            out["pixel_values"] = unit_range(image) if self.float_pixels else image
        else:
            out["layout"] = layout_from_meta(meta)
        if self.keep_meta:
            out["meta"] = meta
        if self.cached:
            # seam for cached latents / prompt embeddings: pass decoded tensors through under their keys
            used = {"json", self.caption_key, *image_keys}
            for key, value in sample.items():
                if key.startswith("__") or key in used:
                    continue
                if isinstance(value, np.ndarray):
                    value = torch.from_numpy(value)
                if key == CACHE_MEMBER and isinstance(value, dict):
                    out.update(value)  # latents, prompt_embeds, pooled_prompt_embeds, text_mask
                elif isinstance(value, torch.Tensor):
                    out[key] = value
            if self.cache_model is not None:
                check_cached_sample(out["__key__"], meta, out["layout"], out, self.cache_model)
        self.skips.ok()
        return out


# ---- the datamodule -------------------------------------------------------------------------------


class _SkipFirst:
    """A loader whose first iteration skips ``skip`` batches (the part of an epoch trained before a resume)."""

    def __init__(self, loader: Any, skip: int) -> None:
        self.loader, self.skip = loader, skip

    def __len__(self) -> int:
        # the full epoch: Lightning restores how many batches of it ran and counts on from there
        return len(self.loader)

    def __iter__(self) -> Iterator[Any]:
        iterator = iter(self.loader)
        skip, self.skip = self.skip, 0
        for _ in range(skip):
            next(iterator, None)
        yield from iterator


class GridDataModule(L.LightningDataModule):
    """Streams grid images and captions from WebDataset shards, in batches of one layout each.

    Batches are dicts: ``pixel_values`` float32 ``(B, 3, H, W)`` in ``[-1, 1]``, ``caption`` ``list[str]``,
    ``layout`` ``{rows, cols, cell_height, cell_width}`` (shared by the whole batch), ``__key__`` ``list[str]``,
    plus, with ``cached=True``, the cached tensors: ``latents`` ``(B, N, 64)``, ``prompt_embeds`` ``(B, L, D)``,
    ``pooled_prompt_embeds`` ``(B, D)``, ``text_mask`` ``(B, L)`` (and any other decoded tensor under its own key).
    Under a Trainer the loaders yield ``pixel_values`` as uint8 ``[0, 255]`` and :meth:`on_after_batch_transfer`
    makes them float on the device (4x fewer bytes between processes and to the GPU); the module sees float.

    Args:
        train_shards: folder, brace/glob pattern, ``pipe:``/URL string, or a list of these (see
            :func:`resolve_shards`): one source, or one source per entry with ``weights``.
        val_shards: same, for validation; ``None`` disables validation.
        batch_size: samples per batch (per process).
        num_workers: DataLoader worker processes; shards are split between them.
        shuffle_buffer: samples held for shuffling (before decoding, so they are still compressed); <= 1: off.
        seed: seeds shard resampling, mixing and shuffling; same seed, world size and workers -> same batches.
        samples_per_epoch: samples per epoch over all processes; default: the number of training samples (read
            from the tar headers of local shards; required for remote shards).
        image_key: the grid image member, alternatives separated by ``;``.
        caption_key: the full-caption member.
        cached: samples carry cached tensors (latents, prompt embeddings); pass them through, image optional.
        sources: named weighted sources ``{name: {shards, weight}}`` mixed sample by sample (instead of
            ``train_shards``), see :func:`parse_sources`.
        weights: one weight per entry of a ``train_shards`` list.
        cache_model: with ``cached``, the model the cache must have been built for (``name``, ``pretrained``,
            ``revision``, ``variant``, ``max_sequence_length``); ``None``: no check.
    """

    def __init__(
        self,
        train_shards: ShardSpec | None = None,
        val_shards: ShardSpec | None = None,
        batch_size: int = 2,
        num_workers: int = 0,
        shuffle_buffer: int = 64,
        seed: int = 0,
        samples_per_epoch: int | None = None,
        image_key: str = "png;jpg;jpeg",
        caption_key: str = "txt",
        cached: bool = False,
        sources: Mapping[str, Any] | None = None,
        weights: Sequence[float] | None = None,
        cache_model: Mapping[str, Any] | None = None,
    ) -> None:
        super().__init__()
        if batch_size < 1:
            raise ValueError(f"data.batch_size must be >= 1, got {batch_size}")
        if samples_per_epoch is not None and samples_per_epoch < 1:
            raise ValueError(f"data.samples_per_epoch must be >= 1 or null, got {samples_per_epoch}")
        self.train_shards = train_shards
        self.val_shards = val_shards
        self.batch_size = batch_size
        self.num_workers = num_workers
        self.shuffle_buffer = shuffle_buffer
        self.seed = seed
        self.samples_per_epoch = samples_per_epoch
        self.image_key = image_key
        self.caption_key = caption_key
        self.cached = cached
        self.cache_model = dict(cache_model) if cached and cache_model is not None else None
        self.skips = SkipCounter()
        self._source_config = (train_shards, sources, weights)
        self._sources: list[Source] | None = None
        self.source_urls: dict[str, list[str]] | None = None
        self.train_urls: list[str] | None = None
        self.val_urls: list[str] | None = None
        self.batches_per_epoch: int | None = None
        self._skips_logged_at = -1

    @property
    def sources(self) -> list[Source]:
        """The weighted training sources (parsed on first use, so that a bad config fails in ``setup`` inside
        ``trainer.fit``, where the entry point turns it into one line, not inside Hydra's ``instantiate``)."""
        if self._sources is None:
            self._sources = parse_sources(*self._source_config)
        return self._sources

    @property
    def num_skipped(self) -> int:
        """Broken samples/shards skipped so far by this datamodule's loaders (all workers)."""
        return self.skips.count

    # ---- Lightning hooks ------------------------------------------------------------------------
    def setup(self, stage: str | None = None) -> None:
        """Resolve the shard lists and check caches (fails here, with one clear line, on missing or stale data)."""
        if stage in (None, "fit") and self.train_urls is None:
            self.source_urls = {src.name: resolve_shards(src.shards, "train", name=src.config_key)
                                for src in self.sources}
            self.train_urls = [url for urls in self.source_urls.values() for url in urls]
            if self.cache_model is not None:
                verify_cache_folders(self.train_urls, self.cache_model)
        if stage in (None, "fit", "validate") and self.val_shards is not None and self.val_urls is None:
            self.val_urls = resolve_shards(self.val_shards, "val", name="val_shards")
            if self.cache_model is not None:
                verify_cache_folders(self.val_urls, self.cache_model)

    def _on_device_float(self) -> bool:
        """Under a Trainer, uint8 pixels travel to the device and become float there (``on_after_batch_transfer``)."""
        return isinstance(self.trainer, L.Trainer)

    def _to_float_stage(self, loader: wds.WebLoader) -> wds.WebLoader:
        return loader if self._on_device_float() else loader.map(pixels_to_float)

    def on_after_batch_transfer(self, batch: Any, dataloader_idx: int) -> Any:
        """uint8 pixels -> float [-1, 1] on the device; ``data/skipped`` to the loggers every ``log_every_n_steps``."""
        batch = pixels_to_float(batch) if isinstance(batch, dict) else batch
        trainer = self.trainer
        if trainer is None or not trainer.training or not trainer.loggers:
            return batch
        step = trainer.global_step
        if step % max(1, trainer.log_every_n_steps) or step == self._skips_logged_at:
            return batch
        self._skips_logged_at = step
        # every rank gets here at the same step (with_epoch keeps them in lockstep), so the sum cannot hang
        count = torch.tensor(float(self.num_skipped), device=trainer.strategy.root_device)
        total = trainer.strategy.reduce(count, reduce_op="sum")
        if trainer.is_global_zero:
            for logger in trainer.loggers:
                logger.log_metrics({"data/skipped": float(total)}, step=step)
        return batch

    def train_dataloader(self) -> wds.WebLoader:
        """Endless resampled (mixed) stream cut into epochs of a fixed number of batches per process."""
        self.setup("fit")
        assert self.train_urls is not None
        world_size = self.trainer.world_size if self.trainer is not None else 1
        samples = self.samples_per_epoch or count_samples(self.train_urls)
        # every rank runs exactly this many steps per epoch: ranks stay in lockstep whatever the shards hold
        self.batches_per_epoch = max(1, samples // (self.batch_size * world_size))
        # Resume: a restored trainer is at (epoch, step) already. Start the resampling/mixing epoch counters
        # there (set before the workers get their copy) and skip the batches this epoch already consumed, so
        # a resumed run sees the batches an uninterrupted one would.
        epoch, done = 0, 0
        if self.trainer is not None and getattr(self.trainer, "global_step", 0) > 0:
            epoch = self.trainer.current_epoch
            consumed = self.trainer.global_step * self.trainer.accumulate_grad_batches
            done = max(0, consumed - epoch * self.batches_per_epoch)
        dataset = self.train_dataset(float_pixels=False, start_epoch=epoch)
        loader = wds.WebLoader(
            dataset,
            batch_size=None,  # batches are built by batched_by_layout
            shuffle=False,
            num_workers=self.num_workers,
            # persistent workers keep their ResampledShards epoch counter: a fresh copy per epoch would
            # replay the same shards every epoch
            persistent_workers=self.num_workers > 0,
        )
        log.info(
            "train: %s; %d samples/epoch -> %d batches of %d per process (world size %d)",
            ", ".join(f"{name} {len(urls)} shards x{src.weight:g}" for src, (name, urls)
                      in zip(self.sources, self.source_urls.items(), strict=True)),
            samples,
            self.batches_per_epoch,
            self.batch_size,
            world_size,
        )
        # uint8 leaves the workers (4x fewer bytes to hand over and to copy to the GPU); it becomes float on the
        # device under a Trainer, else here in the main process. with_length tells Lightning (progress bar,
        # schedulers) the epoch length that with_epoch enforces.
        loader = self._to_float_stage(loader).with_epoch(self.batches_per_epoch)
        loader = loader.with_length(self.batches_per_epoch, silent=True)
        if done:
            log.info("resuming at epoch %d: skipping the %d batches it already trained on", epoch, done)
            return _SkipFirst(loader, done)
        return loader

    def val_dataloader(self) -> wds.WebLoader | list:
        """Each validation shard once, in order, unshuffled; the last batch of each layout may be partial.

        Shards are not split across DDP ranks: every rank validates the full (small) set, so ranks cannot
        disagree on the number of validation steps and hang in a metric all-reduce.
        """
        self.setup("validate")
        if self.val_urls is None:
            return []  # no validation configured
        return self._to_float_stage(wds.WebLoader(
            self.val_dataset(float_pixels=False),
            batch_size=None,
            shuffle=False,
            # workers beyond the shard count would sit idle
            num_workers=min(self.num_workers, len(self.val_urls)),
            persistent_workers=min(self.num_workers, len(self.val_urls)) > 0,
        ))

    # ---- pipelines --------------------------------------------------------------------------------
    def _decode_and_batch(self, partial: bool, float_pixels: bool = True) -> list[Any]:
        """The stages shared by training and validation: decode, build samples, batch by layout."""
        # decode only what the batch uses (unless cached tensors must be passed through)
        only = None if self.cached else [*self.image_key.split(";"), "json", self.caption_key]
        decoders = [decode_cache_member, "torchrgb8"] if self.cached else ["torchrgb8"]
        to_sample = ToSample(self.image_key, self.caption_key, self.cached, self.skips, self.cache_model,
                             float_pixels=float_pixels)
        return [
            wds.decode(*decoders, handler=self.skips, only=only),
            wds.map(to_sample, handler=self.skips),
            batched_by_layout(self.batch_size, partial=partial),
        ]

    def _source_stream(self, index: int, urls: list[str]) -> wds.DataPipeline:
        """One source's raw samples: its shards resampled forever, split by node and by worker."""
        # ResampledShards(deterministic=True) instead of WebDataset(resampled=True): the latter seeds from the
        # clock; this one from (seed, source, rank, worker, epoch), so a run is reproducible
        seed = self.seed if index == 0 else wds.utils.make_seed(self.seed, index)
        return wds.DataPipeline(
            wds.ResampledShards(urls, seed=seed, deterministic=True),
            wds.split_by_node,
            wds.split_by_worker,
            wds.tarfile_to_samples(handler=self.skips),
        )

    def train_dataset(self, float_pixels: bool = True, start_epoch: int = 0) -> wds.DataPipeline:
        """The training pipeline (an endless iterable of batches); ``float_pixels=False``: uint8 images.

        ``start_epoch``: the epoch its first iteration draws (resume), as if it had been iterated before.
        """
        self.setup("fit")
        assert self.source_urls is not None
        streams = [self._source_stream(i, urls) for i, urls in enumerate(self.source_urls.values())]
        for stream in streams:  # ResampledShards counts epochs from -1 (incremented on each iteration)
            stream.pipeline[0].epoch = start_epoch - 1
        if len(streams) == 1:
            stages: list[Any] = [*streams[0].pipeline]
        else:
            mix = SeededRandomMix(streams, [src.weight for src in self.sources], seed=self.seed)
            mix.epoch = start_epoch - 1
            stages = [mix]
        if self.shuffle_buffer > 1:
            # shuffle raw (still compressed) samples: a big buffer costs little memory
            stages.append(wds.shuffle(self.shuffle_buffer, initial=self.shuffle_buffer, seed=self.seed))
        return wds.DataPipeline(*stages, *self._decode_and_batch(partial=False, float_pixels=float_pixels))

    def val_dataset(self, float_pixels: bool = True) -> wds.DataPipeline:
        """The validation pipeline (a finite, deterministic iterable of batches); ``float_pixels=False``: uint8."""
        self.setup("validate")
        if self.val_urls is None:
            raise ValueError("no validation shards configured (data.val_shards is null)")
        dataset = wds.WebDataset(
            self.val_urls,
            handler=self.skips,
            shardshuffle=False,
            nodesplitter=None,  # every rank sees all of it, see val_dataloader
            workersplitter=wds.split_by_worker,
            empty_check=False,  # a worker may get no shard when there are more workers than shards
        )
        return dataset.compose(*self._decode_and_batch(partial=True, float_pixels=float_pixels))
