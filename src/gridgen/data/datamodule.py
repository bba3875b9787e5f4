"""Streaming grid data for Lightning: :class:`GridDataModule` (WebDataset shards -> layout-homogeneous batches).

Training reads shards with replacement (``ResampledShards``) so the stream never ends and an "epoch" is
defined by ``with_epoch`` as a fixed number of batches per process: every DDP rank takes the same number of
steps whatever the shard sizes are, so no rank waits forever in a collective for a rank that ran dry.
Validation reads its shards once, in order, without shuffling, so two validation passes see the same batches.

The pieces live by concern: shard specs, counting and the quick shard check in :mod:`.shardlists`, weighted
sources, their seeded mix and the resume position in :mod:`.mixing`, safe member decoding, samples and batching
by layout in :mod:`.decoding`, the cache format in :mod:`.cache_format`. Their public names are importable from
here too.

Before the first step (``prepare_data``, then ``setup``): the embedded sample data is built if the config points
at it and it is missing (``sample_data_root``); every local shard must be a tar file with samples, and the first
shard of each source (and of validation) must yield a trainable sample (a layout FLUX can take: cells multiples
of 16 px; with ``cached=True`` readable tensors built for this model). Each failure is one line naming the shard
and the fix. During training broken samples are skipped, counted in :attr:`GridDataModule.num_skipped` (shared
with DataLoader workers) and written to the loggers as ``data/skipped`` (summed over ranks); shard members of
formats gridgen does not read are dropped unread (``data/ignored_members``): nothing in a shard is unpickled.
``pipe:`` shard specs run a shell command and need ``allow_pipe=True`` (``data.allow_pipe=true``).
"""

from __future__ import annotations

import itertools
import logging
from collections.abc import Mapping, Sequence
from typing import Any

import lightning as L
import torch
import webdataset as wds

from gridgen.data.cache_format import CacheMismatchError, verify_cache_folders
from gridgen.data.decoding import (
    SKIP_REASONS,
    SafeDecoder,
    SkipCounter,
    ToSample,
    batched_by_layout,
    check_image_decoder,
    collate_grid_samples,
    layout_from_meta,
    pixels_to_float,
    skip_summary,
    unit_range,
)
from gridgen.data.mixing import SeededRandomMix, SkipFirst, Source, parse_sources, resume_position
from gridgen.data.shardlists import (
    ShardError,
    ShardSpec,
    check_shard_headers,
    count_samples,
    is_remote,
    local_path,
    resolve_shards,
)

log = logging.getLogger(__name__)

__all__ = [  # re-exported from the modules above: `from gridgen.data.datamodule import ...` keeps working
    "GridDataModule", "SafeDecoder", "SeededRandomMix", "ShardError", "ShardSpec", "SkipCounter", "Source",
    "ToSample", "batched_by_layout", "collate_grid_samples", "count_samples", "layout_from_meta", "parse_sources",
    "pixels_to_float", "resolve_shards", "unit_range",
]


