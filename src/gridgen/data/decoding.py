"""Shard members -> training samples -> batches of one layout, without running anything a shard carries.

Decoding is safe by construction (:class:`SafeDecoder`): gridgen reads only the member formats it writes, with
readers that cannot run code, and drops every other member unread (counted in :attr:`SkipCounter.ignored`):

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

import functools
import io
import json
import logging
import math
import multiprocessing
import tarfile
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import PIL.Image
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


def read_rgb_channels_last(data: bytes) -> np.ndarray:
    """A PNG/JPEG member -> ``(H, W, 3)`` uint8 as PIL decodes it (read-only, no transpose copy)."""
    with io.BytesIO(data) as stream:
        image = PIL.Image.open(stream)
        image.load()
        if image.mode != "RGB":  # convert("RGB") of an RGB image would copy it
            image = image.convert("RGB")
    return np.asarray(image)


IMAGE_DECODERS = ("pil", "simplejpeg")


def check_image_decoder(name: str) -> None:
    """``data.image_decoder`` names a decoder this machine has, or a one-line error."""
    if name not in IMAGE_DECODERS:
        raise ValueError(f"data.image_decoder must be one of {IMAGE_DECODERS}, got {name!r}")
    if name == "simplejpeg":
        try:
            import simplejpeg  # noqa: F401
        except ImportError as exn:
            raise ValueError("data.image_decoder=simplejpeg needs the simplejpeg package: `pip install simplejpeg` "
                             "(or data.image_decoder=pil)") from exn


@dataclass(frozen=True)
class EncodedImage:
    """An image member whose header is read (its size) and whose pixels are decoded later, straight into its slot
    of a batch (:func:`batched_by_layout`): the batch is written once, by the decoder."""

    data: bytes
    ext: str
    height: int
    width: int
    decoder: str = "pil"

    @classmethod
    def parse(cls, data: bytes, ext: str, decoder: str = "pil") -> EncodedImage:
        with io.BytesIO(data) as stream:
            width, height = PIL.Image.open(stream).size  # the header only
        return cls(bytes(data), ext, height, width, decoder)

    def decode_into(self, out: torch.Tensor) -> None:
        """Decode into ``out``, ``(H, W, 3)`` uint8 (a slot of a batch)."""
        target = out.numpy()
        if self.decoder == "simplejpeg" and self.ext in ("jpg", "jpeg"):
            import simplejpeg  # libjpeg-turbo straight into the slot: no intermediate image

            decoded = simplejpeg.decode_jpeg(self.data, colorspace="RGB", buffer=target)
            if decoded.shape != target.shape:
                raise ValueError(f"decoded {decoded.shape} into a {target.shape} slot")
        else:
            target[...] = read_rgb_channels_last(self.data)  # PIL has no into-buffer decode: one copy

    def to_array(self) -> np.ndarray:
        out = torch.empty((self.height, self.width, 3), dtype=torch.uint8)
        self.decode_into(out)
        return out.numpy()


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


class BrokenSample(ValueError):
    """A sample the loader skips, with ``reason``, the name it is counted under (one of :data:`SKIP_REASONS`)."""

    def __init__(self, reason: str, message: str, key: str | None = None) -> None:
        super().__init__(message)
        self.reason, self.key = reason, key  # key: the sample's, where the message does not name it


# why a sample or shard was skipped: a fixed list, so that counts can live in shared memory (DataLoader workers)
# and be summed over DDP ranks as one tensor
SKIP_REASONS = ("unreadable_shard", "undecodable_member", "no_image", "no_caption", "bad_layout", "other")
_EXAMPLE_BYTES = 240  # first message kept per reason


def skip_reason(exn: BaseException) -> str:
    """The :data:`SKIP_REASONS` name of an exception a pipeline stage raised."""
    reason = getattr(exn, "reason", None)
    if reason in SKIP_REASONS:
        return reason
    if isinstance(exn, OSError | EOFError | tarfile.TarError):  # webdataset's tar reading
        return "unreadable_shard"
    return "other"


class SkipCounter:
    """A webdataset exception handler: skip the broken sample or shard, count it by reason, go on.

    Like ``wds.warn_and_continue`` but with counts per reason shared across DataLoader workers, no 0.5 s sleep per
    error, no log line per sample (whoever owns the counter logs one summary per interval: :meth:`summary`), and
    a guard: if ``max_consecutive`` errors happen in a row in one process without a single good sample (every
    shard broken, wrong image key, ...) it raises instead of spinning forever on an endless resampled stream.

    It also counts the shard members that :class:`SafeDecoder` drops unread (:attr:`ignored`).
    """

    def __init__(self, max_consecutive: int = 1000) -> None:
        # shared memory: workers get it by inheritance when the DataLoader starts them
        self._counts = multiprocessing.Array("q", len(SKIP_REASONS) + 1)  # per reason, then ignored members
        self._examples = multiprocessing.Array("c", _EXAMPLE_BYTES * (len(SKIP_REASONS) + 1))
        self.max_consecutive = max_consecutive
        self._consecutive = 0  # per process

    @property
    def count(self) -> int:
        """Samples (or shards) skipped so far, in this process and all its DataLoader workers."""
        return sum(self._counts[: len(SKIP_REASONS)])

    @property
    def ignored(self) -> int:
        """Shard members dropped unread (unknown or unused formats), in this process and all its workers."""
        return int(self._counts[len(SKIP_REASONS)])

    def counts(self) -> list[int]:
        """Skips per reason (in :data:`SKIP_REASONS` order), then the ignored members."""
        with self._counts.get_lock():
            return list(self._counts)

    def example(self, slot: int) -> str:
        """The first message counted in ``slot`` (an index of :meth:`counts`), or ``""``."""
        with self._counts.get_lock():
            raw = self._examples[slot * _EXAMPLE_BYTES:(slot + 1) * _EXAMPLE_BYTES]
        return raw.rstrip(b"\0").decode("utf-8", "replace")

    def _add(self, slot: int, message: str) -> None:
        with self._counts.get_lock():
            self._counts[slot] += 1
            if self._counts[slot] == 1:
                data = message.encode("utf-8")[: _EXAMPLE_BYTES - 1]
                self._examples[slot * _EXAMPLE_BYTES:slot * _EXAMPLE_BYTES + len(data)] = data

    def ignore(self, member: str, known: bool = False) -> None:
        """Count a member that was not decoded (the first one is kept as the example)."""
        why = "not used by this run" if known else (
            f"not a format gridgen reads ({', '.join(MEMBER_READERS)}); never unpickled or executed")
        self._add(len(SKIP_REASONS), f"{member!r}: {why}")

    def ok(self) -> None:
        """Record a good sample (resets the consecutive-error guard)."""
        self._consecutive = 0

    def __call__(self, exn: BaseException) -> bool:
        if isinstance(exn, CacheMismatchError):
            raise exn  # a stale cache is the run's configuration, not a broken sample: stop
        message = str(exn) or repr(exn)
        if getattr(exn, "key", None) is not None:
            message = f"sample {exn.key!r}: {message}"
        if len(message) > 500:
            message = message[:500] + "..."
        self._add(SKIP_REASONS.index(skip_reason(exn)), message)
        self._consecutive += 1
        if self._consecutive >= self.max_consecutive:
            raise RuntimeError(
                f"{self._consecutive} samples in a row could not be loaded; the data is unusable "
                f"(check the shards, data.image_key and data.caption_key). Last error: {message}"
            ) from exn
        return True  # continue with the next sample


def skip_summary(new: Sequence[float], total: Sequence[float], examples: Callable[[int], str] | None = None) -> str:
    """One line for the skips of an interval: ``new`` and ``total`` are :meth:`SkipCounter.counts` vectors (the
    counts since the last line, and in all); ``examples(slot)`` gives the first message of a reason that is new."""
    parts, ignored = [], len(SKIP_REASONS)
    for slot, reason in enumerate(SKIP_REASONS):
        if new[slot]:
            example = examples(slot) if examples and new[slot] == total[slot] else ""
            parts.append(f"{reason}={int(new[slot])}" + (f" (e.g. {example})" if example else ""))
    line = ""
    if parts:
        line = (f"skipped {int(sum(new[:ignored]))} broken samples: {', '.join(parts)}; "
                f"{int(sum(total[:ignored]))} in all")
    if new[ignored]:
        example = examples(ignored) if examples and new[ignored] == total[ignored] else ""
        line += ("; " if line else "") + (f"dropped {int(new[ignored])} shard members unread"
                                          + (f" (e.g. {example})" if example else ""))
    return line


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
    """A batch's uint8 ``pixel_values`` -> float32 ``[-1, 1]`` ``(B, 3, H, W)`` (in place in the batch dict; floats
    pass). The loaders' uint8 batches are channels-last ``(B, H, W, 3)``, as decoded: the permute happens here, on
    the device, in the same pass as the conversion."""
    pixels = batch.get("pixel_values")
    if isinstance(pixels, torch.Tensor) and pixels.dtype == torch.uint8:
        if pixels.ndim == 4 and pixels.shape[-1] == 3:
            pixels = pixels.permute(0, 3, 1, 2)  # (B, H, W, 3) -> (B, 3, H, W), a view
        batch["pixel_values"] = unit_range(pixels).contiguous()
    return batch


def handover_empty(shape: Sequence[int], dtype: torch.dtype) -> torch.Tensor:
    """An uninitialised tensor for a batch; inside a DataLoader worker in shared memory, as torch's
    ``default_collate`` allocates there, so the worker's queue hands the main process a handle instead of
    copying the batch into shared memory itself (which costs as much as decoding on a busy machine)."""
    if torch.utils.data.get_worker_info() is None:
        return torch.empty(tuple(shape), dtype=dtype)
    numel = math.prod(shape)
    storage = torch.UntypedStorage._new_shared(numel * dtype.itemsize)  # what default_collate does in a worker
    return torch.empty(0, dtype=dtype).set_(storage).view(tuple(shape))


def stack_pixels(images: list[Any]) -> torch.Tensor:
    """Images of one size -> one batch tensor, into shared memory in a DataLoader worker (``default_collate``)."""
    return torch.utils.data.default_collate(images)


def collate_grid_samples(samples: list[dict[str, Any]], pixels: torch.Tensor | None = None) -> dict[str, Any]:
    """Samples of one layout -> batch ``{pixel_values (B,3,H,W), caption [str], layout {..}, __key__ [str], extras}``.

    ``pixels``: the batch's images already decoded into one tensor (:func:`batched_by_layout`), used as they are."""
    layout = samples[0]["layout"]
    if any(s["layout"] != layout for s in samples):
        raise ValueError(f"a batch mixes layouts: {sorted({s['layout'].name for s in samples})}")
    batch: dict[str, Any] = {
        "__key__": [s["__key__"] for s in samples],
        "caption": [s["caption"] for s in samples],
        "layout": layout.to_dict(),
    }
    if pixels is not None:
        batch["pixel_values"] = pixels
    elif all("pixel_values" in s for s in samples):
        batch["pixel_values"] = stack_pixels([s["pixel_values"] for s in samples])
    extras = [k for k in samples[0] if k not in _BATCH_KEYS]
    for key in extras:
        batch[key] = _stack_or_list([s.get(key) for s in samples])
    return batch


