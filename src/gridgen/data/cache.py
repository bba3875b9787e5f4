"""Latent and text caches: encode grid shards once with a model's VAE and text encoders, then train without them.

A cache folder mirrors its source shards one to one (``train-000000.tar`` ... ``val-000000.tar``) and holds,
per sample **key** (the source sample's ``__key__``; tensors are paired with their sample by key, never by
batch position, the mistake that pairs cached latents with other captions in diffusers' FLUX script):

    <key>.cache.safetensors  latents (N, 64)            packed (z - shift) * scale, exactly encode_images()
                             prompt_embeds (L, D_t5)     T5 sequence embedding, L = max_sequence_length
                             pooled_prompt_embeds (D)    CLIP pooled embedding
                             text_mask (L,) uint8        T5 attention mask (1 = caption token, 0 = padding)
    <key>.json               the source json, its cell size, and "gridgen_cache": fingerprint + hash
    <key>.txt                the caption

and a manifest ``cache.json``: format, the fingerprint (model id = ``model.pretrained`` + revision + variant,
``max_sequence_length``), one hash per layout/resolution, counts, the source of every shard and the command
that rebuilds it. A cache is only valid for the model and max sequence length it was built with: training
with ``data.cached=true`` checks the manifest of every local cache folder when the datamodule is set up and the
hash of every sample as it streams (so ``pipe:`` / URL caches are checked too), and refuses a stale cache with
one line naming the value and the fix (:class:`CacheMismatchError`).

The format and its checks live in :mod:`gridgen.data.cache_format` (no model code; the streaming reader uses them,
and they are re-exported here); this module is the writer and imports diffusers lazily: like the architecture
says, ``cache.py`` is the one data module that runs a model. Source shards are read with the same safe decoder as
training (:class:`~gridgen.data.decoding.SafeDecoder`): nothing in a shard is ever unpickled.
"""

from __future__ import annotations

import json
import logging
import os
import time
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from gridgen.data.cache_format import (  # re-exported: the cache's format lives next to its reader
    CACHE_FORMAT,
    CACHE_MANIFEST,
    CACHE_MEMBER,
    CACHE_TENSORS,
    FINGERPRINT_KEYS,
    REBUILD,
    CacheMismatchError,
    _mismatch,
    cache_fingerprint,
    check_cached_sample,
    layout_hash,
    load_cached_sample,
    read_manifest,
    verify_cache_folders,
)
from gridgen.data.decoding import SafeDecoder, SkipCounter, ToSample
from gridgen.layout import GridLayout

if TYPE_CHECKING:
    from diffusers import FluxPipeline

log = logging.getLogger(__name__)

__all__ = [
    "CACHE_FORMAT", "CACHE_MANIFEST", "CACHE_MEMBER", "CACHE_TENSORS", "FINGERPRINT_KEYS", "CacheMismatchError",
    "cache_fingerprint", "cache_shards", "check_cached_sample", "encode_for_cache", "layout_hash", "load_cached_sample",
    "load_encoders", "read_manifest", "verify_cache_folders",
]


# ---- encoding (runs the model) --------------------------------------------------------------------


def load_encoders(model: Mapping[str, Any], device: str | torch.device = "cpu") -> FluxPipeline:
    """The VAE, CLIP and T5 (with tokenizers) of ``model.pretrained``, without the transformer.

    :func:`gridgen.models.loading.load_flux_pipeline` with ``load_transformer=False``: caching never runs the
    transformer, so it is not loaded (FLUX.1-dev's is 24 GB in bf16).
    """
    from gridgen.models.loading import load_flux_pipeline

    pipe = load_flux_pipeline(model["pretrained"], dtype=model.get("dtype", "float32"), load_transformer=False,
                              revision=model.get("revision"), variant=model.get("variant"))
    for part in (pipe.vae, pipe.text_encoder, pipe.text_encoder_2):
        part.requires_grad_(False).eval()
    return pipe.to(device)


