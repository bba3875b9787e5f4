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
from gridgen.files import atomic_path, write_text_atomic
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
    _write_json(folder / CACHE_MANIFEST, manifest)


def _chunks(items: Iterable[Any], size: int) -> Iterable[list[Any]]:
    chunk: list[Any] = []
    for item in items:
        chunk.append(item)
        if len(chunk) == size:
            yield chunk
            chunk = []
    if chunk:
        yield chunk


RECORDS = ".cache-shards"  # <shard name>.json: one record per finished shard, written by the rank that made it


def _record_path(out: Path, name: str) -> Path:
    return out / RECORDS / f"{name}.json"


def _read_record(out: Path, name: str) -> dict[str, Any] | None:
    try:
        record = json.loads(_record_path(out, name).read_text())
    except (OSError, ValueError):
        return None
    return record if isinstance(record, dict) else None


def shard_names(shards: Mapping[str, list[str]]) -> list[tuple[str, str, str]]:
    """``[(split, cache shard name, source url)]`` in a fixed order: the cache's shards map one to one to these."""
    return [(split, f"{split}-{index:06d}.tar", url) for split, urls in shards.items()
            for index, url in enumerate(urls)]


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
    rank: int = 0,
    world_size: int = 1,
    first_task: int = 0,
) -> dict[str, Any]:
    """Encode ``shards`` (``{split: [url, ...]}``) into ``out/{split}-{i:06d}.tar`` plus ``out/cache.json``.

    Resumable: a shard is written atomically (via a temp file) with a record of what it was made from
    (``.cache-shards/<name>.json``); a shard with its record for the same source and model is kept, so an
    interrupted run continues where it stopped. Broken source samples are skipped and counted per shard. A folder
    holding a cache for another model is refused unless ``overwrite``.

    Several processes (``world_size``, one ``rank`` each: GPUs of a node, nodes, SLURM array tasks) share the work
    without talking to each other: shard ``j`` of the folder (counting from ``first_task`` across folders) is made
    by rank ``j % world_size``, each rank writes only its shards and their records, and whichever rank finds every
    shard recorded when it finishes writes the complete ``cache.json``. Returns the manifest (``status``
    ``incomplete`` while other ranks' shards are missing).
    """
    import safetensors.torch
    import webdataset as wds

    if not 0 <= rank < world_size:
        raise ValueError(f"cache.rank must be one of 0..{world_size - 1} (cache.world_size={world_size}), got {rank}")
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
    tasks = shard_names(shards)
    mine = [task for j, task in enumerate(tasks) if (first_task + j) % world_size == rank]
    if overwrite or old is None:
        # shards not ours to keep: another model's (overwrite), or names this plan does not have; every rank
        # clears only its own shards, and rank 0 the names no rank writes, so no rank deletes another's work
        expected = {name for _, name, _ in tasks}
        for stale in out.glob("*.tar"):
            if (overwrite and stale.name in {name for _, name, _ in mine}) or (rank == 0 and stale.name not in expected):
                stale.unlink()
                _record_path(out, stale.name).unlink(missing_ok=True)
    header: dict[str, Any] = {
        "format": CACHE_FORMAT, "status": "incomplete", "fingerprint": fingerprint,
        "model": model.get("name"), "data": data_name, "dtype": str(model.get("dtype", "float32")),
        "command": command or REBUILD.format(data=data_name, model=model.get("name")),
        "members": {CACHE_MEMBER: {
            "latents": "(N, 64) packed VAE latents, normalised (z - shift_factor) * scaling_factor",
            "prompt_embeds": "(L, D) T5 sequence embedding, L = max_sequence_length",
            "pooled_prompt_embeds": "(D,) CLIP pooled embedding",
            "text_mask": "(L,) uint8 T5 attention mask"},
            "json": "source json + cell size + gridgen_cache {fingerprint, hash}", "txt": "caption"},
    }
    # incomplete from the start, so that training on an unfinished cache says what to do; the rank that finishes
    # last writes the complete one (finish_cache)
    _write_manifest(out, {**header, "layouts": (old or {}).get("layouts", {}), "shards": (old or {}).get("shards", {})})
    info = {**fingerprint, "name": model.get("name"), "data": data_name}
    max_len = fingerprint["max_sequence_length"]
    for split, name, url in mine:
        target = out / name
        done = _read_record(out, name) or (old or {}).get("shards", {}).get(name)  # older caches: their manifest
        if target.is_file() and done and done.get("source") == url and done.get("fingerprint", fingerprint) == fingerprint:
            log.info("cache: %s already written (%d samples), skipped", name, done["samples"])
            continue
        skips = SkipCounter()
        started, written, layouts = time.perf_counter(), 0, {}
        samples = wds.DataPipeline(
            wds.SimpleShardList([url]),
            wds.tarfile_to_samples(handler=skips),
            wds.map(SafeDecoder([*image_key.split(";"), "json", caption_key], skips), handler=skips),
            wds.map(ToSample(image_key, caption_key, cached=False, skips=skips, keep_meta=True), handler=skips),
        )
        with atomic_path(target) as tmp, wds.TarWriter(str(tmp), mtime=0) as sink:
            for chunk in _chunks(samples, batch_size):
                for sample, tensors in zip(chunk, encode_for_cache(pipe, chunk, max_len), strict=True):
                    layout: GridLayout = sample["layout"]
                    meta = {**sample["meta"], "cell_height": layout.cell_height, "cell_width": layout.cell_width,
                            "gridgen_cache": {**info, "hash": layout_hash(fingerprint, layout)}}
                    layouts[f"{layout.name}@{layout.height}x{layout.width}"] = layout_hash(fingerprint, layout)
                    sink.write({"__key__": sample["__key__"],  # paired by key, never by position
                                CACHE_MEMBER: safetensors.torch.save(tensors),
                                "json": json.dumps(meta, sort_keys=True).encode(),
                                "txt": sample["caption"].encode()})
                    written += 1
        record = {"source": url, "split": split, "samples": written, "skipped": skips.count, "layouts": layouts,
                  "fingerprint": fingerprint}
        _record_path(out, name).parent.mkdir(exist_ok=True)
        _write_json(_record_path(out, name), record)
        seconds = time.perf_counter() - started
        log.info("cache: %s <- %s: %d samples, %d skipped, %.1f samples/s", name, url, written, skips.count,
                 written / max(seconds, 1e-9))
    return finish_cache(out, shards, header, old)