def _batched_by_layout(
    data: Iterator[dict[str, Any]],
    batch_size: int,
    partial: bool = True,
    collate: Callable[..., Any] = collate_grid_samples,
    handler: Callable[[BaseException], bool] | None = None,
) -> Iterator[Any]:
    """Group samples by ``sample["layout"]`` and emit a batch whenever one layout has ``batch_size`` samples.

    Each bucket holds fewer than ``batch_size`` samples, so the buffer stays small (layouts x batch_size).
    At the end of a finite stream the partial buckets are emitted in first-seen order if ``partial``.
    A sample whose ``pixel_values`` is an :class:`EncodedImage` is decoded as it arrives, straight into the next
    slot of its layout's ``(batch_size, H, W, 3)`` uint8 batch (in shared memory in a DataLoader worker); one that
    fails to decode goes to ``handler`` (skip and count) and its slot is used by the next sample.
    """
    buckets: dict[GridLayout, list[dict[str, Any]]] = {}
    buffers: dict[GridLayout, torch.Tensor] = {}
    for sample in data:
        layout = sample["layout"]
        bucket = buckets.setdefault(layout, [])
        image = sample.get("pixel_values")
        if isinstance(image, EncodedImage):
            if layout not in buffers:
                buffers[layout] = handover_empty((batch_size, image.height, image.width, 3), torch.uint8)
            try:
                image.decode_into(buffers[layout][len(bucket)])
            except Exception as exn:
                if handler is None:
                    raise
                handler(BrokenSample("undecodable_member", f"member {image.ext!r} cannot be decoded: {exn}",
                                     sample["__key__"]))
                continue
            sample = {**sample, "pixel_values": None}  # in the buffer
        bucket.append(sample)
        if len(bucket) >= batch_size:
            del buckets[layout]
            yield collate(bucket, pixels=buffers.pop(layout, None))
    if partial:
        for layout, bucket in buckets.items():
            buffer = buffers.pop(layout, None)
            yield collate(bucket, pixels=None if buffer is None else buffer[: len(bucket)])


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
                 float_pixels: bool = True, channels_last: bool = False) -> None:
        self.image_key = image_key
        self.caption_key = caption_key
        self.cached = cached
        self.skips = skips
        self.cache_model = dict(cache_model) if cache_model is not None else None
        self.keep_meta = keep_meta
        self.float_pixels = float_pixels
        self.channels_last = channels_last  # images come as EncodedImage (SafeDecoder(channels_last=True))

    def __call__(self, sample: dict[str, Any]) -> dict[str, Any]:
        key = sample.get("__key__")
        meta = sample.get("json")
        if not isinstance(meta, dict):
            raise BrokenSample("bad_layout", f"sample {key!r} has no json layout metadata")
        if self.caption_key not in sample:
            raise BrokenSample("no_caption", f"sample {key!r} has no caption {self.caption_key!r}")
        image_keys = self.image_key.split(";")
        # with cached latents a sample may carry no image at all; without them the image is the input
        image = wds.filters.getfirst(sample, image_keys, missing_is_error=False)
        if image is None and not self.cached:
            raise BrokenSample("no_image", f"sample {key!r} has none of the image members {image_keys} "
                               f"(members: {sorted(k for k in sample if not k.startswith('__'))})")
        out: dict[str, Any] = {"__key__": sample["__key__"], "caption": str(sample[self.caption_key]).strip()}
        try:
            if image is not None:
                height, width = (image.height, image.width) if self.channels_last else image.shape[1:]
                out["layout"] = layout_from_meta(meta, height, width)
            else:
                out["layout"] = layout_from_meta(meta)
        except ValueError as exn:
            raise BrokenSample("bad_layout", str(exn), key) from exn
        if image is not None:
            if self.channels_last and self.float_pixels:
                image = torch.from_numpy(image.to_array().transpose(2, 0, 1).copy())  # (H, W, 3) -> (3, H, W)
            # uint8 [0, 255] -> float [-1, 1] here, or after the hand-over (pixels_to_float): 4x fewer bytes to move
            out["pixel_values"] = unit_range(image) if self.float_pixels else image
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

    def __init__(self, keep: Iterable[str] | None, skips: SkipCounter, channels_last: bool = False,
                 image_decoder: str = "pil") -> None:
        self.keep = None if keep is None else frozenset(k.lower() for k in keep)
        self.skips = skips
        # channels_last: images stay encoded (EncodedImage: header read, size known) and are decoded by
        # batched_by_layout straight into their batch, (B, H, W, 3) uint8, with ``image_decoder``
        self.readers = dict(MEMBER_READERS)
        if channels_last:
            self.readers.update({ext: functools.partial(EncodedImage.parse, ext=ext, decoder=image_decoder)
                                 for ext in IMAGE_FORMATS})

    def __call__(self, sample: Mapping[str, Any]) -> dict[str, Any]:
        out: dict[str, Any] = {}
        for name, value in sample.items():
            if name.startswith("__"):  # __key__, __url__, __local_path__: webdataset's own fields
                out[name] = value
                continue
            lowered = name.lower()
            reader = self.readers.get(lowered.rsplit(".", 1)[-1])
            if reader is None or (self.keep is not None and lowered not in self.keep):
                self.skips.ignore(name, known=reader is not None)
                continue
            try:
                out[name] = reader(value)
            except Exception as exn:  # any reader error: the sample is broken
                raise BrokenSample("undecodable_member", f"sample {sample.get('__key__')!r}: member {name!r} cannot "
                                   f"be decoded: {exn}") from exn
        return out