@torch.no_grad()
def encode_for_cache(pipe: FluxPipeline, samples: list[dict[str, Any]], max_sequence_length: int
                     ) -> list[dict[str, torch.Tensor]]:
    """Per sample, in the order given: ``{latents (N, 64), prompt_embeds (L, D), pooled_prompt_embeds (D,),
    text_mask (L,)}`` on the CPU, computed with the functions training uses (``encode_images``, ``encode_prompts``).

    Images of different layouts cannot share a VAE batch: they are encoded per layout and every result is put
    back at the index of the sample it came from.
    """
    from gridgen.models.flux import encode_images, encode_prompts

    device = pipe.vae.device
    captions = [s["caption"] for s in samples]
    prompt_embeds, pooled, _ = encode_prompts(pipe, captions, max_sequence_length, device=device)  # (B, L, D), (B, D)
    mask = pipe.tokenizer_2(captions, padding="max_length", max_length=max_sequence_length, truncation=True,
                            return_tensors="pt").attention_mask.to(torch.uint8)  # (B, L)
    latents: list[torch.Tensor | None] = [None] * len(samples)
    by_layout: dict[GridLayout, list[int]] = {}
    for index, sample in enumerate(samples):
        by_layout.setdefault(sample["layout"], []).append(index)
    for indices in by_layout.values():
        pixels = torch.stack([samples[i]["pixel_values"] for i in indices]).to(device)  # (b, 3, H, W)
        for row, z in zip(indices, encode_images(pipe.vae, pixels), strict=True):  # z: (N, 64)
            latents[row] = z
    return [{"latents": latents[i].cpu().contiguous(), "prompt_embeds": prompt_embeds[i].cpu().contiguous(),
             "pooled_prompt_embeds": pooled[i].cpu().contiguous(), "text_mask": mask[i].contiguous()}
            for i in range(len(samples))]


def _write_manifest(folder: Path, manifest: dict[str, Any]) -> None:
    tmp = folder / f".{CACHE_MANIFEST}.tmp"
    tmp.write_text(json.dumps(manifest, indent=2, sort_keys=True))
    os.replace(tmp, folder / CACHE_MANIFEST)


def _chunks(items: Iterable[Any], size: int) -> Iterable[list[Any]]:
    chunk: list[Any] = []
    for item in items:
        chunk.append(item)
        if len(chunk) == size:
            yield chunk
            chunk = []
    if chunk:
        yield chunk