def _one_line(exn: BaseException, limit: int = 300) -> str:
    text = " ".join(str(exn).split()) or type(exn).__name__
    return text if len(text) <= limit else text[:limit] + "..."


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
        allow_pipe: allow ``pipe:`` shard specs (they run a shell command); off by default.
        image_decoder: ``pil`` (default) or ``simplejpeg`` (libjpeg-turbo, JPEG members only, decodes straight into
            the batch; ``pip install simplejpeg``): same pixels, faster (bench/RESULTS.md, data).
        pin_memory: page-locked batches for asynchronous copies to a CUDA device; ``"auto"``: when the Trainer runs
            on CUDA (``True`` without CUDA is refused: it would do nothing).
        sample_data_root: folder under which :meth:`prepare_data` builds the embedded sample data
            (:func:`~gridgen.embedded.ensure_sample_shards`) when the configured shards do not exist yet;
            ``None``: never build anything.
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
        allow_pipe: bool = False,
        sample_data_root: str | None = None,
        pin_memory: bool | str = "auto",
        image_decoder: str = "pil",
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
        self.allow_pipe = bool(allow_pipe)
        self.sample_data_root = sample_data_root
        if pin_memory not in (True, False, "auto"):
            raise ValueError(f"data.pin_memory must be true, false or auto, got {pin_memory!r}")
        self.pin_memory = pin_memory
        check_image_decoder(image_decoder)
        self.image_decoder = image_decoder
        self.skips = SkipCounter()
        self._source_config = (train_shards, sources, weights)
        self._sources: list[Source] | None = None
        self.source_urls: dict[str, list[str]] | None = None
        self.train_urls: list[str] | None = None
        self.val_urls: list[str] | None = None
        self.batches_per_epoch: int | None = None
        self._skips_logged_at = -1
        self._skips_reported = [0.0] * len(SKIP_REASONS + ("ignored",))

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

    @property
    def num_ignored(self) -> int:
        """Shard members dropped unread so far (formats gridgen does not read, or members this run does not use)."""
        return self.skips.ignored

    # ---- Lightning hooks ------------------------------------------------------------------------
    def prepare_data(self) -> None:
        """Build the embedded sample data under ``sample_data_root`` if the configured shards are not there yet.

        Lightning calls this once per node, before :meth:`setup` (the other local ranks wait), so data is made by
        the run, never while a config is resolved. Shards that exist already are never rebuilt.
        """
        if self.sample_data_root is None or not self._missing_specs():
            return
        from gridgen.embedded import ensure_sample_shards  # the one seam from data/ into the embedded wing

        root = ensure_sample_shards(self.sample_data_root)
        missing = self._missing_specs()
        if missing:
            key, spec = missing[0]
            raise FileNotFoundError(
                f"data.{key} '{spec}' is not in the embedded sample data built at '{root}' (subsets: video, "
                f"multiview); point it at '{root}/<subset>' (conf/data/sample.yaml) or set data.sample_data_root=null"
            )

    def _missing_specs(self) -> list[tuple[str, Any]]:
        """``[(config key, spec)]`` of the configured local shard specs that match nothing (yet)."""
        train, sources, _ = self._source_config
        specs: list[tuple[str, Any, str]] = []
        if sources:
            for name, entry in sources.items():
                spec = entry.get("shards") if isinstance(entry, Mapping) else entry
                if spec not in (None, ""):
                    specs.append((f"sources.{name}.shards", spec, "train"))
        elif train is not None:
            specs.append(("train_shards", train, "train"))
        if self.val_shards is not None:
            specs.append(("val_shards", self.val_shards, "val"))
        missing = []
        for key, spec, split in specs:
            try:
                resolve_shards(spec, split, name=key, allow_pipe=True)  # only lists URLs: runs nothing
            except FileNotFoundError:
                missing.append((key, spec))
        return missing

    def setup(self, stage: str | None = None) -> None:
        """Resolve the shard lists and check the shards and caches before the first step.

        Fails here, with one line naming the shard and the fix, on missing shards, files that are not tar shards,
        shards without samples, first samples that cannot be trained on (e.g. cells not a multiple of 16 px) and
        stale or corrupt caches.
        """
        if stage in (None, "fit") and self.train_urls is None:
            source_urls = {src.name: resolve_shards(src.shards, "train", name=src.config_key,
                                                    allow_pipe=self.allow_pipe) for src in self.sources}
            train_urls = [url for urls in source_urls.values() for url in urls]
            for src in self.sources:
                check_shard_headers(source_urls[src.name], src.config_key)
            if self.cache_model is not None:
                verify_cache_folders(train_urls, self.cache_model)
            for src in self.sources:
                self._check_first_samples(source_urls[src.name], src.config_key)
            self.source_urls, self.train_urls = source_urls, train_urls
        if stage in (None, "fit", "validate") and self.val_shards is not None and self.val_urls is None:
            val_urls = resolve_shards(self.val_shards, "val", name="val_shards", allow_pipe=self.allow_pipe)
            check_shard_headers(val_urls, "val_shards")
            if self.cache_model is not None:
                verify_cache_folders(val_urls, self.cache_model)
            self._check_first_samples(val_urls, "val_shards")
            self.val_urls = val_urls

    def _check_first_samples(self, urls: list[str], key: str, tries: int = 8) -> None:
        """The first local shard of ``urls`` yields a trainable sample among its first ``tries``.

        One broken sample is skipped later like any other, but a shard whose first samples all fail (a layout
        FLUX cannot take, e.g. 30 px cells; a corrupt or foreign cache; the wrong image or caption key) would
        only fail after ``SkipCounter.max_consecutive`` errors in a running job. Remote shards are not read here.
        """
        local = [url for url in urls if not is_remote(url)]
        if not local:
            return
        path = local_path(local[0])
        decode = SafeDecoder(self._kept_members(), SkipCounter())
        to_sample = ToSample(self.image_key, self.caption_key, self.cached, SkipCounter(), self.cache_model)
        raw = wds.DataPipeline(wds.SimpleShardList([str(path)]), wds.tarfile_to_samples())
        errors: list[tuple[Any, BaseException]] = []
        try:
            for sample in itertools.islice(raw, tries):
                try:
                    to_sample(decode(sample))
                    return
                except CacheMismatchError:
                    raise
                except Exception as exn:  # whatever the loader would skip
                    errors.append((sample.get("__key__"), exn))
        except CacheMismatchError:
            raise
        except Exception as exn:  # the tar itself
            raise ShardError(f"shard '{path}' cannot be read ({_one_line(exn)}); re-create it with `make prepare` "
                             f"(or `make cache`) or remove it from data.{key}") from exn
        if not errors:
            raise ShardError(f"shard '{path}' holds no samples; re-create it with `make prepare` or remove it from "
                             f"data.{key}")
        sample_key, exn = errors[0]
        fix = ("rebuild the cache with `make cache data=<name> model=<name>`" if self.cached else
               "re-create the shards with `make prepare` (cells a multiple of 16 px: data.cell_height / "
               "data.cell_width), check data.image_key / data.caption_key")
        raise ShardError(f"shard '{path}': none of its first {len(errors)} samples can be trained on; sample "
                         f"{sample_key!r}: {_one_line(exn)}; {fix}, or remove it from data.{key}") from exn

    def _pinned(self) -> bool:
        on_cuda = isinstance(self.trainer, L.Trainer) and self.trainer.strategy.root_device.type == "cuda"
        if self.pin_memory is True and not on_cuda:
            raise ValueError("data.pin_memory=true pins batches for copies to a CUDA device, and this run has none; "
                             "use data.pin_memory=auto")
        return bool(self.pin_memory) and on_cuda

    def _on_device_float(self) -> bool:
        """Under a Trainer, uint8 pixels travel to the device and become float there (``on_after_batch_transfer``)."""
        return isinstance(self.trainer, L.Trainer)

    def _to_float_stage(self, loader: wds.WebLoader) -> wds.WebLoader:
        return loader if self._on_device_float() else loader.map(pixels_to_float)

    def on_after_batch_transfer(self, batch: Any, dataloader_idx: int) -> Any:
        """uint8 pixels -> float [-1, 1] on the device; every ``log_every_n_steps``, the skips since the last time
        as one console line per interval (counts per reason, summed over ranks) and ``data/skipped`` to the
        loggers."""
        batch = pixels_to_float(batch) if isinstance(batch, dict) else batch
        trainer = self.trainer
        if trainer is None or not trainer.training:
            return batch
        step = trainer.global_step
        if step % max(1, trainer.log_every_n_steps) or step == self._skips_logged_at:
            return batch
        self._skips_logged_at = step
        # every rank gets here at the same step (with_epoch keeps them in lockstep), so the sum cannot hang
        local = torch.tensor(self.skips.counts(), dtype=torch.float64, device=trainer.strategy.root_device)
        total = trainer.strategy.reduce(local, reduce_op="sum").tolist()
        if trainer.is_global_zero:
            self.log_skips(total, where=f"up to step {step}")
            for logger in trainer.loggers:
                logger.log_metrics({"data/skipped": sum(total[:-1]), "data/ignored_members": total[-1]}, step=step)
        return batch

    def log_skips(self, total: Sequence[float] | None = None, where: str = "") -> None:
        """Log, as one warning line, the samples skipped (per reason) and members dropped since the last call.

        ``total``: the counts to report (:meth:`SkipCounter.counts`, e.g. summed over ranks); default this
        process's and its workers'. A Trainer calls this every ``log_every_n_steps``; a loader used on its own can
        call it whenever it wants a report."""
        total = list(self.skips.counts() if total is None else total)
        new = [now - before for now, before in zip(total, self._skips_reported, strict=True)]
        if any(new):
            self._skips_reported = total
            log.warning("data%s: %s", f" ({where})" if where else "", skip_summary(new, total, self.skips.example))

    def teardown(self, stage: str) -> None:
        """The skips after the last periodic line, on one process (several ranks would need a collective here,
        where a failed rank may never arrive; their last periodic line stands)."""
        if self.trainer is not None and stage == "fit" and self.trainer.world_size == 1:
            self.log_skips(where="end of training")

    def train_dataloader(self) -> SkipFirst:
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
        epoch, done = resume_position(self.trainer, self.batches_per_epoch)
        dataset = self.train_dataset(float_pixels=False, start_epoch=epoch)
        loader = wds.WebLoader(
            dataset,
            batch_size=None,  # batches are built by batched_by_layout
            shuffle=False,
            num_workers=self.num_workers,
            # persistent workers keep their ResampledShards epoch counter: a fresh copy per epoch would
            # replay the same shards every epoch
            persistent_workers=self.num_workers > 0,
            pin_memory=self._pinned(),
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
        return SkipFirst(loader, done)

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
            pin_memory=self._pinned(),
        ))

    # ---- pipelines --------------------------------------------------------------------------------
    def _kept_members(self) -> list[str] | None:
        """The members a sample needs (``None``: every member of a format gridgen reads, for cached tensors)."""
        return None if self.cached else [*self.image_key.split(";"), "json", self.caption_key]

    def _decode_and_batch(self, partial: bool, float_pixels: bool = True) -> list[Any]:
        """The stages shared by training and validation: decode safely, build samples, batch by layout."""
        # uint8 batches leave the workers channels-last as decoded; the device permutes them (pixels_to_float)
        channels_last = not float_pixels
        to_sample = ToSample(self.image_key, self.caption_key, self.cached, self.skips, self.cache_model,
                             float_pixels=float_pixels, channels_last=channels_last)
        return [
            wds.map(SafeDecoder(self._kept_members(), self.skips, channels_last=channels_last,
                                image_decoder=self.image_decoder), handler=self.skips),
            wds.map(to_sample, handler=self.skips),
            batched_by_layout(self.batch_size, partial=partial, handler=self.skips),
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
