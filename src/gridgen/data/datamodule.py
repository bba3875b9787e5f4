"""Streaming grid data: WebDataset shards -> layout-homogeneous batches for Lightning.

Training reads shards with replacement (``ResampledShards``) so the stream never ends and an "epoch" is
defined by ``with_epoch`` as a fixed number of batches per process: every DDP rank takes the same number of
steps whatever the shard sizes are, so no rank waits forever in a collective for a rank that ran dry.
Validation reads its shards once, in order, without shuffling, so two validation passes see the same batches.

A grid batch must be a single tensor, so it can only hold grids of one layout (rows, cols, cell size). Samples
are therefore grouped by layout in a small buffer and a batch is emitted when one layout has ``batch_size``
samples (:func:`batched_by_layout`); batching happens in the dataset and the loader runs with
``batch_size=None``.

Broken samples (a truncated png, a json without a layout, an unreadable shard) are skipped, counted in
:attr:`GridDataModule.num_skipped` (shared with DataLoader workers) and logged, instead of killing a long run.
"""

from __future__ import annotations

import glob
import logging
import multiprocessing
import os
import tarfile
from collections.abc import Callable, Iterable, Iterator, Sequence
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

import lightning as L
import numpy as np
import torch
import webdataset as wds
from webdataset.tariterators import base_plus_ext

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


def count_samples(urls: Iterable[str]) -> int:
    """Number of samples (distinct keys) in local tar shards; reads tar headers only, not the data."""
    total = 0
    for url in urls:
        if _is_remote(url):
            raise ValueError(
                f"cannot count the samples of remote shard {url!r}; set data.samples_per_epoch explicitly"
            )
        keys: set[str] = set()
        try:
            with tarfile.open(url.removeprefix("file:")) as tar:
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


class _ToSample:
    """Decoded webdataset sample -> ``{__key__, pixel_values, caption, layout, extras}``.

    A class rather than a closure so the pipeline pickles into spawned DataLoader workers.
    """

    def __init__(self, image_key: str, caption_key: str, cached: bool, skips: SkipCounter) -> None:
        self.image_key = image_key
        self.caption_key = caption_key
        self.cached = cached
        self.skips = skips

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
            out["pixel_values"] = image.to(torch.float32).div_(127.5).sub_(1.0)  # uint8 [0,255] -> [-1,1]
        else:
            out["layout"] = layout_from_meta(meta)
        if self.cached:
            # seam for cached latents / prompt embeddings: pass decoded tensors through under their keys
            used = {"json", self.caption_key, *image_keys}
            for key, value in sample.items():
                if key.startswith("__") or key in used:
                    continue
                if isinstance(value, np.ndarray):
                    value = torch.from_numpy(value)
                if isinstance(value, torch.Tensor):
                    out[key] = value
        self.skips.ok()
        return out


# ---- the datamodule -------------------------------------------------------------------------------