def cache_shards(
    pipe: FluxPipeline,
    shards: Mapping[str, list[str]],
    out: str | os.PathLike,
    model: Mapping[str, Any],
    *,
    batch_size: int = 8,
    image_key: str = "png;jpg;jpeg",
    caption_key: str = "txt",
    overwrite: bool = False,
    data_name: str = "<name>",
    command: str | None = None,
) -> dict[str, Any]:
    """Encode ``shards`` (``{split: [url, ...]}``) into ``out/{split}-{i:06d}.tar`` plus ``out/cache.json``.

    Resumable: shards already written (atomically, via a temp file) are kept when the fingerprint matches, so an
    interrupted run continues where it stopped. Broken source samples are skipped and counted per shard. A
    folder holding a cache for another model is refused unless ``overwrite``. Returns the manifest.
    """
    import safetensors.torch
    import webdataset as wds

    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    fingerprint = cache_fingerprint(model)
    try:
        old = read_manifest(out)
    except CacheMismatchError:
        if not overwrite:
            raise
        old = None
    if old is not None and old.get("fingerprint") != fingerprint:
        if not overwrite:
            problem = _mismatch({**old.get("fingerprint", {}), "name": old.get("model")},
                                {**fingerprint, "name": model.get("name")}, f"cache.out '{out}'", data_name)
            raise CacheMismatchError(f"{problem or f'cache.out {out} holds another cache'} "
                                     "(or set cache.out=<another folder>, or cache.overwrite=true to replace it)")
        old = None
    if old is None or overwrite:
        for stale in out.glob("*.tar"):
            stale.unlink()
        old = None
    manifest: dict[str, Any] = {
        "format": CACHE_FORMAT, "status": "incomplete", "fingerprint": fingerprint,
        "model": model.get("name"), "data": data_name, "dtype": str(model.get("dtype", "float32")),
        "command": command or REBUILD.format(data=data_name, model=model.get("name")),
        "members": {CACHE_MEMBER: {
            "latents": "(N, 64) packed VAE latents, normalised (z - shift_factor) * scaling_factor",
            "prompt_embeds": "(L, D) T5 sequence embedding, L = max_sequence_length",
            "pooled_prompt_embeds": "(D,) CLIP pooled embedding",
            "text_mask": "(L,) uint8 T5 attention mask"},
            "json": "source json + cell size + gridgen_cache {fingerprint, hash}", "txt": "caption"},
        "layouts": dict((old or {}).get("layouts", {})),
        "shards": dict((old or {}).get("shards", {})),
    }
    _write_manifest(out, manifest)
    info = {**fingerprint, "name": model.get("name"), "data": data_name}
    max_len = fingerprint["max_sequence_length"]
    for split, urls in shards.items():
        for index, url in enumerate(urls):
            name = f"{split}-{index:06d}.tar"
            target = out / name
            done = manifest["shards"].get(name)
            if target.is_file() and done and done.get("source") == url:
                log.info("cache: %s already written (%d samples), skipped", name, done["samples"])
                continue
            skips = SkipCounter()
            started, written = time.perf_counter(), 0
            samples = wds.DataPipeline(
                wds.SimpleShardList([url]),
                wds.tarfile_to_samples(handler=skips),
                wds.map(SafeDecoder([*image_key.split(";"), "json", caption_key], skips), handler=skips),
                wds.map(ToSample(image_key, caption_key, cached=False, skips=skips, keep_meta=True), handler=skips),
            )
            tmp = out / f".{name}.tmp"
            with wds.TarWriter(str(tmp), mtime=0) as sink:
                for chunk in _chunks(samples, batch_size):
                    for sample, tensors in zip(chunk, encode_for_cache(pipe, chunk, max_len), strict=True):
                        layout: GridLayout = sample["layout"]
                        meta = {**sample["meta"], "cell_height": layout.cell_height, "cell_width": layout.cell_width,
                                "gridgen_cache": {**info, "hash": layout_hash(fingerprint, layout)}}
                        manifest["layouts"][f"{layout.name}@{layout.height}x{layout.width}"] = layout_hash(
                            fingerprint, layout)
                        sink.write({"__key__": sample["__key__"],  # paired by key, never by position
                                    CACHE_MEMBER: safetensors.torch.save(tensors),
                                    "json": json.dumps(meta, sort_keys=True).encode(),
                                    "txt": sample["caption"].encode()})
                        written += 1
            os.replace(tmp, target)
            seconds = time.perf_counter() - started
            manifest["shards"][name] = {"source": url, "split": split, "samples": written, "skipped": skips.count}
            _write_manifest(out, manifest)
            log.info("cache: %s <- %s: %d samples, %d skipped, %.1f samples/s", name, url, written, skips.count,
                     written / max(seconds, 1e-9))
    expected = {f"{split}-{i:06d}.tar" for split, urls in shards.items() for i in range(len(urls))}
    manifest["shards"] = {k: v for k, v in manifest["shards"].items() if k in expected}
    manifest["counts"] = {split: sum(v["samples"] for v in manifest["shards"].values() if v["split"] == split)
                          for split in shards}
    manifest["skipped"] = sum(v["skipped"] for v in manifest["shards"].values())
    manifest["status"] = "complete"
    _write_manifest(out, manifest)
    return manifest