def finish_cache(out: Path, shards: Mapping[str, list[str]], header: dict[str, Any],
                 old: dict[str, Any] | None = None) -> dict[str, Any]:
    """The manifest of ``out`` from the records of its shards: ``complete`` (and written) once every shard of
    ``shards`` is there with its record for the same source and model, else ``incomplete`` (not written: the
    rank that finishes last writes it)."""
    entries, layouts, missing = {}, {}, []
    for split, name, url in shard_names(shards):
        record = _read_record(out, name) or (old or {}).get("shards", {}).get(name)
        if not (out / name).is_file() or not record or record.get("source") != url or \
                record.get("fingerprint", header["fingerprint"]) != header["fingerprint"]:
            missing.append(name)
            continue
        entries[name] = {"source": url, "split": split, "samples": record["samples"], "skipped": record["skipped"]}
        layouts.update(record.get("layouts", {}))
    layouts.update({k: v for k, v in (old or {}).get("layouts", {}).items() if k not in layouts})
    manifest = {**header, "layouts": dict(sorted(layouts.items())), "shards": entries}
    manifest["counts"] = {split: sum(v["samples"] for v in entries.values() if v["split"] == split)
                          for split in shards}
    manifest["skipped"] = sum(v["skipped"] for v in entries.values())
    if missing:
        manifest["missing"] = missing
        log.info("cache: %s has %d of %d shards; cache.json is written by the rank that finishes last", out,
                 len(entries), len(entries) + len(missing))
        return manifest
    manifest["status"] = "complete"
    _write_manifest(out, manifest)
    return manifest


def _write_json(path: Path, obj: Any) -> None:
    write_text_atomic(path, json.dumps(obj, indent=2, sort_keys=True))
