"""Shard members -> training samples -> batches of one layout, without running anything a shard carries.

Decoding is safe by construction (:class:`SafeDecoder`): gridgen reads only the member formats it writes, with
readers that cannot run code, and drops every other member unread (counted in :attr:`SkipCounter.ignored` and
logged once per member name):

    png / jpg / jpeg      PIL -> uint8 ``(3, H, W)`` (webdataset's ``torchrgb8`` image handler)
    json                  ``json.loads``
    txt                   UTF-8 text
    safetensors           ``safetensors.torch.load`` (``<key>.cache.safetensors`` of ``make cache``)
    npy                   ``numpy.load(allow_pickle=False)``: an object array is a broken sample

webdataset's default decoders are never used: they unpickle ``.pyd``/``.pickle`` members and ``torch.load``
``.pth`` ones, so a crafted shard could run code. A sample that fails to decode is skipped and counted
(:class:`SkipCounter`), not fatal.

A grid batch must be a single tensor, so it can only hold grids of one layout (rows, cols, cell size). Samples
are grouped by layout in a small buffer and a batch is emitted when one layout has ``batch_size`` samples
(:func:`batched_by_layout`).
"""

from __future__ import annotations

import io
import json
import logging
import multiprocessing
from collections.abc import Callable, Iterable, Iterator, Mapping
from typing import Any

import numpy as np
import torch
import webdataset as wds

from gridgen.data.cache_format import (
    CACHE_MEMBER,
    CacheMismatchError,
    check_cached_sample,
    load_cached_sample,
)
from gridgen.layout import GridLayout

log = logging.getLogger(__name__)

# keys produced by the sample stage; everything else is an "extra" (e.g. cached latents) passed through
_BATCH_KEYS = ("__key__", "pixel_values", "caption", "layout")
IMAGE_FORMATS = ("png", "jpg", "jpeg")
_read_image = wds.autodecode.imagehandler("torchrgb8")  # PIL only; returns None for other extensions


def _read_npy(data: bytes) -> np.ndarray:
    return np.load(io.BytesIO(data), allow_pickle=False)  # an object (pickled) array raises ValueError


# member format (the part of the member name after its last dot) -> a reader that cannot run code
MEMBER_READERS: dict[str, Callable[[bytes], Any]] = {
    **{ext: (lambda data, ext=ext: _read_image(f"x.{ext}", data)) for ext in IMAGE_FORMATS},
    "json": lambda data: json.loads(data),
    "txt": lambda data: bytes(data).decode("utf-8"),
    "safetensors": load_cached_sample,
    "npy": _read_npy,
}


class SkipCounter:
    """A webdataset exception handler: skip the broken sample or shard, count it, log it, go on.

    Like ``wds.warn_and_continue`` but with a count shared across DataLoader workers, ``logging`` instead of
    ``warnings``, no 0.5 s sleep per error, and a guard: if ``max_consecutive`` errors happen in a row in one
    process without a single good sample (every shard broken, wrong image key, ...) it raises instead of
    spinning forever on an endless resampled stream.

    It also counts the shard members that :class:`SafeDecoder` drops unread (:attr:`ignored`).
    """

    def __init__(self, max_consecutive: int = 1000, log_first: int = 10, log_every: int = 100) -> None:
        # shared-memory integers: workers get them by inheritance when the DataLoader starts them
        self._total = multiprocessing.Value("q", 0)
        self._ignored = multiprocessing.Value("q", 0)
        self._ignored_names: set[str] = set()  # per process: log each member name once
        self.max_consecutive = max_consecutive
        self.log_first = log_first
        self.log_every = log_every
        self._consecutive = 0  # per process

    @property
    def count(self) -> int:
        """Samples (or shards) skipped so far, in this process and all its DataLoader workers."""
        return int(self._total.value)

    @property
    def ignored(self) -> int:
        """Shard members dropped unread (unknown or unused formats), in this process and all its workers."""
        return int(self._ignored.value)

    def ignore(self, member: str, known: bool = False) -> None:
        """Count a member that was not decoded; log each member name once per process."""
        with self._ignored.get_lock():
            self._ignored.value += 1
        if member not in self._ignored_names:
            self._ignored_names.add(member)
            why = "not used by this run" if known else (
                f"not a format gridgen reads ({', '.join(MEMBER_READERS)}); never unpickled or executed")
            log.warning("ignoring shard member %r: %s", member, why)

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


class ToSample:
    """Decoded webdataset sample -> ``{__key__, pixel_values, caption, layout, extras}``.

    ``cached``: pass decoded tensors through under their member name (a ``cache.safetensors`` member is unpacked
    into ``latents``, ``prompt_embeds``, ...); the image becomes optional. ``cache_model``: check that cached
    samples were built for this model (:func:`~gridgen.data.cache_format.check_cached_sample`). ``keep_meta``: keep the
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


class SafeDecoder:
    """webdataset sample of raw member bytes -> decoded sample, reading only the formats in :data:`MEMBER_READERS`.

    ``keep``: the member names the consumer uses (``["png", "jpg", "jpeg", "json", "txt"]``); ``None`` decodes every
    member of a known format (cached shards: tensors pass through under their own names). Members not kept, or of
    an unknown format (``.pyd``, ``.pickle``, ``.pth``, ...), are dropped without being read and counted in
    ``skips.ignored``. A member that fails to decode raises (the sample is skipped by the pipeline's handler). A
    class, not a closure, so the pipeline pickles into spawned DataLoader workers.
    """

    def __init__(self, keep: Iterable[str] | None, skips: SkipCounter) -> None:
        self.keep = None if keep is None else frozenset(k.lower() for k in keep)
        self.skips = skips

    def __call__(self, sample: Mapping[str, Any]) -> dict[str, Any]:
        out: dict[str, Any] = {}
        for name, value in sample.items():
            if name.startswith("__"):  # __key__, __url__, __local_path__: webdataset's own fields
                out[name] = value
                continue
            lowered = name.lower()
            reader = MEMBER_READERS.get(lowered.rsplit(".", 1)[-1])
            if reader is None or (self.keep is not None and lowered not in self.keep):
                self.skips.ignore(name, known=reader is not None)
                continue
            try:
                out[name] = reader(value)
            except Exception as exn:  # any reader error: the sample is broken
                raise ValueError(f"sample {sample.get('__key__')!r}: member {name!r} cannot be decoded: {exn}") from exn
        return out