class GridDataModule(L.LightningDataModule):
    """Streams grid images and captions from WebDataset shards, in batches of one layout each.

    Batches are dicts: ``pixel_values`` float32 ``(B, 3, H, W)`` in ``[-1, 1]``, ``caption`` ``list[str]``,
    ``layout`` ``{rows, cols, cell_height, cell_width}`` (shared by the whole batch), ``__key__`` ``list[str]``,
    plus, with ``cached=True``, any extra decoded tensors (e.g. ``latents.pth``) under their own keys.

    Args:
        train_shards: folder, brace/glob pattern, ``pipe:``/URL string, or a list of these (see
            :func:`resolve_shards`).
        val_shards: same, for validation; ``None`` disables validation.
        batch_size: samples per batch (per process).
        num_workers: DataLoader worker processes; shards are split between them.
        shuffle_buffer: samples held for shuffling (before decoding, so they are still compressed); <= 1: off.
        seed: seeds shard resampling and shuffling; same seed, same world size and workers -> same batches.
        samples_per_epoch: samples per epoch over all processes; default: the number of training samples (read
            from the tar headers of local shards; required for remote shards).
        image_key: the grid image member, alternatives separated by ``;``.
        caption_key: the full-caption member.
        cached: samples carry cached tensors (latents, prompt embeddings); pass them through, image optional.
    """

    def __init__(
        self,
        train_shards: ShardSpec,
        val_shards: ShardSpec | None = None,
        batch_size: int = 2,
        num_workers: int = 0,
        shuffle_buffer: int = 64,
        seed: int = 0,
        samples_per_epoch: int | None = None,
        image_key: str = "png;jpg;jpeg",
        caption_key: str = "txt",
        cached: bool = False,
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
        self.skips = SkipCounter()
        self.train_urls: list[str] | None = None
        self.val_urls: list[str] | None = None
        self.batches_per_epoch: int | None = None

    @property
    def num_skipped(self) -> int:
        """Broken samples/shards skipped so far by this datamodule's loaders (all workers)."""
        return self.skips.count

    # ---- Lightning hooks ------------------------------------------------------------------------
    def setup(self, stage: str | None = None) -> None:
        """Resolve the shard lists (fails here, with a clear message, if shards are missing)."""
        if stage in (None, "fit") and self.train_urls is None:
            self.train_urls = resolve_shards(self.train_shards, "train", name="train_shards")
        if stage in (None, "fit", "validate") and self.val_shards is not None and self.val_urls is None:
            self.val_urls = resolve_shards(self.val_shards, "val", name="val_shards")

    def train_dataloader(self) -> wds.WebLoader:
        """Endless resampled stream cut into epochs of a fixed number of batches per process."""
        self.setup("fit")
        assert self.train_urls is not None
        world_size = self.trainer.world_size if self.trainer is not None else 1
        samples = self.samples_per_epoch or count_samples(self.train_urls)
        # every rank runs exactly this many steps per epoch: ranks stay in lockstep whatever the shards hold
        self.batches_per_epoch = max(1, samples // (self.batch_size * world_size))
        loader = wds.WebLoader(
            self.train_dataset(),
            batch_size=None,  # batches are built by batched_by_layout
            shuffle=False,
            num_workers=self.num_workers,
            # persistent workers keep their ResampledShards epoch counter: a fresh copy per epoch would
            # replay the same shards every epoch
            persistent_workers=self.num_workers > 0,
        )
        log.info(
            "train: %d shards, %d samples/epoch -> %d batches of %d per process (world size %d)",
            len(self.train_urls),
            samples,
            self.batches_per_epoch,
            self.batch_size,
            world_size,
        )
        # with_length tells Lightning (progress bar, schedulers) the epoch length that with_epoch enforces
        return loader.with_epoch(self.batches_per_epoch).with_length(self.batches_per_epoch, silent=True)

    def val_dataloader(self) -> wds.WebLoader | list:
        """Each validation shard once, in order, unshuffled; the last batch of each layout may be partial.

        Shards are not split across DDP ranks: every rank validates the full (small) set, so ranks cannot
        disagree on the number of validation steps and hang in a metric all-reduce.
        """
        self.setup("validate")
        if self.val_urls is None:
            return []  # no validation configured
        return wds.WebLoader(
            self.val_dataset(),
            batch_size=None,
            shuffle=False,
            # workers beyond the shard count would sit idle
            num_workers=min(self.num_workers, len(self.val_urls)),
            persistent_workers=min(self.num_workers, len(self.val_urls)) > 0,
        )

    # ---- pipelines --------------------------------------------------------------------------------
    def _decode_and_batch(self, partial: bool) -> list[Any]:
        """The stages shared by training and validation: decode, build samples, batch by layout."""
        # decode only what the batch uses (unless cached tensors must be passed through)
        only = None if self.cached else [*self.image_key.split(";"), "json", self.caption_key]
        return [
            wds.decode("torchrgb8", handler=self.skips, only=only),
            wds.map(_ToSample(self.image_key, self.caption_key, self.cached, self.skips), handler=self.skips),
            batched_by_layout(self.batch_size, partial=partial),
        ]

    def train_dataset(self) -> wds.DataPipeline:
        """The training pipeline (an endless iterable of batches)."""
        self.setup("fit")
        # ResampledShards(deterministic=True) instead of WebDataset(resampled=True): the latter seeds from the
        # clock; this one from (seed, rank, worker, epoch), so a run is reproducible
        stages: list[Any] = [
            wds.ResampledShards(self.train_urls, seed=self.seed, deterministic=True),
            wds.split_by_node,
            wds.split_by_worker,
            wds.tarfile_to_samples(handler=self.skips),
        ]
        if self.shuffle_buffer > 1:
            # shuffle raw (still compressed) samples: a big buffer costs little memory
            stages.append(wds.shuffle(self.shuffle_buffer, initial=self.shuffle_buffer, seed=self.seed))
        return wds.DataPipeline(*stages, *self._decode_and_batch(partial=False))

    def val_dataset(self) -> wds.DataPipeline:
        """The validation pipeline (a finite, deterministic iterable of batches)."""
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
        return dataset.compose(*self._decode_and_batch(partial=True))
